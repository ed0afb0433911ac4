"""Model families. Importing this package registers every family in ``vlbench.registry.MODELS``."""

from vlbench.models import albef, lxmert, majority, textonly  # noqa: F401  (registration side effects)
