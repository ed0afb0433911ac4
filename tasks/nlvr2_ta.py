"""Text assignment (``task=nlvr2_ta``): ALBEF's pre-training step before NLVR2, on a caption corpus.

Each caption is paired with two images of its batch — (its image, a negative), (a negative, its image) or (two
negatives), uniformly, negatives drawn by ITC similarity — and the model's two-image head predicts which of the three
it is. Only a model's native two-image head can do this (``head=native``). Evaluation draws the pairs under a fixed
seed, so the accuracy of a checkpoint is repeatable and training's random stream is untouched.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from vlbench.errors import VlbenchError
from vlbench.models.base import Batch, TwoImageHead
from vlbench.registry import TASKS
from vlbench.tasks.base import EvalContext, EvalResult, to_device, write_json_predictions
from vlbench.tasks.retrieval import CaptionCorpusTask

LABELS = ("first", "second", "neither")
EVAL_SEED = 1234


@TASKS.register("nlvr2_ta")
class TextAssignmentTask(CaptionCorpusTask):
    head_kind = "text_assignment"
    shardable_evaluation = False  # predict_split needs the whole split

    @property
    def num_outputs(self) -> int:
        return len(LABELS)

    def build_shared_head(self, hidden_size: int) -> nn.Module:
        raise VlbenchError("task=nlvr2_ta trains a model's own two-image fusion head: use head=native (e.g. ALBEF)")

    def forward(self, model: nn.Module, head: nn.Module, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        if not isinstance(head, TwoImageHead):
            raise VlbenchError(f"task=nlvr2_ta: the native head {type(head).__name__} cannot assign texts to images")
        logits, labels = head.assignment_logits(model, batch)
        return {"logits": logits, "labels": labels}

    def loss(self, outputs: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        return F.cross_entropy(outputs["logits"].float(), outputs["labels"])

    def loss_terms(self, outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        return {}

    @torch.no_grad()
    def predict_split(self, net: nn.Module, split: str, ctx: EvalContext) -> list[dict]:
        predictions: list[dict] = []
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(EVAL_SEED)
            loader = ctx.loader(self.dataset(split))
            for batch in tqdm(loader, desc=f"eval {split}", leave=False, disable=not ctx.progress):
                batch = to_device(batch, ctx.device)
                if batch["input_ids"].shape[0] < 3:  # two negatives per caption are needed
                    continue
                with ctx.autocast():
                    outputs = net(batch)
                best = outputs["logits"].argmax(dim=-1).tolist()
                for index, label, guess in zip(batch["index"].tolist(), outputs["labels"].tolist(), best, strict=True):
                    predictions.append({"caption": index, "label": LABELS[label], "prediction": LABELS[guess]})
        if not predictions:
            raise VlbenchError(f"task=nlvr2_ta: split {split!r} has fewer than 3 captions to evaluate on")
        return predictions

    def evaluate(self, split: str, predictions: list[dict]) -> EvalResult | None:
        def accuracy(rows: list[dict]) -> float:
            return 100.0 * sum(p["label"] == p["prediction"] for p in rows) / max(1, len(rows))

        metrics = {"accuracy": accuracy(predictions)}
        per_label = {name: accuracy([p for p in predictions if p["label"] == name]) for name in LABELS}
        metrics.update({f"accuracy/{name}": value for name, value in per_label.items()})
        return EvalResult(main_metric="accuracy", metrics=metrics, breakdown={"label": per_label})

    def write_predictions(self, predictions: list[dict], path_stem: Path) -> Path:
        return write_json_predictions(predictions, path_stem)

    def describe(self) -> dict:
        return {
            "labels": list(LABELS),
            "pairs": "in-batch, negatives ∝ softmax(ITC similarity)",
            "eval_seed": EVAL_SEED,
        }
