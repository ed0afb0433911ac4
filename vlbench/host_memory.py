"""Keep freed CPU memory in the process instead of handing it back to the kernel after every training step.

Why: PyTorch's CPU tensors come from ``malloc``. glibc serves blocks above its mmap threshold with fresh ``mmap``
pages and trims the top of its heap once more than a few MiB lie free there, so a training step's activations,
freed at the end of the step, go back to the kernel and the next step faults every one of their pages in again
(zeroed by the kernel). glibc's thresholds adapt to a process's pattern; for ALBEF, LXMERT and UNIMO-3 they mostly
do, for Pixel-BERT's convolution and BatchNorm buffers they do not. Measured on the tiny VQA runs (2 threads, AMD
EPYC, docs/PERFORMANCE.md): Pixel-BERT ~16,800 page faults a step and 47 s of kernel time in a 197 s run; with the
settings below 1.9 s and 174 s (its step 121-130 → 96-109 ms). The numbers stay the same bit for bit (the allocator
changes where tensors lie, not what is computed; torch aligns every block to 64 bytes either way): losses, gradient
norms, predictions and weights of all four models' runs equal with and without. The price: the process keeps its
peak heap resident (Pixel-BERT tiny: 1.43 vs 1.26 GB peak RSS).

``mallopt`` settings (glibc only; elsewhere nothing changes and ``keep_freed_memory`` says so):
- ``M_MMAP_THRESHOLD`` 1 GiB: blocks up to that size come from the heap and are reused (base-scale activations are
  tens to hundreds of MiB); a glibc that refuses more than 32 MiB (older ones: half its arena size) gets 32 MiB;
- ``M_TRIM_THRESHOLD`` 2 GiB - 1 (``mallopt`` takes an int): the heap's free top is given back only beyond that.
Forked processes (the data loader's workers) inherit the settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLDS = (2**30, 32 * 1024 * 1024)  # the first glibc takes
TRIM_THRESHOLD = 2**31 - 1

_applied: int | None = None


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (musl has mallopt as a no-op, and no gnu_get_libc_version)
        return libc
    except (OSError, AttributeError):
        return None


def keep_freed_memory() -> int:
    """Apply the settings above to this process (once); the largest block size kept in the heap, in bytes (0: the
    settings could not be applied here)."""
    global _applied
    if _applied is None:
        _applied = 0
        libc = _glibc()
        if libc is not None and libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1:
            _applied = next((size for size in MMAP_THRESHOLDS if libc.mallopt(M_MMAP_THRESHOLD, size) == 1), 0)
    return _applied
