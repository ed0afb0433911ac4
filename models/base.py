"""The model side of the model ↔ task contract.

A model is a plain ``nn.Module`` that knows no dataset or metric. It declares what visual input it eats
(``pixels``, ``regions`` or ``none``), returns a joint encoding for a text–image batch, and may offer native heads
and pre-training losses. Batches are dicts of tensors with these keys:

- ``input_ids`` (B, L), ``attention_mask`` (B, L): tokenised text, [CLS] first.
- ``pixel_values`` (B, 3, H, W): normalised images, for ``visual_input == "pixels"``.
- ``group_ids`` (B,): the task's prior group of each example (VQA: question type), for blind baselines.
- ``region_features`` (B, K, D), ``region_boxes`` (B, K, 4) normalised x1, y1, x2, y2, ``region_mask`` (B, K), and
  the detector's labels ``region_object_ids``/``region_attr_ids`` (B, K; -1 none) with ``*_conf``: ``regions`` models.
- ``image_ids`` (B,): which image each caption shows (retrieval, pre-training), so captions of one image are not
  each other's negatives.
- task targets (e.g. ``targets`` (B, num_answers) soft scores for VQA).
Multi-image examples (NLVR2) carry the visual keys suffixed ``_img0``, ``_img1``; the task feeds one image at a time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from vlbench.models.global_batch import BatchShard


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
    steps_per_epoch: int = 0  # optimiser steps per pass over the training split (0: unknown); for schedules in epochs
    # per-example randomness in training (masks, negatives, mismatches): the runner reseeds it from (seed, step) on
    # every process, so the draws for the global batch are the same however many processes share it (None: global RNG)
    sample_generator: torch.Generator | None = None

    @classmethod
    def for_tokenizer(cls, tokenizer, image_size: int, **extra) -> ModelContext:
        """The context of a (transformers) tokenizer's vocabulary and special tokens."""
        return cls(
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id,
            mask_token_id=tokenizer.mask_token_id,
            image_size=image_size,
            **extra,
        )


@dataclass
class JointEncoding:
    pooled: torch.Tensor  # (B, H): the fused [CLS] representation heads classify from
    # (B, L, H): fused token states (text side for two-stream models); None when only ``pooled`` was asked for
    # (``encode(..., pooled_only=True)``): the last fused layer then computed [CLS] alone
    tokens: torch.Tensor | None
    mask: torch.Tensor  # (B, L)


Batch = Mapping[str, torch.Tensor]


