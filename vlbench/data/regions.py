"""The region-feature store: per-image detector regions (boxes, features, labels) for region models (LXMERT).

A store is a folder of flat ``.npy`` arrays concatenated over images, so one image is one contiguous slice:

    meta.json         format, version, feature_dim, max_boxes, num_images, num_boxes, source, backbone, settings,
                      fingerprint (content hash: independent of write order, of where the data came from)
    keys.json         image keys, in write order
    index.npy         (num_images, 4) int64: offset, count, img_h, img_w
    features.npy      (num_boxes, D) float16      (fp16 halves disk and page cache; BUTD features lose nothing that
                                                    a model learns from)
    boxes.npy         (num_boxes, 4) float32      x1, y1, x2, y2 normalised to [0, 1] by the image's width/height
    object_ids.npy    (num_boxes,) int64          detector/scene-graph class, -1 = none
    object_conf.npy   (num_boxes,) float32
    attr_ids.npy      (num_boxes,) int64          -1 = none
    attr_conf.npy     (num_boxes,) float32
    *_vocab.txt       optional: the label vocabularies the ids index

Why this shape: random access is one ``pread`` of one contiguous slice (no HDF5 chunk cache, no per-image files), the
arrays open with plain ``np.load(mmap_mode="r")``, and DataLoader workers share the page cache.

Writing goes to ``<store>.partial/`` and is committed in steps (data appended and fsynced, then a progress marker
replaced atomically), so an interrupted extraction resumes from the last commit; ``finish`` writes the ``.npy`` headers
and the index, then renames the folder: nothing partial ever appears under the final name.

Image keys are strings; COCO file names map to the COCO image id (``COCO_val2014_000000000042`` → ``"42"``) so a
store built from LXMERT's tsv files and one extracted from a folder of COCO images answer the same keys as the VQA
question files (which name images by integer id). GQA's ``imageId`` strings are kept as they are.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import struct
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlbench.errors import VlbenchError

STORE_FORMAT = "vlbench-regions"
STORE_VERSION = 1
NPY_HEADER_BYTES = 128  # fixed, so data can be appended before the final shape is known
PROGRESS_FILE = "progress.json"
PARTIAL_INDEX_FILE = "index.partial.jsonl"
LABEL_FIELDS = ("object_ids", "object_conf", "attr_ids", "attr_conf")
# torch runs copies of fewer elements than its parallel grain size inline; converting one image's features in
# such chunks avoids waking the intra-op thread pool per sample (4× slower on 2 busy cores, measured).
_TORCH_GRAIN_SIZE = 32768

_COCO_NAME = re.compile(r"^COCO_[A-Za-z]+\d*_(\d+)$")


def image_key(name: str | int) -> str:
    """The store key of an image: COCO file stems become the integer image id, anything else is kept as a string."""
    if isinstance(name, int):
        return str(name)
    match = _COCO_NAME.match(name)
    return str(int(match.group(1))) if match else name


def array_specs(feature_dim: int) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Each stored array's dtype and per-box shape (little-endian, so stores are portable)."""
    return {
        "features": (np.dtype("<f2"), (feature_dim,)),
        "boxes": (np.dtype("<f4"), (4,)),
        "object_ids": (np.dtype("<i8"), ()),
        "object_conf": (np.dtype("<f4"), ()),
        "attr_ids": (np.dtype("<i8"), ()),
        "attr_conf": (np.dtype("<f4"), ()),
    }


@dataclass
class RegionFeatures:
    """One image's regions. Boxes are normalised (x1, y1, x2, y2) in [0, 1], so models never need the image size."""

    key: str
    boxes: np.ndarray  # (N, 4) float32
    features: np.ndarray  # (N, D) float32 or float16
    object_ids: np.ndarray  # (N,) int64, -1 = no label
    object_conf: np.ndarray  # (N,) float32
    attr_ids: np.ndarray  # (N,) int64, -1 = no label
    attr_conf: np.ndarray  # (N,) float32
    img_h: int
    img_w: int

    @property
    def num_boxes(self) -> int:
        return len(self.boxes)


