"""One dataset shape for every task: pre-tokenised text + one or more images + a target, one collate per visual kind.

Why one: VQA, GQA, NLVR2, retrieval and pre-training differ only in what the target is and how many images an
example has. Keeping loading/collation in one place means a model that eats ``pixels`` or ``regions`` works on every
task without per-task code. Batch keys (see models/base.py): ``input_ids``, ``attention_mask``, ``index``,
``group_ids``; the visual keys of the model's kind (``pixel_values``; or ``region_features``, ``region_boxes``,
``region_mask`` and the detector labels ``region_object_ids`` …), suffixed ``_img0``, ``_img1`` … when an example
has several images; plus the task's target keys.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from vlbench.data.images import ImageLoader
from vlbench.tasks.base import pad_sequences


@dataclass(frozen=True)
class ImageRef:
    """One image of an example: its file (for pixel models) and its key in a region-feature store (region models)."""

    path: Path
    key: str


class VisualReader:
    """Loads what the model declared it eats for an image: normalised pixels, region features, or nothing."""

    def __init__(self, kind: str, image_loader: ImageLoader | None = None, region_store=None, max_regions: int = 0):
        if kind not in ("pixels", "regions", "none"):
            raise ValueError(f"visual input {kind!r}: expected pixels, regions or none")
        self.kind = kind
        self.image_loader = image_loader
        self.region_store = region_store
        # Pad to the store's largest box count when that is below max_regions: the synthetic world's images hold 2-5
        # objects, and padding them to 36 made a region model spend ~8x its compute on masked boxes. The count is the
        # whole store's, so every batch (and every DDP rank) has the same shape; BUTD's 36-box files are unchanged.
        if region_store is not None and max_regions:
            max_regions = min(max_regions, int(region_store.max_boxes) or max_regions)
        self.max_regions = max_regions

    def require_feature_dim(self, expected: int | None, what: str) -> None:
        """Region models: the store's feature size must be the model's (checked before any training)."""
        if self.kind != "regions":
            return
        from vlbench.data.regions import require_feature_dim
        from vlbench.errors import VlbenchError

        if expected is None:
            raise VlbenchError(f"{what}: not set; a region model must declare its input feature size")
        require_feature_dim(self.region_store, expected, what)

    def load(self, ref: ImageRef) -> Any:
        if self.kind == "pixels":  # uint8: normalised once per batch in ``collate``
            return self.image_loader.pixels(ref.path)
        if self.kind == "regions":
            return self.region_store[ref.key]
        return None

    def collate(self, loaded: list[Any], suffix: str = "") -> dict[str, torch.Tensor]:
        if self.kind == "pixels":
            return {f"pixel_values{suffix}": self.image_loader.normalise(torch.stack(loaded))}
        if self.kind == "regions":
            from vlbench.data.regions import pad_regions

            padded = pad_regions(loaded, self.max_regions)
            return {f"region_{name}{suffix}": value for name, value in padded.items()}
        return {}


def build_visual_reader(data_cfg, data_format: str, data_root: Path, kind: str) -> VisualReader:
    """The reader for a model's visual kind: an image loader, or the format's region-feature store."""
    if kind == "pixels":
        loader = ImageLoader(
            data_cfg.image_size, list(data_cfg.image_mean), list(data_cfg.image_std), cache=data_cfg.cache_images
        )
        return VisualReader("pixels", image_loader=loader)
    if kind == "regions":
        from vlbench.data.regions import RegionStore
        from vlbench.errors import VlbenchError

        files = data_cfg.datasets[data_format]
        if not files.get("region_features") and data_cfg.root is None:  # the synthetic world: extracted on first use
            from vlbench.data.sources import synthetic_region_store

            return VisualReader(
                "regions",
                region_store=RegionStore(synthetic_region_store(data_cfg, data_root)),
                max_regions=files.max_regions,
            )
        if not files.get("region_features"):
            raise VlbenchError(
                f"data.datasets.{data_format}.region_features: not set for data={data_cfg.name}; region models need "
                "a feature store (make one with vlbench-data extract-features or convert-tsv)"
            )
        store_path = Path(files.region_features).expanduser()
        store_path = store_path if store_path.is_absolute() else data_root / store_path
        return VisualReader("regions", region_store=RegionStore(store_path), max_regions=files.max_regions)
    return VisualReader("none")


REGION_FIELDS = ("features", "boxes", "mask", "object_ids", "object_conf", "attr_ids", "attr_conf")
VISUAL_KEYS = ("pixel_values", *(f"region_{name}" for name in REGION_FIELDS))


def select_image(batch: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
    """The single-image view of a multi-image batch: image ``index``'s visual keys under their plain names."""
    suffix = f"_img{index}"
    view = {k: v for k, v in batch.items() if not any(k.startswith(f"{vk}_img") for vk in VISUAL_KEYS)}
    for key in VISUAL_KEYS:
        if key + suffix in batch:
            view[key] = batch[key + suffix]
    return view


class ExampleDataset(Dataset):
    """Texts (tokenised once), their images, optional targets; ``collate_targets`` turns a list of targets into keys."""

    def __init__(
        self,
        texts: Sequence[str],
        images: Sequence[Sequence[ImageRef]],
        tokenizer,
        max_text_len: int,
        visual: VisualReader,
        targets: Sequence[Any] | None = None,
        collate_targets: Callable[[list[Any]], dict[str, torch.Tensor]] | None = None,
        group_ids: Sequence[int] | None = None,
    ):
        if len(texts) != len(images):
            raise ValueError(f"{len(texts)} texts but {len(images)} image lists")
        self.encoded = tokenizer(list(texts), truncation=True, max_length=max_text_len)["input_ids"]
        self.images = images
        self.visual = visual
        self.targets = targets
        self.collate_targets = collate_targets
        self.group_ids = group_ids if group_ids is not None else [0] * len(texts)
        self.pad_token_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.encoded)

    def __getitem__(self, i: int) -> dict:
        item = {
            "index": i,
            "input_ids": self.encoded[i],
            "group_id": self.group_ids[i],
            "visual": [self.visual.load(ref) for ref in self.images[i]],
        }
        if self.targets is not None:
            item["target"] = self.targets[i]
        return item

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        input_ids, attention_mask = pad_sequences([it["input_ids"] for it in items], self.pad_token_id)
        batch = {
            "index": torch.tensor([it["index"] for it in items]),
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "group_ids": torch.tensor([it["group_id"] for it in items]),
        }
        n_images = len(items[0]["visual"])
        for k in range(n_images):
            suffix = "" if n_images == 1 else f"_img{k}"
            batch.update(self.visual.collate([it["visual"][k] for it in items], suffix))
        if self.targets is not None and self.collate_targets is not None:
            batch.update(self.collate_targets([it["target"] for it in items]))
        return batch
