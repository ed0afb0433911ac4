"""Reading checkpoint files from anywhere without ever running code from them; every failure is one line.

Why: a torch ``.pt``/``.pth``/``.bin`` file is a pickle, and unpickling may call any function (``os.system``), so a
checkpoint from a paper's page or a colleague's disk is code unless it is read as data. Our own weights are
safetensors (tensors and a JSON header, nothing executable); torch files are read only with
``torch.load(weights_only=True)``, whose unpickler builds tensors, numbers, strings and plain containers and refuses
anything else (a global to import, a function to call) before running it. A truncated copy or a file of another format
fails with the file and what was expected, never with a library's traceback.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, load_model
from torch import nn

from vlbench.errors import VlbenchError

_LISTED = 8  # keys named in an error before "... and N more"
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default (zip) format
_PICKLE_PROTO = 0x80  # a pickle's first opcode (torch's legacy format, plain pickle.dump)


def _first_line(error: BaseException, limit: int = 300) -> str:
    """A library's (often multi-line) message as one line: its first paragraph, whitespace collapsed, capped."""
    text = " ".join(str(error).split("\n\n")[0].split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def key_listing(keys: list[str]) -> str:
    """Keys for an error line: the first few, then how many more."""
    shown = ", ".join(keys[:_LISTED])
    return shown + (f" ... and {len(keys) - _LISTED} more" if len(keys) > _LISTED else "")


def key_problems(missing: list[str], unexpected: list[str], wrong_shape: list[str] | None = None) -> list[str]:
    """The parts of a key-mismatch message (resume and init_from word them alike), empty when the keys agree."""
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {key_listing(missing)}")
    if unexpected:
        problems.append(f"not in this model: {key_listing(unexpected)}")
    if wrong_shape:
        problems.append(f"shape differs (checkpoint vs model): {key_listing(wrong_shape)}")
    return problems


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a complete safetensors file, judged from its header alone; None when it looks whole.

    The format is an 8-byte little-endian header length, a JSON header giving each tensor's byte range, then the
    data: a file shorter than its header says was cut (an interrupted save or copy)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if head.startswith(_ZIP_MAGIC) or (head[:1] and head[0] == _PICKLE_PROTO):
            return "a torch/pickle file, not safetensors (pickles can run code: only safetensors are read here)"
        if len(head) < 8:
            return f"not a safetensors file ({size} bytes, shorter than its 8-byte header length)"
        (header_len,) = struct.unpack("<Q", head)
        if header_len > size - 8:
            return f"truncated or not safetensors (its header length says {header_len} bytes, the file has {size})"
        try:
            header = json.loads(f.read(header_len))
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return "not a safetensors file (its header is not the expected JSON)"
    expected = 8 + header_len + max(ends, default=0)
    if size < expected:
        return f"truncated: {size} of the {expected} bytes its header describes (an interrupted save or copy?)"
    return None


def _safetensors_error(path: Path, source: str, error: BaseException) -> VlbenchError:
    try:
        problem = safetensors_problem(path)
    except OSError as e:
        problem = f"unreadable ({e.strerror or e})"
    return VlbenchError(f"{source}: {problem or f'not a readable safetensors file ({_first_line(error)})'}")


def read_safetensors(path: Path, source: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, on the CPU. ``source`` starts the error line (e.g. ``init_from=<path>``)."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise _safetensors_error(Path(path), source, e) from e


def read_safetensors_metadata(path: Path, source: str) -> dict[str, str]:
    """A safetensors file's string metadata, from its header alone (cheap); a cut or foreign file fails in one line."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as e:
        raise _safetensors_error(Path(path), source, e) from e


def load_safetensors_into(module: nn.Module, path: Path, source: str) -> None:
    """``module``'s tensors from a safetensors file it wrote, strictly: a checkpoint of another model or config
    fails naming the missing, unexpected and reshaped keys (tied tensors, stored once, are matched as saved)."""
    try:
        missing, unexpected = load_model(module, path, strict=False)
    except (SafetensorError, OSError) as e:
        raise _safetensors_error(Path(path), source, e) from e
    except RuntimeError as e:  # load_state_dict's "size mismatch for <key>: ..." (several lines)
        raise VlbenchError(f"{source}: tensors of another shape than this model's ({_first_line(e)})") from e
    problems = key_problems(sorted(missing), sorted(unexpected))
    if problems:
        raise VlbenchError(f"{source}: not a checkpoint of this model ({'; '.join(problems)})")


def _refused_imports(path: Path) -> list[str]:
    """The globals a torch file's pickle would import that ``weights_only`` does not allow (static scan, no
    unpickling); empty when torch cannot tell (e.g. a plain pickle rather than a torch zip file)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # the scan is only for the message; any format it cannot read just gets the generic line
        return []


def read_torch_file(path: Path, source: str) -> object:
    """A torch-serialised file read as data only (``torch.load(weights_only=True)``, on the CPU); a pickle that
    asks for anything but tensors and plain containers is refused before any of it runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():  # not a refusal: bytes that are no pickle at all
            raise VlbenchError(f"{source}: not a readable torch file ({_first_line(e)})") from e
        imports = _refused_imports(Path(path))
        wants = f"imports {', '.join(imports)}" if imports else "holds objects other than tensors and plain containers"
        raise VlbenchError(
            f"{source}: refused: its pickle {wants}, which could run code; torch files are read as data only "
            "(torch.load weights_only=True): re-save the tensors as .safetensors where you trust the file"
        ) from e
    except (RuntimeError, OSError, EOFError, ValueError) as e:  # a cut zip archive, an empty file, ...
        raise VlbenchError(f"{source}: not a readable torch file, truncated or corrupt ({_first_line(e)})") from e


def read_checkpoint(path: Path, source: str) -> object:
    """A ``.safetensors`` file's tensors, or any other file read as a torch file (data only)."""
    if Path(path).suffix == ".safetensors":
        return read_safetensors(path, source)
    return read_torch_file(path, source)
