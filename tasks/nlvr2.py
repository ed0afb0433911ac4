"""NLVR2: is a statement true of a pair of images? Official JSON-lines in, official CSV predictions and scores out.

Protocol (recorded in every run): each example is encoded twice, once per image, with the same statement; the shared
head classifies the concatenated pooled vectors (LXMERT's NLVR2 head: Linear(2H, 2H) → GELU → LayerNorm → Linear(2H,
2)) with softmax cross-entropy; accuracy and consistency (every image pair of a sentence right) come from
``tasks/nlvr2_eval.py``, a mirror of lil-lab/nlvr's metrics.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from vlbench.data.files import format_template, read_jsonl, require_fields
from vlbench.errors import VlbenchError
from vlbench.models.base import Batch, JointEncoding, TwoImageHead, encode_for
from vlbench.models.layers import MLPClassifier
from vlbench.registry import TASKS
from vlbench.tasks.base import EvalResult, Task
from vlbench.tasks.datasets import ExampleDataset, ImageRef, build_visual_reader, select_image
from vlbench.tasks.nlvr2_eval import evaluate_nlvr2, write_predictions

LABELS = ("False", "True")  # class 1 = the statement is true


@dataclass
class DistilledLogits:
    """A training forward's pair logits with the teacher's, and the teacher's weight in the loss."""

    logits: torch.Tensor
    teacher: torch.Tensor
    alpha: float


@dataclass
class NLVR2Example:
    identifier: str
    sentence: str
    label: int
    images: tuple[ImageRef, ImageRef]


def pair_identifier(identifier: str) -> str:
    """``dev-850-0-3`` → ``dev-850-0``: the image pair's name, shared by the files ``<pair>-img0.png``/``-img1.png``."""
    return identifier.rsplit("-", 1)[0]


def read_nlvr2_split(root: Path, subtype: str, image_template: str) -> list[NLVR2Example]:
    """Read ``<subtype>.json`` (one JSON object per line); every example needs a label and both images."""
    path = root / f"{subtype}.json"
    examples = []
    for number, record in enumerate(read_jsonl(path, ("identifier", "sentence", "label")), start=1):
        require_fields(record, {"identifier": str, "sentence": str}, path, f"record {number}")
        label = str(record["label"]).lower()
        if label not in ("true", "false"):
            raise VlbenchError(f"{path}: record {number} ({record['identifier']}) has label {record['label']!r}, "
                               "expected \"True\" or \"False\"")  # fmt: skip
        pair = pair_identifier(record["identifier"])
        refs = []
        for index in (0, 1):
            fields = {"subtype": subtype, "identifier": pair, "index": index, "directory": record.get("directory", "")}
            image_path = root / format_template(image_template, path, f"record {number}", **fields)
            if not image_path.is_file():
                raise VlbenchError(f"{path}: record {number} ({record['identifier']}) needs image {image_path}, "
                                   "which does not exist")  # fmt: skip
            refs.append(ImageRef(image_path, f"{pair}-img{index}"))
        examples.append(NLVR2Example(record["identifier"], record["sentence"], int(label == "true"), tuple(refs)))
    if not examples:
        raise VlbenchError(f"{path}: no examples (an empty split)")
    return examples


class PairClassifierHead(nn.Module):
    """The shared NLVR2 head over the two image-text pairs' pooled vectors."""

    reads_pooled_only = True

    def __init__(self, hidden_size: int, dropout: float):
        super().__init__()
        self.classifier = MLPClassifier(2 * hidden_size, 2 * hidden_size, len(LABELS), dropout)

    def forward(self, encodings: list[JointEncoding], batch: Batch) -> torch.Tensor:
        return self.classifier(torch.cat([e.pooled for e in encodings], dim=-1))