def unlabelled(num_boxes: int) -> dict[str, np.ndarray]:
    """Label arrays for boxes without detector labels (grid or user boxes)."""
    return {
        "object_ids": np.full(num_boxes, -1, np.int64),
        "object_conf": np.zeros(num_boxes, np.float32),
        "attr_ids": np.full(num_boxes, -1, np.int64),
        "attr_conf": np.zeros(num_boxes, np.float32),
    }


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """A version-1.0 .npy header padded to NPY_HEADER_BYTES (np.load accepts any padded length)."""
    text = repr({"descr": dtype.str, "fortran_order": False, "shape": tuple(shape)})
    body = text.ljust(NPY_HEADER_BYTES - 10 - 1) + "\n"
    header = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(body)) + body.encode("latin1")
    assert len(header) == NPY_HEADER_BYTES, "shape too long for the fixed .npy header"
    return header


def _write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RegionStore(Mapping[str, RegionFeatures]):
    """Read-only random access to a store: ``store[key] -> RegionFeatures``, ``len``, ``keys``, ``in``.

    ``features_dtype`` picks what ``features`` come back as: ``float32`` (what models eat) or ``float16`` (half the
    copy, for collates that convert on the device). Picklable, so DataLoader workers reopen it themselves.
    """

    def __init__(self, path: str | Path, features_dtype: str = "float32"):
        self.path = Path(path)
        if features_dtype not in ("float32", "float16"):
            raise VlbenchError(f"{self.path}: features_dtype must be float32 or float16, got {features_dtype!r}")
        self.features_dtype = features_dtype
        self.meta = self._read_meta()
        self.feature_dim: int = self.meta["feature_dim"]
        self._open_arrays()

    def _fail(self, what: str) -> VlbenchError:
        return VlbenchError(f"region store {self.path}: {what}")

    def _read_meta(self) -> dict:
        if not self.path.is_dir():
            partial = self.path.with_name(self.path.name + ".partial")
            hint = f" (an unfinished write is in {partial}: rerun it to resume)" if partial.is_dir() else ""
            raise self._fail(f"not found{hint}")
        if (self.path / PROGRESS_FILE).exists():
            raise self._fail("is an unfinished write (progress.json present): rerun the command to resume it")
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise self._fail("not a region store (no meta.json)")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise self._fail(f"meta.json is not valid JSON ({e})") from e
        if meta.get("format") != STORE_FORMAT:
            raise self._fail(f"meta.json format is {meta.get('format')!r}, expected {STORE_FORMAT!r}")
        if meta.get("version") != STORE_VERSION:
            raise self._fail(f"store version {meta.get('version')} is not supported (this code reads {STORE_VERSION})")
        return meta

    def _open_arrays(self) -> None:
        try:
            keys = json.loads((self.path / "keys.json").read_text())
            index = np.load(self.path / "index.npy")
        except (OSError, ValueError) as e:
            raise self._fail(f"index unreadable ({e})") from e
        if index.ndim != 2 or index.shape != (len(keys), 4):
            raise self._fail(f"index.npy has shape {index.shape}, expected ({len(keys)}, 4) for {len(keys)} keys")
        offsets, counts = index[:, 0], index[:, 1]
        total = int(counts.sum())
        expected_offsets = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(keys) else offsets
        if (counts < 0).any() or not np.array_equal(offsets, expected_offsets):
            raise self._fail("index is inconsistent (offsets are not the running sum of box counts)")
        if total != self.meta["num_boxes"] or len(keys) != self.meta["num_images"]:
            raise self._fail(
                f"index holds {len(keys)} images / {total} boxes, meta.json says "
                f"{self.meta['num_images']} / {self.meta['num_boxes']}"
            )
        self._rows = {key: i for i, key in enumerate(keys)}
        if len(self._rows) != len(keys):
            raise self._fail("keys.json has duplicate keys")
        self._keys: list[str] = keys
        self._index = index.tolist()  # python ints: cheaper to index per sample than numpy scalars
        self._arrays: dict[str, np.ndarray] = {}
        for name, (dtype, shape) in array_specs(self.feature_dim).items():
            file = self.path / f"{name}.npy"
            try:
                array = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as e:
                raise self._fail(f"{name}.npy unreadable ({e})") from e
            if array.dtype != dtype or array.shape != (total, *shape):
                raise self._fail(
                    f"{name}.npy is {array.dtype} {list(array.shape)}, index and meta.json expect "
                    f"{dtype} {[total, *shape]}"
                )
            # A plain ndarray view: slicing an np.memmap goes through its subclass hooks (slow per sample).
            self._arrays[name] = np.asarray(array)
        # Features are read with one pread per image: on a cold page cache that is 2× faster than mmap page faults.
        with open(self.path / "features.npy", "rb") as f:
            np.lib.format.read_magic(f)
            np.lib.format.read_array_header_1_0(f)
            self._features_offset = f.tell()
        self._features_fd = os.open(self.path / "features.npy", os.O_RDONLY)
        self._row_bytes = 2 * self.feature_dim

    def __getstate__(self) -> dict:
        return {"path": self.path, "features_dtype": self.features_dtype}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["features_dtype"])

    def __del__(self) -> None:
        fd = getattr(self, "_features_fd", None)
        if fd is not None:
            os.close(fd)

    def __len__(self) -> int:
        return len(self._keys)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str | int) and image_key(key) in self._rows

    @property
    def max_boxes(self) -> int:
        return self.meta["max_boxes"]

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    def vocab(self, name: str) -> list[str] | None:
        """The label names that ``object_ids`` (name="objects") or ``attr_ids`` ("attributes") index, if stored."""
        path = self.path / f"{name}_vocab.txt"
        return path.read_text().splitlines() if path.is_file() else None

    def _row(self, key: str | int) -> int:
        row = self._rows.get(key) if isinstance(key, str) else None
        if row is None:
            row = self._rows.get(image_key(key))
            if row is None:
                examples = ", ".join(repr(k) for k in self._keys[:3])
                raise self._fail(f"no regions for image key {key!r} ({len(self)} images, e.g. {examples})")
        return row

    def read_features(self, key: str | int) -> torch.Tensor:
        """Only the (N, D) features as a tensor in ``features_dtype``: the hot path of a region model's loader."""
        offset, count, _, _ = self._index[self._row(key)]
        return self._read_features(key, offset, count)

    def _read_features(self, key: str | int, offset: int, count: int) -> torch.Tensor:
        raw = np.empty((count, self.feature_dim), np.float16)
        got = os.preadv(self._features_fd, [raw], self._features_offset + offset * self._row_bytes)
        if got != raw.nbytes:
            raise self._fail(f"features.npy is truncated (image {key!r} needs {raw.nbytes} bytes, read {got})")
        features = torch.from_numpy(raw)
        if self.features_dtype == "float16":
            return features
        out = torch.empty(features.shape, dtype=torch.float32)
        step = max(1, _TORCH_GRAIN_SIZE // max(1, self.feature_dim))
        for start in range(0, count, step):
            out[start : start + step].copy_(features[start : start + step])
        return out

    def __getitem__(self, key: str | int) -> RegionFeatures:
        row = self._row(key)
        offset, count, img_h, img_w = self._index[row]
        end = offset + count
        labels = {name: self._arrays[name][offset:end].copy() for name in LABEL_FIELDS}
        return RegionFeatures(
            key=self._keys[row],
            boxes=self._arrays["boxes"][offset:end].copy(),
            features=self._read_features(key, offset, count).numpy(),
            img_h=img_h,
            img_w=img_w,
            **labels,
        )

    def summary(self) -> str:
        """One line for CLIs and logs."""
        return (
            f"{self.path}: {len(self)} images, {self.meta['num_boxes']} boxes (max {self.max_boxes}/image), "
            f"D={self.feature_dim}, source {self.meta.get('source')}, fingerprint {self.fingerprint}"
        )


def require_feature_dim(store: RegionStore, expected: int, what: str) -> None:
    """Fail at start, naming the store and the config key, when a model's feature size differs from the store's."""
    if store.feature_dim != expected:
        raise VlbenchError(
            f"region store {store.path} holds {store.feature_dim}-d features but {what}={expected}: "
            f"set {what}={store.feature_dim} or point at a store extracted with a matching backbone"
        )


def pad_regions(regions: Sequence[RegionFeatures], max_boxes: int) -> dict[str, torch.Tensor]:
    """Collate images with different box counts into (B, K, ...) tensors plus a (B, K) mask; extra boxes are dropped.

    BUTD/LXMERT files keep boxes in detector-confidence order, so dropping the tail keeps the most confident ones.
    """
    if not regions:
        raise ValueError("pad_regions needs at least one image")
    batch, dim = len(regions), regions[0].features.shape[1]
    features_dtype = torch.from_numpy(regions[0].features[:0]).dtype
    out = {
        "features": torch.zeros(batch, max_boxes, dim, dtype=features_dtype),  # (B, K, D)
        "boxes": torch.zeros(batch, max_boxes, 4),  # (B, K, 4)
        "mask": torch.zeros(batch, max_boxes, dtype=torch.bool),  # (B, K), True = a real box
        "object_ids": torch.full((batch, max_boxes), -1, dtype=torch.long),
        "object_conf": torch.zeros(batch, max_boxes),
        "attr_ids": torch.full((batch, max_boxes), -1, dtype=torch.long),
        "attr_conf": torch.zeros(batch, max_boxes),
    }
    for i, r in enumerate(regions):
        n = min(r.num_boxes, max_boxes)
        out["mask"][i, :n] = True
        for name in ("features", "boxes", *LABEL_FIELDS):
            out[name][i, :n] = torch.from_numpy(np.ascontiguousarray(getattr(r, name)[:n]))
    return out


class RegionStoreWriter:
    """Appends images to ``<path>.partial/``; ``finish`` makes the store appear at ``path`` in one rename.

    Resumable: with ``resume=True`` an existing partial folder written with the same ``feature_dim``/``source``/
    ``backbone``/``settings`` is continued from its last commit (``key in writer`` says what is done). Used as a context
    manager, a clean exit finishes the store and an exception commits what was added and leaves the partial folder.
    """

    def __init__(
        self,
        path: str | Path,
        feature_dim: int,
        *,
        source: str,
        backbone: str | None = None,
        settings: dict | None = None,
        resume: bool = True,
        commit_every: int = 256,
    ):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.feature_dim = feature_dim
        self.commit_every = commit_every
        self.specs = array_specs(feature_dim)
        self.params = {"feature_dim": feature_dim, "source": source, "backbone": backbone, "settings": settings or {}}
        if self.path.exists():
            raise VlbenchError(f"{self.path}: already exists (delete it to write the store again)")
        self._buffer: list[tuple[str, int, int, dict[str, np.ndarray]]] = []
        self._keys: set[str] = set()
        self._num_boxes = 0
        self._max_boxes = 0
        self._digest_sum = 0
        self._closed = False
        if self.partial.exists() and resume and (self.partial / PROGRESS_FILE).is_file():
            self._resume()
        else:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial.mkdir(parents=True)
            for name in self.specs:
                (self.partial / f"{name}.npy").write_bytes(b"\0" * NPY_HEADER_BYTES)
            (self.partial / PARTIAL_INDEX_FILE).write_bytes(b"")
            self._write_progress()
        self.resumed_images = len(self._keys)

    def _fail(self, what: str) -> VlbenchError:
        return VlbenchError(f"{self.partial}: {what}")

    def _resume(self) -> None:
        progress = json.loads((self.partial / PROGRESS_FILE).read_text())
        if progress["params"] != json.loads(json.dumps(self.params)):
            raise self._fail(
                "an unfinished write with different settings is in the way "
                f"(it has {progress['params']}); delete the folder to start again"
            )
        num_images, num_boxes = progress["num_images"], progress["num_boxes"]
        # Drop whatever an interrupted commit appended after the last progress marker.
        for name, (dtype, shape) in self.specs.items():
            file = self.partial / f"{name}.npy"
            size = NPY_HEADER_BYTES + num_boxes * dtype.itemsize * int(np.prod(shape, dtype=np.int64))
            if file.stat().st_size < size:
                raise self._fail(f"{name}.npy is shorter than its progress marker says; delete the folder to restart")
            os.truncate(file, size)
        lines = (self.partial / PARTIAL_INDEX_FILE).read_text().splitlines()[:num_images]
        if len(lines) < num_images:
            raise self._fail("index is shorter than its progress marker says; delete the folder to restart")
        (self.partial / PARTIAL_INDEX_FILE).write_text("".join(line + "\n" for line in lines))
        for line in lines:
            key, _, _, count = json.loads(line)
            self._keys.add(key)
            self._max_boxes = max(self._max_boxes, count)
        self._num_boxes = num_boxes
        self._digest_sum = int(progress["digest_sum"], 16)

    def _write_progress(self) -> None:
        _write_json_atomic(
            self.partial / PROGRESS_FILE,
            {
                "params": self.params,
                "num_images": len(self._keys),
                "num_boxes": self._num_boxes,
                "digest_sum": f"{self._digest_sum:064x}",
            },
        )

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str | int) and image_key(key) in self._keys

    def __len__(self) -> int:
        return len(self._keys)

    def done_keys(self) -> frozenset[str]:
        """Keys already added (after a resume: those of the interrupted run)."""
        return frozenset(self._keys)

    def write_text(self, name: str, text: str) -> None:
        """A small side file stored with the arrays (e.g. ``objects_vocab.txt``)."""
        (self.partial / name).write_text(text)

    def add(
        self,
        key: str | int,
        features: np.ndarray,
        boxes: np.ndarray,
        img_h: int,
        img_w: int,
        object_ids: np.ndarray | None = None,
        object_conf: np.ndarray | None = None,
        attr_ids: np.ndarray | None = None,
        attr_conf: np.ndarray | None = None,
    ) -> None:
        """Add one image: features (N, D), boxes (N, 4) normalised to [0, 1], optional (N,) labels."""
        if self._closed:
            raise RuntimeError("writer is closed")
        key = image_key(key)
        if key in self._keys:
            raise VlbenchError(f"{self.path}: image key {key!r} added twice")
        features = np.asarray(features)
        boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
        n = len(boxes)
        if features.shape != (n, self.feature_dim):
            raise VlbenchError(
                f"{self.path}: image {key!r} has features {list(features.shape)}, expected [{n}, {self.feature_dim}]"
            )
        if n and not (np.isfinite(boxes).all() and boxes.min() >= -1e-3 and boxes.max() <= 1 + 1e-3):
            raise VlbenchError(
                f"{self.path}: image {key!r} boxes must be normalised to [0, 1] "
                f"(got range {boxes.min():.4g}..{boxes.max():.4g}; pixels?)"
            )
        with np.errstate(over="ignore"):  # overflow is reported below, as an error naming the image
            arrays = {"features": features.astype(np.float16), "boxes": np.clip(boxes, 0.0, 1.0)}
        if not np.isfinite(arrays["features"]).all():
            raise VlbenchError(f"{self.path}: image {key!r} features are not finite in float16 (|x| > 65504 or NaN)")
        given = {"object_ids": object_ids, "object_conf": object_conf, "attr_ids": attr_ids, "attr_conf": attr_conf}
        defaults = unlabelled(n)
        for name, value in given.items():
            value = defaults[name] if value is None else np.asarray(value).reshape(-1)
            if len(value) != n:
                raise VlbenchError(f"{self.path}: image {key!r} has {len(value)} {name} for {n} boxes")
            arrays[name] = value
        arrays = {name: np.ascontiguousarray(arrays[name], dtype=dtype) for name, (dtype, _) in self.specs.items()}
        digest = hashlib.sha256(json.dumps([key, int(img_h), int(img_w)]).encode())
        for name in self.specs:
            digest.update(arrays[name].tobytes())
        # A sum of per-image hashes: the fingerprint is the same whatever order images were written (or resumed) in.
        self._digest_sum = (self._digest_sum + int.from_bytes(digest.digest(), "big")) % (1 << 256)
        self._keys.add(key)
        self._buffer.append((key, int(img_h), int(img_w), arrays))
        if len(self._buffer) >= self.commit_every:
            self.commit()

    def commit(self) -> None:
        """Make everything added so far durable and resumable."""
        if not self._buffer:
            return
        for name in self.specs:
            with open(self.partial / f"{name}.npy", "ab") as f:
                for _, _, _, arrays in self._buffer:
                    f.write(arrays[name].tobytes())
                f.flush()
                os.fsync(f.fileno())
        with open(self.partial / PARTIAL_INDEX_FILE, "a") as f:
            for key, img_h, img_w, arrays in self._buffer:
                count = len(arrays["boxes"])
                f.write(json.dumps([key, img_h, img_w, count]) + "\n")
                self._num_boxes += count
                self._max_boxes = max(self._max_boxes, count)
            f.flush()
            os.fsync(f.fileno())
        self._buffer.clear()
        self._write_progress()

    def finish(self) -> RegionStore:
        """Write headers, index and meta.json, then rename the folder to its final name."""
        self.commit()
        self._closed = True
        for name, (dtype, shape) in self.specs.items():
            with open(self.partial / f"{name}.npy", "r+b") as f:
                f.write(_npy_header(dtype, (self._num_boxes, *shape)))
                f.flush()
                os.fsync(f.fileno())
        keys, index, offset = [], [], 0
        for line in (self.partial / PARTIAL_INDEX_FILE).read_text().splitlines():
            key, img_h, img_w, count = json.loads(line)
            keys.append(key)
            index.append((offset, count, img_h, img_w))
            offset += count
        np.save(self.partial / "index.npy", np.array(index, dtype=np.int64).reshape(-1, 4))
        _write_json_atomic(self.partial / "keys.json", keys)
        content = json.dumps([self.feature_dim, f"{self._digest_sum:064x}"])
        meta = {
            "format": STORE_FORMAT,
            "version": STORE_VERSION,
            "num_images": len(keys),
            "num_boxes": self._num_boxes,
            "max_boxes": self._max_boxes,
            **self.params,
            "fingerprint": hashlib.sha256(content.encode()).hexdigest()[:16],
        }
        _write_json_atomic(self.partial / "meta.json", meta)
        (self.partial / PROGRESS_FILE).unlink()
        (self.partial / PARTIAL_INDEX_FILE).unlink()
        _fsync_dir(self.partial)
        if self.path.exists():
            raise VlbenchError(f"{self.path}: appeared while writing; the finished store is left in {self.partial}")
        os.rename(self.partial, self.path)
        _fsync_dir(self.path.parent)
        return RegionStore(self.path)

    def abort(self) -> None:
        """Discard the partial folder (for bad input, where resuming would only meet the same error)."""
        self._closed = True
        self._buffer.clear()
        shutil.rmtree(self.partial, ignore_errors=True)

    def __enter__(self) -> RegionStoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._closed:
            return
        if exc_type is None:
            self.finish()
        else:
            # Keep what was added resumable; a failure here (disk full) must not hide the original exception.
            with contextlib.suppress(OSError):
                self.commit()
            self._closed = True


