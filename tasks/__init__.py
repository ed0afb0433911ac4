"""Tasks. Importing this package registers every task in ``vlbench.registry.TASKS``."""

from vlbench.tasks import vqa  # noqa: F401  (registration side effects)
