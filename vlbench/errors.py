"""User-facing errors: one clear line naming the file/key and what was expected."""


class VlbenchError(Exception):
    """Raised for bad input or configuration; the CLI prints only its message (no traceback) and exits 2."""
