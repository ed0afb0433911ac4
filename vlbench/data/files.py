"""Reading official annotation files with one-line errors that name the file and what was expected."""

from __future__ import annotations

import json
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