def write_random_store(path: str | Path, num_images: int, num_boxes: int = 36, feature_dim: int = 2048) -> RegionStore:
    """A store of random BUTD-shaped regions (default 36 × 2048), for loader benchmarks without real data."""
    rng = np.random.default_rng(0)
    with RegionStoreWriter(path, feature_dim, source=f"random:{num_images}x{num_boxes}x{feature_dim}") as writer:
        for i in range(num_images):
            corners = rng.random((num_boxes, 2, 2), dtype=np.float32)
            boxes = np.concatenate([corners.min(1), corners.max(1)], axis=1)
            features = rng.standard_normal((num_boxes, feature_dim), dtype=np.float32)
            writer.add(str(i), features, boxes, img_h=480, img_w=640)
    return RegionStore(path)


def evict_from_page_cache(store: RegionStore) -> None:
    """Ask the kernel to drop the store's cached pages, so the next reads measure the disk (Linux; best effort)."""
    for file in store.path.glob("*.npy"):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def benchmark_random_access(store: RegionStore, keys: Sequence[str]) -> float:
    """Samples/s reading ``keys`` in order from one process: each image fully read, features as a tensor."""
    start = time.perf_counter()
    for key in keys:
        regions = store[key]
        torch.from_numpy(regions.features)
    return len(keys) / (time.perf_counter() - start)
