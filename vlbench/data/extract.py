"""Region features from images: a timm CNN's last feature map, RoIAlign over given boxes, mean over the RoI grid.

Why not a detector: BUTD's Faster R-CNN (Anderson et al. 2018) is Caffe-era and needs Visual Genome weights; for the
benchmark's controlled comparisons a region model needs *some* region features on *any* image set (the synthetic
world, a new dataset). So boxes come from elsewhere and only pooling is ours:

- ``gt:SCENEGRAPHS.json`` — GQA-shaped scene graphs ({imageId: {width, height, objects: {id: {name, x, y, w, h,
  attributes}}}}); labels are the names' indices in ``objects_vocab.txt`` / ``attributes_vocab.txt`` beside the file
  (one label a line, comma-separated synonyms, as BUTD's vocabularies), else in the sorted names of the file; conf 1.0.
- ``grid:K`` — a K×K grid over the whole image (``grid:6`` gives BUTD's 36 boxes per image), no labels.
- ``file:BOXES.json`` — {image key: [[x1, y1, x2, y2], ...]} in pixels of the original image, no labels.

Choices the BUTD recipe leaves to us: images are resized to a square ``image_size`` (aspect not kept, so boxes scale
per axis and every batch is one tensor); RoIAlign (aligned, sampling ratio 2) on the last stage (stride 32) with a
``roi_size``² grid, averaged to one D-dim vector (D = 2048 for ResNet-50, as BUTD's). Weights are random unless
``pretrained`` names a local checkpoint (or ``timm`` to download timm's): nothing is fetched by default. The CNN and
its input are in channels-last (NHWC) memory order by default, where convolutions run faster (ResNet-50, 448 px,
batch 8, one CPU thread: 1.11×); the features equal the contiguous network's up to float rounding.

Deterministic: seeded init, eval mode, fixed batches over the sorted image list (a resumed run recomputes a partly
written batch whole, so its numbers match an uninterrupted run bit for bit on the same device).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import timm
import torch
from PIL import Image, UnidentifiedImageError
from timm.data import resolve_data_config
from torchvision.ops import roi_align
from tqdm import tqdm

from vlbench.data.regions import RegionStore, RegionStoreWriter, image_key, unlabelled
from vlbench.errors import VlbenchError
from vlbench.safe_load import read_checkpoint

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@dataclass(frozen=True)
class ExtractionConfig:
    """Everything that decides the numbers (recorded in the store; a resume must match it)."""

    backbone: str = "resnet50"
    boxes: str = "grid:6"
    image_size: int = 448
    batch_size: int = 8
    roi_size: int = 7
    pretrained: str | None = None  # None: random init; "timm": timm's hub weights; else a local checkpoint file
    seed: int = 0
    device: str = "cpu"
    channels_last: bool = True  # NHWC memory order for the CNN: faster, the same numbers up to float rounding


@dataclass
class ImageBoxes:
    """One image's boxes (normalised x1, y1, x2, y2) and their labels (-1 / 0.0 where the source has none)."""

    boxes: np.ndarray  # (N, 4) float32
    labels: dict[str, np.ndarray]  # object_ids, object_conf, attr_ids, attr_conf: (N,)


@dataclass
class BoxSource:
    """Where an image's boxes come from; ``keys`` are the images it covers (None: any image)."""

    spec: str
    keys: frozenset[str] | None
    boxes_for: Callable[[str, int, int], ImageBoxes]  # (key, img_w, img_h) -> boxes
    vocab: dict[str, list[str]]  # "objects"/"attributes" → names, stored beside the features


def _grid_source(spec: str, k: int) -> BoxSource:
    if k < 1:
        raise VlbenchError(f"--boxes {spec}: the grid size must be at least 1")
    edges = np.linspace(0.0, 1.0, k + 1, dtype=np.float32)
    boxes = np.array(
        [[edges[j], edges[i], edges[j + 1], edges[i + 1]] for i in range(k) for j in range(k)], dtype=np.float32
    )
    return BoxSource(spec, None, lambda key, w, h: ImageBoxes(boxes, unlabelled(len(boxes))), {})


