"""Answer classification shared by VQA and GQA: a top-K answer vocabulary and the shared 2-layer MLP head."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from torch import nn

from vlbench.models.base import Batch, JointEncoding
from vlbench.models.layers import MLPClassifier


class AnswerVocab:
    """Top-K answers of the training split by frequency (ties alphabetical); index 0 is the most frequent."""

    def __init__(self, answers: list[str]):
        self.answers = answers
        self.index = {a: i for i, a in enumerate(answers)}

    @classmethod
    def from_answers(cls, answers: Iterable[str], top_k: int) -> AnswerVocab:
        ranked = sorted(Counter(answers).items(), key=lambda kv: (-kv[1], kv[0]))
        return cls([a for a, _ in ranked[:top_k]])

    def __len__(self) -> int:
        return len(self.answers)


class SharedAnswerHead(nn.Module):
    """The controlled-comparison answer head: a 2-layer MLP over the pooled joint encoding."""

    reads_pooled_only = True  # the model may skip the token states (``pooled_only_for``)

    def __init__(self, hidden_size: int, num_answers: int, multiplier: int, dropout: float):
        super().__init__()
        self.classifier = MLPClassifier(hidden_size, hidden_size * multiplier, num_answers, dropout)

    def forward(self, encoding: JointEncoding, batch: Batch) -> torch.Tensor:
        return self.classifier(encoding.pooled)
