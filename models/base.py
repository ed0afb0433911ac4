"""The model side of the model ↔ task contract.

A model is a plain ``nn.Module`` that knows no dataset or metric. It declares what visual input it eats
(``pixels``, ``regions`` or ``none``), returns a joint encoding for a text–image batch, and may offer native heads
and pre-training losses. Batches are dicts of tensors with these keys:

- ``input_ids`` (B, L), ``attention_mask`` (B, L): tokenised text, [CLS] first.
- ``pixel_values`` (B, 3, H, W): normalised images, for ``visual_input == "pixels"``.
- ``group_ids`` (B,): the task's prior group of each example (VQA: question type), for blind baselines.
- task targets (e.g. ``targets`` (B, num_answers) soft scores for VQA).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


@dataclass
class TextSizes:
    hidden_size: int = 768
    num_heads: int = 12
    intermediate_size: int = 3072
    dropout: float = 0.1
    max_position_embeddings: int = 512


@dataclass
class ModelContext:
    """What a model needs to know about the data it will see (set by the runner from the task and tokenizer)."""

    vocab_size: int
    pad_token_id: int
    cls_token_id: int
    sep_token_id: int
    mask_token_id: int
    image_size: int
    num_groups: int = 1


@dataclass
class JointEncoding:
    pooled: torch.Tensor  # (B, H): the fused [CLS] representation heads classify from
    tokens: torch.Tensor  # (B, L, H): fused token states (text side for two-stream models)
    mask: torch.Tensor  # (B, L)


Batch = Mapping[str, torch.Tensor]


class VisionLanguageModel(nn.Module):
    """Base class: the runner and tasks use only these members."""

    visual_input: ClassVar[str] = "pixels"  # pixels | regions | none
    hidden_size: int

    def encode(self, batch: Batch) -> JointEncoding:
        raise NotImplementedError

    def native_head(self, kind: str, num_outputs: int) -> nn.Module | None:
        """The model's own head for a head kind (e.g. ``answer_classifier``), or None to use the task's shared head."""
        return None

    def pretrain_losses(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError(f"{type(self).__name__} has no pre-training objectives")