def _read_json(path: Path, what: str) -> dict:
    try:
        payload = json.loads(path.read_text())
    except FileNotFoundError:
        raise VlbenchError(f"{path}: {what} file not found") from None
    except json.JSONDecodeError as e:
        raise VlbenchError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(payload, dict):
        raise VlbenchError(f"{path}: expected a JSON object keyed by image, got {type(payload).__name__}")
    return payload


def _read_vocab(path: Path, names: set[str]) -> list[str]:
    """BUTD's vocab file if present (one label a line, synonyms comma-separated), else the sorted names seen."""
    return path.read_text().splitlines() if path.is_file() else sorted(names)


def _vocab_index(vocab: list[str]) -> dict[str, int]:
    return {name.strip(): i for i, line in enumerate(vocab) for name in line.split(",")}


def _scene_graph_source(spec: str, path: Path) -> BoxSource:
    graphs = _read_json(path, "scene graph")
    object_names = {o.get("name", "") for g in graphs.values() for o in g.get("objects", {}).values()}
    attr_names = {a for g in graphs.values() for o in g.get("objects", {}).values() for a in o.get("attributes", [])}
    vocab = {
        "objects": _read_vocab(path.parent / "objects_vocab.txt", object_names),
        "attributes": _read_vocab(path.parent / "attributes_vocab.txt", attr_names),
    }
    object_index, attr_index = _vocab_index(vocab["objects"]), _vocab_index(vocab["attributes"])
    by_key = {image_key(k): (k, g) for k, g in graphs.items()}

    def boxes_for(key: str, img_w: int, img_h: int) -> ImageBoxes:
        graph_key, graph = by_key[key]
        try:
            width, height = float(graph["width"]), float(graph["height"])
            objects = list(graph["objects"].values())
            xywh = np.array([[o["x"], o["y"], o["w"], o["h"]] for o in objects], dtype=np.float32).reshape(-1, 4)
        except (KeyError, TypeError, ValueError) as e:
            raise VlbenchError(f"{path}: image {graph_key!r} lacks width/height or object x/y/w/h ({e})") from None
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1) / [width, height, width, height]
        object_ids = np.array([object_index.get(o.get("name", ""), -1) for o in objects], dtype=np.int64)
        attr_ids = np.array(
            [next((attr_index[a] for a in o.get("attributes", []) if a in attr_index), -1) for o in objects],
            dtype=np.int64,
        )
        labels = {
            "object_ids": object_ids,
            "object_conf": (object_ids >= 0).astype(np.float32),
            "attr_ids": attr_ids,
            "attr_conf": (attr_ids >= 0).astype(np.float32),
        }
        return ImageBoxes(np.clip(boxes, 0.0, 1.0).astype(np.float32), labels)

    return BoxSource(spec, frozenset(by_key), boxes_for, vocab)


def _box_file_source(spec: str, path: Path) -> BoxSource:
    payload = _read_json(path, "box")
    by_key = {}
    for key, boxes in payload.items():
        try:
            array = np.array(boxes, dtype=np.float32).reshape(-1, 4)
        except (TypeError, ValueError):
            raise VlbenchError(f"{path}: image {key!r}: expected a list of [x1, y1, x2, y2] boxes") from None
        if not np.isfinite(array).all() or (array[:, 2:] < array[:, :2]).any():
            raise VlbenchError(f"{path}: image {key!r}: boxes need x2 >= x1 and y2 >= y1 (pixels, x1 y1 x2 y2)")
        by_key[image_key(key)] = array

    def boxes_for(key: str, img_w: int, img_h: int) -> ImageBoxes:
        boxes = by_key[key] / np.array([img_w, img_h, img_w, img_h], dtype=np.float32)
        return ImageBoxes(np.clip(boxes, 0.0, 1.0), unlabelled(len(boxes)))

    return BoxSource(spec, frozenset(by_key), boxes_for, {})


