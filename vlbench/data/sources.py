"""Where a run's data lives: the synthetic world (generated on first use) or a user's directory of official files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import DictConfig

from vlbench.data.files import exclusive_lock
from vlbench.data.synthetic import SyntheticConfig, ensure_world
from vlbench.errors import VlbenchError

# the scene graphs of every split merged into one box file, written by ``synthetic_region_store`` beside the dataset's
# own files: derived, so it is not part of the data a run's fingerprint covers
MERGED_BOXES_FILE = "regions.sceneGraphs.json"


def synthetic_config(data_cfg: DictConfig) -> SyntheticConfig:
    """The world's parameters: each ``SyntheticConfig`` field is the ``data.<field>`` of the same name."""
    values = {f.name: data_cfg[f.name] for f in dataclasses.fields(SyntheticConfig)}
    return SyntheticConfig(**{k: dict(v) if isinstance(v, DictConfig) else v for k, v in values.items()})


def resolve_data_root(data_cfg: DictConfig, data_format: str = "vqav2") -> Path:
    """The folder holding one format's files; generates the synthetic world's when ``data.root`` is null."""
    if data_cfg.root is None:
        if data_cfg.name != "synthetic":
            raise VlbenchError(f"data.root: required for data={data_cfg.name} (a directory with the official files)")
        cache = Path(data_cfg.cache_dir).expanduser() if data_cfg.cache_dir else None
        return ensure_world(synthetic_config(data_cfg), data_format, cache)
    root = Path(data_cfg.root).expanduser()
    subdir = data_cfg.datasets[data_format].subdir if data_format in data_cfg.datasets else ""
    root = root / subdir if subdir else root
    if not root.is_dir():
        raise VlbenchError(f"data.root={root}: directory not found (expected the dataset's official files there)")
    if next(root.iterdir(), None) is None:  # say so, rather than name the first of many files that are missing
        raise VlbenchError(f"data.root={root}: the directory is empty (expected the dataset's official files there)")
    return root


def dataset_json_files(data_root: Path) -> list[Path]:
    """The data root's own JSON files, sorted: what a run's data fingerprint covers. The merged box file that region
    extraction writes there is left out, so two machines with the same data record the same fingerprint whether or not
    a region model has run on one of them first."""
    return sorted(p for p in Path(data_root).glob("*.json") if p.is_file() and p.name != MERGED_BOXES_FILE)


def synthetic_region_store(data_cfg: DictConfig, format_dir: Path) -> Path:
    """Region features of a synthetic format's images over their ground-truth boxes, extracted on first use.

    Why automatic: a region model on the synthetic world must run with no extra step, as pixel models do. The store
    lies in the format's folder, named by the extraction settings; the scene graphs of every split are merged into
    one box file beside it. Extraction is atomic (the writer renames a finished store into place).
    """
    import hashlib
    import json

    settings = {
        "backbone": data_cfg.region_backbone,
        "roi_size": data_cfg.region_roi_size,
        "image_size": data_cfg.image_size,
    }
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    store = format_dir / f"regions-{data_cfg.region_backbone}-{tag}"
    if (store / "meta.json").is_file():
        return store
    with exclusive_lock(format_dir / f".{store.name}.lock"):  # parallel jobs: one extracts, the others wait for it
        if not (store / "meta.json").is_file():
            _extract_synthetic_regions(data_cfg, format_dir, store)
    return store


def _extract_synthetic_regions(data_cfg: DictConfig, format_dir: Path, store: Path) -> None:
    """Merge the scene graphs' boxes into one file, then extract the store over them (see above)."""
    import json
    import os
    import tempfile

    from vlbench.data.extract import ExtractionConfig, extract_features

    graphs: dict = {}
    for path in sorted(format_dir.glob("*sceneGraphs.json")):
        if path.name == MERGED_BOXES_FILE:
            continue
        with open(path, encoding="utf-8") as f:
            graphs.update(json.load(f))
    if not graphs:
        raise VlbenchError(f"{format_dir}: no *sceneGraphs.json to take ground-truth boxes from")
    # one label vocabulary for every format (the Karpathy folder's files), so pre-trained object heads transfer
    from vlbench.data.synthetic_scenes import COLORS, SHAPES, SIZES

    for name, labels in (("objects_vocab.txt", SHAPES), ("attributes_vocab.txt", [*COLORS, *SIZES])):
        if not (format_dir / name).is_file():
            (format_dir / name).write_text("".join(f"{label}\n" for label in labels))
    boxes_path = format_dir / MERGED_BOXES_FILE
    if not boxes_path.is_file():
        handle, tmp = tempfile.mkstemp(dir=format_dir, prefix=".boxes-")
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            json.dump(graphs, f)
        os.replace(tmp, boxes_path)
    config = ExtractionConfig(
        backbone=data_cfg.region_backbone,
        boxes=f"gt:{boxes_path}",
        image_size=data_cfg.image_size,
        roi_size=data_cfg.region_roi_size,
        batch_size=64,
    )
    extract_features(format_dir / "images", store, config, progress=True)
