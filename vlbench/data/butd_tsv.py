"""Bottom-up-attention / LXMERT region files (``.tsv``): read, write, and convert into a region store.

The format LXMERT distributes (Tan & Bansal 2019, features from Anderson et al. 2018's Faster R-CNN on Visual Genome):
tab-separated, no header, one image per line with the fields

    img_id  img_h  img_w  objects_id  objects_conf  attrs_id  attrs_conf  num_boxes  boxes  features

where the last six are base64 of raw little-endian numpy buffers: objects_id int64 (N,), objects_conf float32 (N,),
attrs_id int64 (N,), attrs_conf float32 (N,), boxes float32 (N, 4) in pixels (x1, y1, x2, y2), features float32 (N, D).
Lines are streamed (a COCO file is ~20 GB); a line that does not decode fails with its file and line number, and a
failed conversion leaves no store behind.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from vlbench.data.regions import LABEL_FIELDS, RegionFeatures, RegionStore, RegionStoreWriter, image_key
from vlbench.errors import VlbenchError

FIELDNAMES = (
    "img_id",
    "img_h",
    "img_w",
    "objects_id",
    "objects_conf",
    "attrs_id",
    "attrs_conf",
    "num_boxes",
    "boxes",
    "features",
)
# field → (dtype, values per box); features' values per box (D) is whatever the buffer holds.
BUFFER_FIELDS: dict[str, tuple[np.dtype, int | None]] = {
    "objects_id": (np.dtype("<i8"), 1),
    "objects_conf": (np.dtype("<f4"), 1),
    "attrs_id": (np.dtype("<i8"), 1),
    "attrs_conf": (np.dtype("<f4"), 1),
    "boxes": (np.dtype("<f4"), 4),
    "features": (np.dtype("<f4"), None),
}


@dataclass
class ButdRow:
    """One line of a BUTD/LXMERT tsv: boxes in pixels, features float32."""

    img_id: str
    img_h: int
    img_w: int
    objects_id: np.ndarray  # (N,) int64
    objects_conf: np.ndarray  # (N,) float32
    attrs_id: np.ndarray  # (N,) int64
    attrs_conf: np.ndarray  # (N,) float32
    boxes: np.ndarray  # (N, 4) float32, pixels x1, y1, x2, y2
    features: np.ndarray  # (N, D) float32

    @property
    def num_boxes(self) -> int:
        return len(self.boxes)

    def to_regions(self) -> RegionFeatures:
        """Boxes normalised by the image's width/height, as the store and LXMERT's position embedding want them."""
        scale = np.array([self.img_w, self.img_h, self.img_w, self.img_h], dtype=np.float32)
        return RegionFeatures(
            key=image_key(self.img_id),
            boxes=self.boxes / scale,
            features=self.features,
            object_ids=self.objects_id,
            object_conf=self.objects_conf,
            attr_ids=self.attrs_id,
            attr_conf=self.attrs_conf,
            img_h=self.img_h,
            img_w=self.img_w,
        )

    @classmethod
    def from_regions(cls, regions: RegionFeatures, img_id: str | None = None) -> ButdRow:
        """The tsv row of a store entry (for export): boxes back to pixels, features to float32."""
        scale = np.array([regions.img_w, regions.img_h, regions.img_w, regions.img_h], dtype=np.float32)
        return cls(
            img_id=img_id or regions.key,
            img_h=regions.img_h,
            img_w=regions.img_w,
            objects_id=regions.object_ids,
            objects_conf=regions.object_conf,
            attrs_id=regions.attr_ids,
            attrs_conf=regions.attr_conf,
            boxes=regions.boxes * scale,
            features=regions.features.astype(np.float32),
        )


def _decode_row(fields: list[bytes], where: str, feature_dim: int | None) -> ButdRow:
    if len(fields) != len(FIELDNAMES):
        raise VlbenchError(
            f"{where}: {len(fields)} tab-separated fields, expected {len(FIELDNAMES)} ({', '.join(FIELDNAMES)})"
            + (" (truncated line?)" if len(fields) < len(FIELDNAMES) else "")
        )
    values = dict(zip(FIELDNAMES, fields, strict=True))
    ints = {}
    for name in ("img_h", "img_w", "num_boxes"):
        try:
            ints[name] = int(values[name])
        except ValueError:
            text = values[name][:20].decode("ascii", errors="replace")
            raise VlbenchError(f"{where}: field {name} is not an integer ({text!r})") from None
    n = ints["num_boxes"]
    if n < 0 or ints["img_h"] <= 0 or ints["img_w"] <= 0:
        raise VlbenchError(f"{where}: img_h={ints['img_h']}, img_w={ints['img_w']}, num_boxes={n} out of range")
    arrays = {}
    for name, (dtype, per_box) in BUFFER_FIELDS.items():
        try:
            raw = base64.b64decode(values[name], validate=True)
        except binascii.Error as e:
            raise VlbenchError(f"{where}: field {name} is not valid base64 ({e}; truncated line?)") from None
        if per_box is None:  # features: D comes from the buffer, and must agree with the file's other lines
            if n == 0:
                per_box = feature_dim or 0
            elif len(raw) % (n * dtype.itemsize):
                raise VlbenchError(
                    f"{where}: field {name} holds {len(raw)} bytes, not a whole number of "
                    f"num_boxes={n} × {dtype.name} rows (truncated line, or num_boxes wrong?)"
                )
            else:
                per_box = len(raw) // (n * dtype.itemsize)
                if feature_dim is not None and per_box != feature_dim:
                    raise VlbenchError(f"{where}: features are {per_box}-d, earlier lines were {feature_dim}-d")
        expected = n * per_box * dtype.itemsize
        if len(raw) != expected:
            raise VlbenchError(
                f"{where}: field {name} holds {len(raw)} bytes, expected num_boxes={n} × {per_box} {dtype.name} = "
                f"{expected} (truncated line, or num_boxes wrong?)"
            )
        array = np.frombuffer(raw, dtype=dtype)
        arrays[name] = array.reshape(n, per_box) if name in ("boxes", "features") else array
    try:
        img_id = values["img_id"].decode()
    except UnicodeDecodeError:
        raise VlbenchError(f"{where}: img_id is not UTF-8 text (not a BUTD/LXMERT tsv?)") from None
    return ButdRow(img_id=img_id, img_h=ints["img_h"], img_w=ints["img_w"], **arrays)


def _iter_rows(path: Path, skip: frozenset[str]) -> Iterator[tuple[int, int, ButdRow | None]]:
    """(line number, bytes read, row). Lines are split by hand rather than by ``csv``: no field is ever quoted, and
    reading bytes gives exact line numbers and progress (a text-mode csv reader cannot ``tell``)."""
    feature_dim = None
    if not path.is_file():
        raise VlbenchError(f"{path}: tsv file not found")
    with open(path, "rb") as f:
        for line_num, line in enumerate(f, start=1):
            fields = line.rstrip(b"\r\n").split(b"\t")
            if fields == [b""]:
                continue
            if skip and image_key(fields[0].decode(errors="replace")) in skip:
                yield line_num, len(line), None
                continue
            row = _decode_row(fields, f"{path}:{line_num}", feature_dim)
            if row.num_boxes:
                feature_dim = row.features.shape[1]
            yield line_num, len(line), row


def iter_tsv(path: str | Path) -> Iterator[ButdRow]:
    """Stream the rows of one tsv file (a COCO file does not fit in memory)."""
    for _, _, row in _iter_rows(Path(path), frozenset()):
        yield row


def _encode(array: np.ndarray, dtype: np.dtype) -> str:
    return base64.b64encode(np.ascontiguousarray(array, dtype=dtype).tobytes()).decode("ascii")


def write_tsv(path: str | Path, rows: Iterable[ButdRow]) -> None:
    """Write rows in LXMERT's layout (for test fixtures and for exporting a store to other code bases)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "w", newline="") as f:
        for row in rows:
            n = row.num_boxes
            fields = [row.img_id, str(row.img_h), str(row.img_w)]
            for name, (dtype, _) in BUFFER_FIELDS.items():
                if name == "boxes":
                    fields.append(str(n))  # num_boxes sits just before the boxes
                fields.append(_encode(getattr(row, name), dtype))
            f.write("\t".join(fields) + "\n")
    os.replace(tmp, path)