def parse_box_source(spec: str) -> BoxSource:
    """``gt:SCENEGRAPHS.json``, ``grid:K`` or ``file:BOXES.json`` → a BoxSource."""
    kind, _, arg = spec.partition(":")
    if kind == "grid" and arg.isdigit():
        return _grid_source(spec, int(arg))
    if kind == "gt" and arg:
        return _scene_graph_source(spec, Path(arg))
    if kind == "file" and arg:
        return _box_file_source(spec, Path(arg))
    raise VlbenchError(f"--boxes {spec!r}: expected gt:SCENEGRAPHS.json, grid:K or file:BOXES.json")


def list_images(root: str | Path) -> dict[str, Path]:
    """Image files under ``root`` (recursively) by store key, in sorted path order."""
    root = Path(root)
    if not root.is_dir():
        raise VlbenchError(f"--images {root}: directory not found")
    images: dict[str, Path] = {}
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        key = image_key(path.stem)
        if key in images:
            raise VlbenchError(f"{path}: image key {key!r} also names {images[key]}")
        images[key] = path
    if not images:
        raise VlbenchError(f"--images {root}: no image files ({', '.join(IMAGE_SUFFIXES)})")
    return images


PIXELS = "pixels"  # no network: each box's RoIAlign grid of normalised RGB values, flattened (3 × roi_size² dims)


class _PixelMap(torch.nn.Module):
    """The image itself as the feature map (stride 1), in the list-of-maps shape timm's features_only models return."""

    def forward(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        return [pixels]


def build_backbone(cfg: ExtractionConfig) -> tuple[torch.nn.Module, int, int]:
    """(model returning its last feature map, its channels D, its stride); random init unless asked otherwise.

    ``backbone="pixels"`` skips the network: a box's feature is its RoIAlign grid of pixels, flattened. Why: on the
    synthetic world a randomly initialised CNN's pooled features say little about colour and shape, while the pixel
    grid is an exact, deterministic stand-in for a detector's appearance features that a model can learn from.
    """
    if cfg.backbone == PIXELS:
        return _PixelMap(), 3, 1
    kwargs: dict = {"features_only": True, "out_indices": (-1,)}
    if cfg.pretrained == "timm":
        kwargs["pretrained"] = True
    elif cfg.pretrained is not None:
        if not Path(cfg.pretrained).is_file():
            raise VlbenchError(f"--pretrained {cfg.pretrained}: checkpoint file not found")
        if Path(cfg.pretrained).suffix != ".npz":  # (timm reads big_vision .npz itself, without pickles)
            # read as data first: a cut file, or a pickle that would run code, fails here in one line naming it
            read_checkpoint(Path(cfg.pretrained), f"--pretrained {cfg.pretrained}")
        # timm's own loader (weights_only=True too) maps a full classifier checkpoint onto the features-only model.
        kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(cfg.pretrained)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            model = timm.create_model(cfg.backbone, **kwargs)
        except RuntimeError as e:
            raise VlbenchError(f"--backbone {cfg.backbone}: {e}") from None
    model = model.eval().to(cfg.device, memory_format=_memory_format(cfg))
    return model, model.feature_info.channels()[-1], model.feature_info.reduction()[-1]


def _memory_format(cfg: ExtractionConfig) -> torch.memory_format:
    """The CNN's and its input's memory order; ``pixels`` has no network to speed up and keeps its exact numbers."""
    return torch.channels_last if cfg.channels_last and cfg.backbone != PIXELS else torch.contiguous_format


def _settings(cfg: ExtractionConfig) -> dict:
    settings = dataclasses.asdict(cfg)
    if cfg.pretrained not in (None, "timm"):
        settings["pretrained_sha256"] = hashlib.sha256(Path(cfg.pretrained).read_bytes()).hexdigest()
    return settings


class _Batches(torch.utils.data.Dataset):
    """One item = one decoded batch, so DataLoader workers decode while the backbone runs."""

    def __init__(self, batches: list[list[tuple[str, Path]]], source: BoxSource, size: int, mean, std):
        self.batches, self.source, self.size = batches, source, size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.batches)

    def _load(self, path: Path) -> tuple[torch.Tensor, int, int]:
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
                width, height = img.size
                array = np.asarray(img.resize((self.size, self.size), Image.Resampling.BILINEAR), dtype=np.uint8)
        except (UnidentifiedImageError, OSError) as e:
            raise VlbenchError(f"{path}: not a readable image ({e})") from None
        pixels = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0
        return (pixels - self.mean) / self.std, width, height

    def __getitem__(self, i: int) -> list[tuple[str, torch.Tensor, ImageBoxes, int, int]]:
        out = []
        for key, path in self.batches[i]:
            pixels, width, height = self._load(path)
            out.append((key, pixels, self.source.boxes_for(key, width, height), height, width))
        return out


