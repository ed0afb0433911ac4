"""Reading official annotation files with one-line errors that name the file and what was expected."""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vlbench.errors import VlbenchError


def read_json(path: Path) -> dict | list:
    if not path.is_file():
        raise VlbenchError(f"{path}: file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise VlbenchError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    except UnicodeDecodeError as e:
        raise VlbenchError(f"{path}: not UTF-8 text ({e.reason})") from e


def require_keys(record: object, keys: tuple[str, ...], path: Path, what: str) -> None:
    if not isinstance(record, dict):
        raise VlbenchError(f"{path}: {what} is a {type(record).__name__}, expected an object with keys {keys}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise VlbenchError(f"{path}: {what} lacks key(s) {missing} (expected {list(keys)})")


def require_fields(record: object, fields: dict[str, type | tuple[type, ...]], path: Path, what: str) -> None:
    """``record`` is an object with every key of ``fields``, each of its type: a wrong type (a number where text is
    expected) fails here, naming the file and record, not later inside a tokenizer or a path template."""
    require_keys(record, tuple(fields), path, what)
    for key, expected in fields.items():
        value = record[key]
        if not isinstance(value, expected) or isinstance(value, bool):
            names = " or ".join(t.__name__ for t in (expected if isinstance(expected, tuple) else (expected,)))
            raise VlbenchError(f"{path}: {what} has {key}={value!r} ({type(value).__name__}), expected {names}")


def format_template(template: str, path: Path, what: str, **fields: object) -> str:
    """An image path from the data config's template; a value the template cannot take (``{image_id:012d}`` given
    text) or a field it names that the format lacks fails naming the file, the record and the template."""
    try:
        return template.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        problem = f"{type(e).__name__}: {e}"
        raise VlbenchError(f"{path}: {what} does not fit the image template {template!r} ({problem})") from e


def read_jsonl(path: Path, required: tuple[str, ...] = ()) -> list[dict]:
    """One JSON object per line (NLVR2); blank lines skipped; every record must carry ``required`` keys."""
    if not path.is_file():
        raise VlbenchError(f"{path}: file not found")
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise VlbenchError(f"{path}: line {number} is not valid JSON ({e.msg})") from e
            require_keys(record, required, path, f"line {number}")
            records.append(record)
    return records


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if absent) for the block: one process at a time.

    Why: jobs of a local sweep (joblib: independent processes, no process group) may need the same derived file at
    once, e.g. the region features every LXMERT job extracts on first use; two writers of one store would interleave
    its commits. The lock is released when the process dies, so a killed job never blocks the next."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
