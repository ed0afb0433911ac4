"""The task side of the model ↔ task contract: datasets, targets, the shared head, loss, metric, prediction files."""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from vlbench.errors import VlbenchError
from vlbench.models.base import Batch, encode_for


@dataclass
class EvalResult:
    main_metric: str
    metrics: dict[str, float]
    breakdown: dict[str, dict[str, float]] = field(default_factory=dict)
    higher_is_better: bool = True  # False for losses (the pretrain task selects its checkpoint by validation loss)
    # example id → score (1/0 correct, or VQA's soft accuracy): the leaderboard's paired significance test reads it
    per_example: dict[str, float] = field(default_factory=dict)

    @property
    def main_value(self) -> float:
        return self.metrics[self.main_metric]

    def better_than(self, value: float) -> bool:
        return self.main_value > value if self.higher_is_better else self.main_value < value


@dataclass
class EvalContext:
    """How the runner wants evaluation done: device, batch size, loader workers, progress bars, autocast, and this
    process's shard of each split under torchrun (``rank`` of ``world_size``; ``gather`` collects every process's
    list of predictions on rank 0, in rank order, and returns None elsewhere)."""

    device: torch.device
    batch_size: int
    num_workers: int = 0
    progress: bool = False
    autocast: Callable[[], AbstractContextManager] = field(default=lambda: torch.autocast("cpu", enabled=False))
    rank: int = 0
    world_size: int = 1
    gather: Callable[[list], list[list] | None] | None = None
    _loaders: dict[int, tuple[Dataset, DataLoader]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _shards: dict[tuple[int, int, int], tuple[Dataset, Dataset]] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def shard(self, dataset: Dataset) -> Dataset:
        """This process's contiguous part of ``dataset`` (the whole of it in one process), one object per dataset
        and bounds, so that ``loader`` finds its cached loader again."""
        start, end = shard_bounds(len(dataset), self.rank, self.world_size)
        if (start, end) == (0, len(dataset)):
            return dataset
        key = (id(dataset), start, end)
        cached = self._shards.get(key)
        if cached is not None and cached[0] is dataset:
            return cached[1]
        part = _Shard(dataset, range(start, end))
        self._shards[key] = (dataset, part)  # the dataset held too: its id is never reused meanwhile
        return part

    def loader(self, dataset: Dataset) -> DataLoader:
        """One loader per dataset for this context's life: with workers, they (and the images they cached) persist
        from one evaluation to the next instead of starting cold every ``eval_every`` steps."""
        cached = self._loaders.get(id(dataset))
        if cached is not None and cached[0] is dataset:
            return cached[1]
        loader = DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=False,
            collate_fn=dataset.collate,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator(),  # evaluating must not consume the training RNG: eval_every changes no result
        )
        self._loaders[id(dataset)] = (dataset, loader)  # the dataset held too: its id is never reused meanwhile
        return loader


def shard_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of the ``rank``-th of ``world_size`` contiguous shards of ``size`` examples: every index in
    exactly one shard, the sizes differing by at most one (no padding, no example twice)."""
    return rank * size // world_size, (rank + 1) * size // world_size


class _Shard(Subset):
    """A contiguous part of a task's dataset that batches as the dataset does."""

    def collate(self, items: list) -> Any:
        return self.dataset.collate(items)