def extract_features(
    images: str | Path,
    store_path: str | Path,
    cfg: ExtractionConfig | None = None,
    workers: int = 0,
    progress: bool = True,
) -> RegionStore:
    """Extract a region store from a folder of images; resumes an interrupted run with the same settings."""
    cfg = cfg or ExtractionConfig()
    for name in ("image_size", "batch_size", "roi_size"):
        if getattr(cfg, name) < 1:
            raise VlbenchError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    source = parse_box_source(cfg.boxes)
    all_images = list_images(images)
    todo = [(k, p) for k, p in all_images.items() if source.keys is None or k in source.keys]
    if not todo:
        raise VlbenchError(f"--boxes {cfg.boxes}: no boxes for any of the {len(all_images)} images under {images}")
    model, feature_dim, stride = build_backbone(cfg)
    data_cfg = resolve_data_config({}, model=model)
    flatten = cfg.backbone == PIXELS
    feature_dim = feature_dim * cfg.roi_size**2 if flatten else feature_dim
    writer = RegionStoreWriter(
        store_path, feature_dim, source=f"extract:{cfg.boxes}", backbone=cfg.backbone, settings=_settings(cfg)
    )
    if not writer.resumed_images:
        for name, vocab in source.vocab.items():
            writer.write_text(f"{name}_vocab.txt", "".join(line + "\n" for line in vocab))
    batches = [todo[i : i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
    pending = [b for b in batches if any(key not in writer for key, _ in b)]
    dataset = _Batches(pending, source, cfg.image_size, data_cfg["mean"], data_cfg["std"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
    bar = tqdm(total=len(todo), initial=len(writer), unit="img", disable=not progress, desc="extract")
    with writer, bar, torch.inference_mode():
        for batch in loader:
            pixels = torch.stack([item[1] for item in batch])  # (B, 3, S, S)
            pixels = pixels.to(cfg.device, memory_format=_memory_format(cfg))
            feature_map = model(pixels)[-1]  # (B, D, S/stride, S/stride)
            rois = torch.cat(
                [
                    torch.cat([torch.full((len(b.boxes), 1), float(i)), torch.from_numpy(b.boxes) * cfg.image_size], 1)
                    for i, (_, _, b, _, _) in enumerate(batch)
                ]
            ).to(cfg.device)  # (sum N, 5): batch index, x1, y1, x2, y2 in resized pixels
            pooled = roi_align(feature_map, rois, cfg.roi_size, 1.0 / stride, sampling_ratio=2, aligned=True)
            features = (pooled.flatten(1) if flatten else pooled.mean(dim=(2, 3))).float().cpu().numpy()  # (sum N, D)
            start = 0
            for key, _, boxes, height, width in batch:
                n = len(boxes.boxes)
                if key not in writer:
                    writer.add(key, features[start : start + n], boxes.boxes, height, width, **boxes.labels)
                    bar.update(1)
                start += n
    return RegionStore(store_path)