def convert_tsv_to_store(
    tsv_paths: Sequence[str | Path], store_path: str | Path, progress: bool = True, resume: bool = True
) -> RegionStore:
    """Convert one or more tsv files into one store. Bad input leaves nothing behind; an interrupt resumes."""
    tsv_paths = [Path(p) for p in tsv_paths]
    for p in tsv_paths[1:]:
        if not p.is_file():
            raise VlbenchError(f"{p}: tsv file not found")
    first = next((row for row in iter_tsv(tsv_paths[0]) if row.num_boxes), None)
    if first is None:
        raise VlbenchError(f"{tsv_paths[0]}: no line with boxes (empty file?)")
    writer = RegionStoreWriter(
        store_path,
        first.features.shape[1],
        source="butd-tsv",
        backbone="faster-rcnn (BUTD)",
        settings={"tsv": [str(p.resolve()) for p in tsv_paths]},
        resume=resume,
    )
    done = writer.done_keys()  # resumed: already converted, not decoded again
    bar = tqdm(total=sum(p.stat().st_size for p in tsv_paths), unit="B", unit_scale=True, disable=not progress)
    try:
        with writer:
            for path in tsv_paths:
                for line_num, size, row in _iter_rows(path, done):
                    bar.update(size)
                    if row is None:
                        continue
                    regions = row.to_regions()
                    if regions.key in writer:
                        raise VlbenchError(f"{path}:{line_num}: image {row.img_id!r} appears twice")
                    labels = {name: getattr(regions, name) for name in LABEL_FIELDS}
                    writer.add(regions.key, regions.features, regions.boxes, regions.img_h, regions.img_w, **labels)
    except VlbenchError:
        writer.abort()
        raise
    finally:
        bar.close()
    return RegionStore(store_path)
