"""User-facing errors: one clear line naming the file/key and what was expected."""

from __future__ import annotations

import re
import sys
from typing import NoReturn

# A DataLoader worker's exception comes back re-raised as ``type(e)("Caught VlbenchError in DataLoader worker process
# N.\nOriginal Traceback ...\nvlbench.errors.VlbenchError: <message>\n")`` (torch.utils.data's ExceptionWrapper).
_WORKER_WRAPPED = re.compile(r"\ACaught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")
_ORIGINAL_LINE = re.compile(r"^vlbench\.errors\.\w+: (.+)$", re.MULTILINE)


class VlbenchError(Exception):
    """Raised for bad input or configuration; the CLI prints only its message (no traceback) and exits 2."""

    def __init__(self, message: str = "", *args: object):
        # Why: an unreadable image met in a loader worker (trainer.num_workers > 0) must still read as its one line,
        # not as the worker's traceback: keep the original message, as the CLI and failed.json show only that.
        if isinstance(message, str) and _WORKER_WRAPPED.match(message):
            found = _ORIGINAL_LINE.findall(message)
            if found:
                message = found[-1]
        super().__init__(message, *args)


def exit_with_error(message: object) -> NoReturn:
    """How the ``vlbench`` command stops on bad input or configuration: the one line on stderr, exit status 2."""
    print(f"vlbench: error: {message}", file=sys.stderr)
    sys.exit(2)
