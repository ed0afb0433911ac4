"""Tasks. Importing this package registers every task in ``vlbench.registry.TASKS``."""

from vlbench.tasks import gqa, nlvr2, nlvr2_ta, pretrain, retrieval, vqa  # noqa: F401  (registration side effects)
