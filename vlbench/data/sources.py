"""Where a run's data lives: the synthetic world (generated on first use) or a user's directory of official files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import DictConfig

from vlbench.data.synthetic import SyntheticConfig, ensure_world
from vlbench.errors import VlbenchError


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
    return root