class VisionLanguageModel(nn.Module):
    """Base class: the runner and tasks use only these members."""

    visual_input: ClassVar[str] = "pixels"  # pixels | regions | none
    # raw inputs that ``encode_from_tokens`` does not read once ``unimodal_tokens`` are cached (retrieval leaves
    # them out of its pair batches)
    inputs_replaced_by_tokens: ClassVar[tuple[str, ...]] = ()
    hidden_size: int
    # False for the 2nd…k-th micro-batch of an accumulated optimizer step (set by the runner): state that the reference
    # updates once per iteration (ALBEF's momentum EMA) is updated on the first only, so accumulating k micro-batches
    # behaves like one k-times larger batch and not like k iterations
    first_micro_batch: bool = True
    # ``encode``/``encode_from_tokens`` take ``pooled_only`` (our families): with it the last fused layer computes
    # [CLS] alone. A model whose ``encode(batch)`` does not take it is called without it
    encodes_pooled_only: ClassVar[bool] = False
    # ``trainer.skip_unread_states`` (set by the runner): where a head or objective reads only the pooled [CLS], skip
    # the token states nothing reads — the same function, up to float rounding. False here: a model built outside a
    # run computes everything
    skip_unread_states: bool = False

    def encode(self, batch: Batch, pooled_only: bool = False) -> JointEncoding:
        """The joint encoding; ``pooled_only``: the caller reads ``pooled`` alone, so a model may skip what only
        ``tokens`` need and leave them None (one with nothing to skip returns them anyway)."""
        raise NotImplementedError

    def batch_shard(self, size: int) -> BatchShard:
        """In training, this process's ``size`` rows of the step's global batch (``models/global_batch.py``); in
        evaluation a whole batch. Objectives that look across examples or draw per example go through it."""
        ctx = getattr(self, "ctx", None)
        return BatchShard.of(size, self.training, getattr(ctx, "sample_generator", None))

    def native_head(
        self, kind: str, num_outputs: int, answer_token_ids: list[list[int]] | None = None
    ) -> nn.Module | None:
        """The model's own head for a head kind (e.g. ``answer_classifier``), or None to use the task's shared head.

        ``answer_token_ids``: the task's candidate answers as token sequences ([CLS] answer [SEP]), for generative
        answer heads; classifier heads need only ``num_outputs``."""
        return None

    def adapt_checkpoint(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Adapt another run's weights to this configuration before they are loaded (e.g. ViT position embeddings
        saved at another resolution); unchanged by default."""
        return state_dict

    def pretrain_losses(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """The model's own pre-training objectives, each separately (the pretrain task sums and logs them)."""
        raise NotImplementedError(f"{type(self).__name__} has no pre-training objectives")

    # ----- retrieval (optional): models with unimodal embeddings and/or their own matching head --------------------
    def embed_image(self, batch: Batch) -> torch.Tensor | None:
        """L2-normalised unimodal image embeddings (B, E) for contrastive retrieval, or None when the model has none."""
        return None

    def embed_text(self, batch: Batch) -> torch.Tensor | None:
        """L2-normalised unimodal text embeddings (B, E), or None."""
        return None

    def match_scores(self, batch: Batch) -> torch.Tensor | None:
        """The model's own image-text matching score (B,) for each pair of the batch, or None."""
        return None

    def unimodal_tokens(self, batch: Batch) -> dict[str, torch.Tensor] | None:
        """Per-example unimodal encodings that ``encode_from_tokens`` fuses (ALBEF: image tokens from pixels, text
        tokens from ids), so retrieval encodes each image and caption once and runs only the fusion per pair; None
        when the model cannot split its encoding this way. A model that returns them implements
        ``encode_from_tokens`` (and ``match_scores_from_tokens`` when it has ``match_scores``)."""
        return None

    def encode_from_tokens(self, tokens: Batch, pooled_only: bool = False) -> JointEncoding:
        """``encode`` of a batch of pairs from cached ``unimodal_tokens`` (plus the pairs' raw inputs, e.g.
        ``attention_mask``): equal to ``encode`` of the raw pairs in evaluation."""
        raise NotImplementedError

    def match_scores_from_tokens(self, tokens: Batch) -> torch.Tensor:
        """``match_scores`` from cached ``unimodal_tokens`` of a batch of pairs (plus ``attention_mask``)."""
        raise NotImplementedError

    def retrieval_losses(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """The model's own retrieval fine-tuning objectives (``head=native`` on the retrieval task)."""
        raise NotImplementedError(f"{type(self).__name__} has no retrieval objectives of its own")


def pooled_only_for(model: VisionLanguageModel, head: nn.Module) -> bool:
    """Whether ``model`` may encode for ``head`` computing the pooled [CLS] alone: the head says it reads nothing
    else (``reads_pooled_only``), the model can (``encodes_pooled_only``) and the run allows it
    (``trainer.skip_unread_states``)."""
    return bool(
        getattr(head, "reads_pooled_only", False)
        and getattr(model, "encodes_pooled_only", False)
        and getattr(model, "skip_unread_states", False)
    )


def encode_for(model: VisionLanguageModel, head: nn.Module, batch: Batch, from_tokens: bool = False) -> JointEncoding:
    """``model.encode(batch)`` (``encode_from_tokens`` with ``from_tokens``) as ``head`` reads it: the pooled [CLS]
    alone where ``pooled_only_for`` allows, everything otherwise."""
    encode = model.encode_from_tokens if from_tokens else model.encode
    return encode(batch, pooled_only=True) if pooled_only_for(model, head) else encode(batch)


class GenerativeAnswerHead(nn.Module):
    """A native answer head that generates answers (scores a candidate list) instead of classifying the joint [CLS].

    It reads the model's token states (and, for distillation, its momentum model) itself, so the task hands it the
    model: ``answer_losses`` in training, ``answer_scores`` (B, num_candidates) for prediction (arg-max = answer).
    """

    def answer_losses(self, model: VisionLanguageModel, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def answer_scores(self, model: VisionLanguageModel, batch: Batch) -> torch.Tensor:
        raise NotImplementedError


class TwoImageHead(nn.Module):
    """A native head for a text about two images that runs the model's encoders itself (ALBEF's NLVR2 fusion reads
    both images in every fusion layer): ``pair_logits`` for NLVR2 and ``assignment_logits`` for text assignment
    (does the text match the first image, the second, or neither). One class for both, so an assignment-trained head
    carries over to NLVR2 with ``init_from``."""

    def pair_logits(self, model: VisionLanguageModel, first: Batch, second: Batch) -> torch.Tensor:
        raise NotImplementedError

    def pair_teacher(
        self, model: VisionLanguageModel, first: Batch, second: Batch, step: int
    ) -> tuple[torch.Tensor, float] | None:
        """In training, (teacher logits, weight) to distil ``pair_logits`` towards (ALBEF's momentum model), or None."""
        return None

    def assignment_logits(self, model: VisionLanguageModel, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, 3), labels (B,)) for in-batch image pairs built around each caption."""
        raise NotImplementedError


class ModelObjectives(nn.Module):
    """The native "head" of tasks whose native form is the model's own objectives and scores (ALBEF retrieval:
    ITC + ITM). It holds no parameters; the task sees it and calls the model's methods instead of a head."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("ModelObjectives is a marker: the task calls the model's objectives directly")