def write_json_predictions(records: list[dict], path_stem: Path) -> Path:
    """``<stem>.json`` holding ``records`` (already in the task's official order and shape)."""
    path = path_stem.with_suffix(".json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(records, f)
    return path


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def pad_sequences(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to the longest: (ids (B, L), attention mask (B, L))."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    return ids, mask


def dataset_files(data_cfg: DictConfig, data_format: str) -> DictConfig:
    if data_format not in data_cfg.datasets:
        raise VlbenchError(
            f"data={data_cfg.name}: has no {data_format} files (data.datasets has {sorted(data_cfg.datasets)}); "
            f"use a data config that provides {data_format}, e.g. data=synthetic"
        )
    return data_cfg.datasets[data_format]


class Task:
    """Base class. ``head_kind`` names the native head a model may offer instead of the shared one."""

    head_kind: str = ""
    # predict_split predicts each process's shard and gathers them on rank 0 (False: it needs the whole split at once,
    # and rank 0 evaluates alone)
    shardable_evaluation: bool = True
    data_format: str = ""  # the dataset format the task reads: a key of ``data.datasets`` (vqav2, gqa, nlvr2, karpathy)

    def __init__(self, cfg: DictConfig, data_cfg: DictConfig, data_root: Path, tokenizer, visual_input: str):
        self.visual = None  # a tasks.datasets.VisualReader, set by each task for the model's visual kind
        self.cfg = cfg
        self.data_cfg = data_cfg
        self.data_root = data_root
        self.tokenizer = tokenizer
        self.visual_input = visual_input

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def files(self) -> DictConfig:
        """Where this task's format lies in the data config (image template, split names)."""
        return dataset_files(self.data_cfg, self.data_format)

    @property
    def num_groups(self) -> int:
        return 1

    @property
    def num_outputs(self) -> int:
        raise NotImplementedError

    def dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    def native_head_inputs(self) -> dict[str, Any]:
        """What a model's native head may need from the task besides the output count (VQA: the answer candidates)."""
        return {}

    def configure_for_model(self, model_cls: type) -> None:
        """Adapt to the model family before any split is read (pre-training adds QA pairs for LXMERT); no-op here."""

    def forward(self, model: nn.Module, head: nn.Module, batch: Batch, step: int) -> Any:
        """What training and prediction compute on a batch; by default the head over the joint encoding (its
        pooled [CLS] alone when that is all the head reads)."""
        return head(encode_for(model, head, batch), batch)

    def loss_terms(self, outputs: Any) -> dict[str, float]:
        """Named parts of the loss to log besides the total (pre-training objectives); none by default."""
        return {}

    @torch.no_grad()
    def predict_split(self, net: nn.Module, split: str, ctx: EvalContext) -> list[dict]:
        """Predictions for a split in the task's record format: batched forward passes, then ``predict``. Under
        torchrun each process predicts its contiguous shard; rank 0 returns them all, in the split's order (each
        example once), the other processes an empty list."""
        dataset = ctx.shard(self.dataset(split))
        predictions: list[dict] = []
        for batch in tqdm(ctx.loader(dataset), desc=f"eval {split}", leave=False, disable=not ctx.progress):
            batch = to_device(batch, ctx.device)
            with ctx.autocast():
                outputs = net(batch)
            predictions += self.predict(outputs.float(), batch, split)
        if ctx.world_size > 1:
            parts = ctx.gather(predictions)
            return [p for part in parts for p in part] if parts is not None else []
        return predictions

    def floor(self, split: str) -> dict[str, Any]:
        """What a model that learned nothing scores on ``split`` — ``{name, metric, value, split, examples}``
        (vlbench/floor.py) — for the run to be judged against; here the answer prior of the tasks that answer from a
        fixed set of classes (VQA, GQA, NLVR2); ``{}`` where none is defined (pre-training)."""
        if self.head_kind not in ("answer_classifier", "pair_classifier"):
            return {}
        from vlbench.floor import answer_prior

        return answer_prior(self, split, self.cfg.main_metric)

    def build_shared_head(self, hidden_size: int) -> nn.Module:
        raise NotImplementedError

    def loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def predict(self, outputs: torch.Tensor, batch: Batch, split: str) -> list[dict]:
        raise NotImplementedError

    def evaluate(self, split: str, predictions: list[dict]) -> EvalResult | None:
        """Scores for an annotated split; None when the split has no public labels (predictions are still written)."""
        raise NotImplementedError

    def write_predictions(self, predictions: list[dict], path_stem: Path) -> Path:
        raise NotImplementedError

    def describe(self) -> dict:
        return {}
