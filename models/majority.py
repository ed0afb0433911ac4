"""Blind baseline: the most frequent training answer per prior group (VQA: per question type).

Why: the floor every model must clear; with ``textonly`` it shows how much the text alone explains. It is a model
like the others so the same runner, record and leaderboard handle it. Its native ``answer_classifier`` head (also
NLVR2's ``pair_classifier``) counts, during training, the best-scored target answer of each example per group, and
predicts the group's most frequent answer (ties → the lower answer index, i.e. the more frequent answer overall). It
has no trainable parameters, so the runner takes no optimizer step for it.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig
from torch import nn

from vlbench.models.base import Batch, JointEncoding, ModelContext, VisionLanguageModel
from vlbench.registry import MODELS


class GroupCountClassifier(nn.Module):
    """Counts training answers per group; logits are the counts of the example's group (argmax = majority answer)."""

    def __init__(self, num_groups: int, num_outputs: int):
        super().__init__()
        self.register_buffer("counts", torch.zeros(num_groups, num_outputs))

    def forward(self, encoding: JointEncoding | list[JointEncoding], batch: Batch) -> torch.Tensor:
        groups = batch["group_ids"]
        if self.training:
            if "targets" in batch:  # soft scores (VQA): the best-scored answer
                targets = batch["targets"]
                answered = targets.max(dim=1).values > 0
                best = targets.argmax(dim=1)
            else:  # class labels (GQA, NLVR2); -100 marks an answer outside the vocabulary
                best = batch["labels"].clamp(min=0)
                answered = batch["labels"] >= 0
            self.counts.index_put_(
                (groups[answered], best[answered]),
                torch.ones_like(best[answered], dtype=self.counts.dtype),
                accumulate=True,
            )
        # a tiny decreasing prior breaks ties towards lower indices (answers are sorted by overall frequency)
        tie_break = -torch.arange(self.counts.shape[1], device=groups.device) * 1e-6
        return self.counts[groups] + tie_break


@MODELS.register("majority")
class Majority(VisionLanguageModel):
    visual_input = "none"

    def __init__(self, cfg: DictConfig, ctx: ModelContext):
        super().__init__()
        self.num_groups = ctx.num_groups
        self.hidden_size = ctx.num_groups

    def encode(self, batch: Batch) -> JointEncoding:
        pooled = nn.functional.one_hot(batch["group_ids"], self.num_groups).float()
        return JointEncoding(pooled=pooled, tokens=pooled[:, None], mask=torch.ones_like(pooled[:, :1]))

    def native_head(
        self, kind: str, num_outputs: int, answer_token_ids: list[list[int]] | None = None
    ) -> nn.Module | None:
        if kind in ("answer_classifier", "pair_classifier"):
            return GroupCountClassifier(self.num_groups, num_outputs)
        return None