@TASKS.register("nlvr2")
class NLVR2Task(Task):
    head_kind = "pair_classifier"
    data_format = "nlvr2"

    def __init__(self, cfg: DictConfig, data_cfg: DictConfig, data_root: Path, tokenizer, visual_input: str):
        super().__init__(cfg, data_cfg, data_root, tokenizer, visual_input)
        self._splits: dict[str, list[NLVR2Example]] = {}
        self._read("train")
        self.visual = build_visual_reader(data_cfg, self.data_format, data_root, visual_input)
        self._datasets: dict[str, ExampleDataset] = {}

    @property
    def num_outputs(self) -> int:
        return len(LABELS)

    def _read(self, split: str) -> list[NLVR2Example]:
        if split not in self._splits:
            files = self.files
            if split not in files.splits:
                raise VlbenchError(f"data.datasets.nlvr2.splits: no split named {split!r} (have {list(files.splits)})")
            examples = read_nlvr2_split(self.data_root, files.splits[split], files.image_template)
            if self.data_cfg.limit_examples > 0:
                examples = examples[: self.data_cfg.limit_examples]
            self._splits[split] = examples
        return self._splits[split]

    def dataset(self, split: str) -> ExampleDataset:
        if split not in self._datasets:
            examples = self._read(split)
            self._datasets[split] = ExampleDataset(
                [ex.sentence for ex in examples],
                [ex.images for ex in examples],
                self.tokenizer,
                self.data_cfg.max_text_len,
                self.visual,
                targets=[ex.label for ex in examples],
                collate_targets=lambda t: {"labels": torch.tensor(t, dtype=torch.long)},
            )
        return self._datasets[split]

    def forward(self, model: nn.Module, head: nn.Module, batch: Batch, step: int) -> torch.Tensor | DistilledLogits:
        first, second = select_image(batch, 0), select_image(batch, 1)
        if isinstance(head, TwoImageHead):  # the model's own fusion of both images (ALBEF)
            logits = head.pair_logits(model, first, second)
            teacher = head.pair_teacher(model, first, second, step)
            return logits if teacher is None else DistilledLogits(logits, *teacher)
        return head([encode_for(model, head, first), encode_for(model, head, second)], batch)

    def build_shared_head(self, hidden_size: int) -> nn.Module:
        return PairClassifierHead(hidden_size, self.cfg.head_dropout)

    def loss(self, logits: torch.Tensor | DistilledLogits, batch: Batch) -> torch.Tensor:
        if isinstance(logits, DistilledLogits):  # (1 − alpha) · hard + alpha · soft cross-entropy (ALBEF's NLVR2)
            hard = F.cross_entropy(logits.logits.float(), batch["labels"])
            log_probs = F.log_softmax(logits.logits.float(), dim=-1)
            soft = -(log_probs * F.softmax(logits.teacher.float(), dim=-1)).sum(dim=-1).mean()
            return (1 - logits.alpha) * hard + logits.alpha * soft
        return F.cross_entropy(logits.float(), batch["labels"])

    def predict(self, logits: torch.Tensor, batch: Batch, split: str) -> list[dict]:
        examples = self._splits[split]
        best = logits.argmax(dim=-1).tolist()
        return [
            {"identifier": examples[i].identifier, "prediction": LABELS[b]}
            for i, b in zip(batch["index"].tolist(), best, strict=True)
        ]

    def evaluate(self, split: str, predictions: list[dict]) -> EvalResult | None:
        examples = self._splits[split]
        scores = evaluate_nlvr2(
            ({"identifier": ex.identifier, "label": LABELS[ex.label]} for ex in examples),
            {p["identifier"]: p["prediction"] for p in predictions},
        )
        return EvalResult(
            main_metric="accuracy",
            metrics={"accuracy": scores.accuracy, "consistency": scores.consistency},
            per_example={k: float(v) for k, v in scores.per_example.items()},
        )

    def write_predictions(self, predictions: list[dict], path_stem: Path) -> Path:
        """The official format: CSV lines ``identifier,True|False``."""
        path = path_stem.with_suffix(".csv")
        write_predictions(
            path, {p["identifier"]: p["prediction"] for p in sorted(predictions, key=lambda p: p["identifier"])}
        )
        return path

    def describe(self) -> dict:
        return {"head": "concat(pooled(image0, text), pooled(image1, text)) → 2-layer MLP", "loss": "cross-entropy"}
