"""Model families. Importing this package registers every family in ``vlbench.registry.MODELS``."""

from vlbench.models import (  # noqa: F401  (registration side effects)
    albef,
    lxmert,
    majority,
    pixelbert,
    textonly,
    unimo3,
)
