"""LXMERT — Learning Cross-Modality Encoder Representations from Transformers (Tan & Bansal, EMNLP 2019; reference
code airsplay/lxmert; the port in transformers, ``LxmertModel``/``LxmertForPreTraining``, same key layout).

What we follow (see ../shared/specs/lxmert.md); weights of the reference load unchanged and give the same numbers
(``from_transformers_state_dict``, tests/models/test_lxmert.py):
- Words: BERT embeddings (word + position + segment, LayerNorm, dropout). Objects: the mean of
  LayerNorm(Linear(RoI feature)) and LayerNorm(Linear(box)), dropout.
- Language encoder (``l_layers`` BERT layers), object-relationship encoder (``r_layers``), cross-modality encoder
  (``x_layers``). A cross-modality layer: ONE cross-attention module (attention and its output dense + LayerNorm)
  shared by both directions, each direction reading the streams as they entered the layer; then per stream a
  self-attention and a feed-forward block — exactly a BERT layer, so each stream's tail is our ``TransformerLayer``.
  Pooler: tanh(Linear([CLS] language state)). ``region_mask`` is the reference's ``visual_attention_mask``.
- Pre-training as the reference code does it (``lxmert_pretrain.py``, ``LXRTPretraining``), from one forward pass:
  - ``mlm``: BERT masking (15 %, 80/10/10) on every pair, mismatched ones included (intended: airsplay/lxmert#51).
  - masked objects: 15 % of the real regions; of those 80 % zeroed, 10 % replaced by another region's feature, 10 %
    kept (the reference's ``random_feat``). ``obj_feat``: smooth-L1 (the reference's "l2" is ``SmoothL1Loss``),
    mean over feature dimensions, on the masked regions. ``obj_label``/``obj_attr``: cross-entropy against the
    detector's labels (-1 ignored) weighted by the detector's confidence, on EVERY real region — the reference's
    choice (airsplay/lxmert#19, #41); ``label_all_regions=false`` restricts them to the masked regions as the paper's
    text says. Each visual loss is a mean over regions times ``visual_loss_normalizer`` (6.67 ≈ 1 / 0.15: a
    multiplier on each loss, as in the reference and the transformers port, not a divisor of their sum).
  - ``matched``: with probability ``matching_probability`` a pair's sentence is replaced by another pair's; 2-way
    cross-entropy on the pooled output.
  - ``qa``: on matched pairs that have answers, cross-entropy against ONE answer drawn ∝ its soft score (the
    reference samples the answer; it is not BCE), from ``qa_start_step`` or ``qa_start_epochs`` on (the paper: the
    last 10 of 20 epochs). The paper also doubles the QA loss then: ``task.loss_weights.qa`` does that.
- Heads: VQA/GQA native = the reference's ``logit_fc`` (Linear(H, 2H) → GELU → LayerNorm → Linear) over the pooled
  output; NLVR2 native = the same MLP over the two pooled outputs concatenated (Linear(2H, 2H) → … → 2).

Choices the paper leaves open, and ours:
- Mismatched sentences and replacement features come from the same batch (the reference draws them from the whole
  dataset); a mismatched sentence is never the pair's own nor one of the same image (``image_ids``); a pair with no
  such sentence in the batch stays matched. MLM and object prediction still run on mismatched pairs.
- With padded regions, every visual loss divides by the number of real regions (the reference always has 36).
- Answer targets narrower than the QA head (a smaller answer table) are zero-padded; wider ones are an error.
- The reference's ``padding_idx=0`` on the position and segment embeddings freezes [CLS]'s position and segment 0
  (a BERT-code artefact); we train every row. Forward numbers are unaffected.
- A pair without any real region: SDPA gives its language tokens a zero cross-attention read-out, where the
  reference's additive mask spreads attention uniformly over padding.
- MLM and object logits are computed only where a loss needs them (the reference computes them everywhere and masks
  the loss): the same losses, less work.
- Several processes (torchrun DDP): mismatched sentences and replacement features come from the whole global batch,
  every random draw is made for the global batch (``models/global_batch.py``) and the MLM, object and QA losses are
  means over the global batch's masked tokens, real regions and answerable pairs: N processes train as one process on
  the global batch.
- Nothing is pre-trained or downloaded: ``init_checkpoint`` loads a local file of the reference's weights (the
  original release or a transformers ``LxmertModel``/``LxmertForPreTraining`` state dict).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from vlbench.errors import VlbenchError
from vlbench.models.base import (
    Batch,
    JointEncoding,
    ModelContext,
    TextSizes,
    VisionLanguageModel,
)
from vlbench.models.checkpoints import WB, attention_block_pairs, bert_layer_pairs, read_state_dict
from vlbench.models.layers import (
    MaskedLMHead,
    MLPClassifier,
    MultiHeadAttention,
    PooledNativeHeads,
    ReadPositions,
    ResidualLayerNorm,
    TextEmbeddings,
    TransformerLayer,
    TransformerStack,
    init_bert_weights,
)
from vlbench.models.losses import BatchShard, mask_caption_tokens, sample_mismatches
from vlbench.registry import MODELS


class VisualEmbeddings(nn.Module):
    """Regions → hidden: the mean of LayerNorm(Linear(feature)) and LayerNorm(Linear(box)), then dropout."""

    def __init__(self, feature_dim: int, box_dim: int, hidden_size: int, dropout: float):
        super().__init__()
        self.feature_proj = nn.Linear(feature_dim, hidden_size)
        self.feature_norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.box_proj = nn.Linear(box_dim, hidden_size)
        self.box_norm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(dropout)

    def forward(self, features: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        mixed = (self.feature_norm(self.feature_proj(features)) + self.box_norm(self.box_proj(boxes))) / 2
        return self.dropout(mixed)


class CrossModalityLayer(nn.Module):
    """One cross-modality layer: a cross-attention shared by both directions, then a BERT layer per stream."""

    def __init__(self, sizes: TextSizes):
        super().__init__()
        h, p = sizes.hidden_size, sizes.dropout
        self.cross_attention = MultiHeadAttention(h, sizes.num_heads, p)
        self.cross_attention_output = ResidualLayerNorm(h, h, p)
        self.language = TransformerLayer(sizes)  # self-attention + feed-forward of the language stream
        self.vision = TransformerLayer(sizes)

    def forward(
        self,
        language: torch.Tensor,
        language_mask: torch.Tensor | None,
        vision: torch.Tensor,
        vision_mask: torch.Tensor | None,
        language_cls_only: bool = False,
        language_positions: torch.Tensor | None = None,
        vision_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(language, vision) states; ``language_cls_only`` (the last layer under a pooled-only reader): the
        language [CLS] alone, (B, 1, H), and no vision stream (None) — the pooler reads nothing else.
        ``language_positions`` / ``vision_positions`` (B, Q): each stream at those positions alone, (B, Q, H) (the
        pre-training losses read the masked words, [CLS] and the labelled regions)."""
        # both directions read the streams as they entered the layer (the reference computes both, then updates)
        lang_read = self.cross_attention_output(self.cross_attention(language, vision, vision_mask), language)
        if language_cls_only:  # [CLS]'s self-attention reads every position of lang_read: that stays whole
            return self.language(lang_read, language_mask, first_token_only=True), None
        vis_read = self.cross_attention_output(self.cross_attention(vision, language, language_mask), vision)
        return (
            self.language(lang_read, language_mask, query_positions=language_positions),
            self.vision(vis_read, vision_mask, query_positions=vision_positions),
        )


class ObjectPredictionHead(nn.Module):
    """Masked-object heads over vision states: a shared dense → GELU → LayerNorm, then label/attribute/feature."""

    def __init__(self, hidden_size: int, num_object_labels: int, num_attr_labels: int, feature_dim: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=1e-12)
        self.obj = nn.Linear(hidden_size, num_object_labels)
        self.attr = nn.Linear(hidden_size, num_attr_labels)
        self.feat = nn.Linear(hidden_size, feature_dim)

    def transform(self, vision: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(F.gelu(self.dense(vision)))


@dataclass
class LxmertStreams:
    language: torch.Tensor  # (B, L, H) ((B, 1, H): [CLS] alone, pooled_only)
    vision: torch.Tensor | None  # (B, K, H) (None: pooled_only)
    pooled: torch.Tensor  # (B, H)


@dataclass
class PretrainInputs:
    """One pre-training batch after the random corruption: what the reference's data loader hands its model."""

    input_ids: torch.Tensor  # (B, L) sentences after mismatching and MLM masking
    attention_mask: torch.Tensor  # (B, L)
    mlm_labels: torch.Tensor  # (B, L) original ids where masked, -100 elsewhere
    region_features: torch.Tensor  # (B, K, D) after object masking
    region_boxes: torch.Tensor  # (B, K, 4)
    region_mask: torch.Tensor  # (B, K) bool, real regions
    target_features: torch.Tensor  # (B, K, D) the features before masking
    masked_regions: torch.Tensor  # (B, K) bool
    matched: torch.Tensor  # (B,) long, 1 = the sentence belongs to the image
    object_ids: torch.Tensor | None = None  # (B, K) -1 = none
    object_conf: torch.Tensor | None = None  # (B, K)
    attr_ids: torch.Tensor | None = None
    attr_conf: torch.Tensor | None = None
    qa_answers: torch.Tensor | None = None  # (B,) one sampled answer per QA pair, -100 elsewhere; None: no QA
    token_type_ids: torch.Tensor | None = None
    shard: BatchShard | None = None  # these rows' place in the step's global batch (None: a whole batch)


def mask_regions(
    features: torch.Tensor, region_mask: torch.Tensor, probability: float, shard: BatchShard | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's ``random_feat``: choose ``probability`` of the real regions; of those 80 % → zeros, 10 % →
    another real region's feature (from the global batch), 10 % kept. Returns (masked features, chosen (B, K) bool)."""
    shard = shard or BatchShard(features.shape[0])
    draws = shard.uniform(region_mask.shape[1], 3, device=features.device)  # (B, K, 3): choose, kind, which
    chosen = (draws[..., 0] < probability) & region_mask
    masked = features.clone()
    masked[chosen & (draws[..., 1] < 0.8)] = 0.0
    replace = chosen & (draws[..., 1] >= 0.8) & (draws[..., 1] < 0.9)
    real = shard.gather(features)[shard.gather(region_mask)]  # (N_real, D) of the global batch, in its order
    if replace.any():
        which = (draws[..., 2] * real.shape[0]).long().clamp(max=real.shape[0] - 1)
        masked[replace] = real[which[replace]]
    return masked, chosen


def sample_answers(scores: torch.Tensor, usable: torch.Tensor, shard: BatchShard | None = None) -> torch.Tensor:
    """One answer per usable row drawn ∝ its soft scores (the reference's QA label); -100 where none."""
    shard = shard or BatchShard(scores.shape[0])
    scores = scores.float().clamp(min=0)
    usable = usable & (scores.sum(dim=1) > 0)
    weights = torch.where(usable[:, None], scores, torch.ones_like(scores))
    drawn = shard.choose(weights).squeeze(1)
    return torch.where(usable, drawn, torch.full_like(drawn, -100))


@MODELS.register("lxmert")
class LXMERT(PooledNativeHeads, VisionLanguageModel):
    encodes_pooled_only = True  # the last fused layer can compute [CLS] alone
    objective_kinds = ("pretrain",)  # retrieval uses the shared matching head (no native ranking objective)
    visual_input = "regions"
    inputs_replaced_by_tokens = ("region_features", "region_boxes", "input_ids")
    pretrain_uses_qa = True  # the pretrain task adds LXMERT's image-QA pairs (qa_targets, qa_mask) for this model

    def __init__(self, cfg: DictConfig, ctx: ModelContext):
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx
        sizes = TextSizes(**cfg.text)
        h = self.hidden_size = sizes.hidden_size
        self.embeddings = TextEmbeddings(ctx.vocab_size, sizes)
        self.visual_embeddings = VisualEmbeddings(cfg.visual_feature_dim, cfg.visual_pos_dim, h, sizes.dropout)
        self.language_encoder = TransformerStack(sizes, cfg.l_layers)
        self.object_encoder = TransformerStack(sizes, cfg.r_layers)
        self.cross_encoder = nn.ModuleList(CrossModalityLayer(sizes) for _ in range(cfg.x_layers))
        self.pooler = nn.Linear(h, h)
        # pre-training heads
        self.mlm_head = MaskedLMHead(self.embeddings.word_embeddings)
        self.match_head = nn.Linear(h, 2)
        self.object_head = ObjectPredictionHead(h, cfg.num_object_labels, cfg.num_attr_labels, cfg.visual_feature_dim)
        self.qa_head = MLPClassifier(h, 2 * h, cfg.num_qa_labels, dropout=0.0) if cfg.num_qa_labels > 0 else None
        init_bert_weights(self)
        if cfg.init_checkpoint:
            self.load_reference_weights(load_lxmert_checkpoint(cfg.init_checkpoint))

    # ----- the contract -----------------------------------------------------------------------------------------
    def encode(self, batch: Batch, pooled_only: bool = False) -> JointEncoding:
        streams = self.encode_streams(batch, pooled_only)
        language = None if pooled_only else streams.language
        return JointEncoding(pooled=streams.pooled, tokens=language, mask=batch["attention_mask"])

    def encode_streams(self, batch: Batch, pooled_only: bool = False) -> LxmertStreams:
        """Language and vision states and the pooled output (the pre-training heads read the vision states)."""
        return self._forward(
            batch["input_ids"],
            batch["attention_mask"],
            batch["region_features"],
            batch["region_boxes"],
            batch.get("region_mask"),
            batch.get("token_type_ids"),
            pooled_only,
        )

    def match_scores(self, batch: Batch) -> torch.Tensor:
        """The matching head's positive logit per pair: retrieval reranks with it."""
        return self.match_head(self.encode(batch, self.skip_unread_states).pooled)[:, 1]

    def unimodal_tokens(self, batch: Batch) -> dict[str, torch.Tensor]:
        """The language and object-relationship encoders' outputs: each stream is unimodal until the cross-modality
        layers, so retrieval encodes each caption and image once and runs only those layers per pair."""
        tokens = {}
        if "region_features" in batch:
            tokens["object_states"] = self._object_states(
                batch["region_features"], batch["region_boxes"], batch.get("region_mask")
            )
        if "input_ids" in batch:
            tokens["language_states"] = self._language_states(
                batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
            )
        return tokens

    def encode_from_tokens(self, tokens: Batch, pooled_only: bool = False) -> JointEncoding:
        streams = self._cross(
            tokens["language_states"],
            tokens["attention_mask"],
            tokens["object_states"],
            tokens.get("region_mask"),
            pooled_only,
        )
        language = None if pooled_only else streams.language
        return JointEncoding(pooled=streams.pooled, tokens=language, mask=tokens["attention_mask"])

    def match_scores_from_tokens(self, tokens: Batch) -> torch.Tensor:
        return self.match_head(self.encode_from_tokens(tokens, self.skip_unread_states).pooled)[:, 1]

    def pretrain_losses(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """MLM, masked-object (feature, label, attribute), matching and — from ``qa_start_step`` — QA losses."""
        return self.losses_from(self.corrupt(batch, step))

    # ----- pre-training -------------------------------------------------------------------------------------------
    def _forward(
        self,
        input_ids,
        attention_mask,
        features,
        boxes,
        region_mask=None,
        token_type_ids=None,
        pooled_only=False,
        read: tuple[ReadPositions, ReadPositions] | None = None,
    ):
        language = self._language_states(input_ids, attention_mask, token_type_ids)
        vision = self._object_states(features, boxes, region_mask)
        return self._cross(language, attention_mask, vision, region_mask, pooled_only, read)

    def _language_states(self, input_ids, attention_mask, token_type_ids=None) -> torch.Tensor:
        return self.language_encoder(self.embeddings(input_ids, token_type_ids), attention_mask)

    def _object_states(self, features, boxes, region_mask=None) -> torch.Tensor:
        return self.object_encoder(self.visual_embeddings(features, boxes), region_mask)

    def _cross(self, language, attention_mask, vision, region_mask=None, pooled_only=False, read=None) -> LxmertStreams:
        """The cross-modality layers and the pooler over the two unimodal streams (``pooled_only``: the last layer
        computes the language [CLS] alone and no vision stream; ``read``, (language, vision) positions: it computes
        those alone — the language ones keep [CLS] first, for the pooler)."""
        last = len(self.cross_encoder) - 1
        for depth, layer in enumerate(self.cross_encoder):
            positions = (None, None) if read is None or depth != last else (read[0].index, read[1].index)
            language, vision = layer(
                language, attention_mask, vision, region_mask, pooled_only and depth == last, *positions
            )
        return LxmertStreams(language=language, vision=vision, pooled=torch.tanh(self.pooler(language[:, 0])))

    def corrupt(self, batch: Batch, step: int) -> PretrainInputs:
        """The random part of pre-training (mismatch sentences, mask words and objects, draw QA answers), in the
        order the reference applies it. In evaluation it uses the global RNG (the pretrain task forks it); in
        training the draws are the global batch's (``batch_shard``)."""
        cfg = self.cfg
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        features = batch["region_features"]
        batch_size, device = input_ids.shape[0], input_ids.device
        shard = self.batch_shard(batch_size)
        region_mask = batch.get("region_mask")
        region_mask = (
            torch.ones(features.shape[:2], dtype=torch.bool, device=device)
            if region_mask is None
            else region_mask.bool()
        )

        sentence, matched = sample_mismatches(
            batch_size, cfg.matching_probability, batch.get("image_ids"), device, shard
        )  # sentence: an index into the global batch
        pad = self.ctx.pad_token_id
        input_ids, attention_mask = (
            shard.gather(input_ids, pad_value=pad)[sentence],
            shard.gather(attention_mask)[sentence],
        )
        token_type_ids = batch.get("token_type_ids")
        token_type_ids = None if token_type_ids is None else shard.gather(token_type_ids)[sentence]
        masked_ids, mlm_labels = mask_caption_tokens(self.ctx, input_ids, attention_mask, cfg.mlm_probability, shard)
        masked_features, masked_regions = mask_regions(features, region_mask, cfg.object_mask_probability, shard)

        qa_answers = None
        if self.qa_enabled(batch, step):
            scores = batch["qa_targets"]
            if scores.shape[1] > cfg.num_qa_labels:
                raise VlbenchError(
                    f"qa_targets has {scores.shape[1]} answers but model.num_qa_labels={cfg.num_qa_labels}: "
                    "set model.num_qa_labels to at least the answer table's size"
                )
            qa_answers = sample_answers(scores, batch["qa_mask"].bool() & matched, shard)

        def label(name: str) -> torch.Tensor | None:
            return batch.get(f"region_{name}")

        for name, size in (("object_ids", cfg.num_object_labels), ("attr_ids", cfg.num_attr_labels)):
            ids = label(name)
            if ids is not None and ids.numel() and int(ids.max()) >= size:  # CUDA would only say "device assert"
                field = "num_object_labels" if name == "object_ids" else "num_attr_labels"
                raise VlbenchError(f"region_{name} reach {int(ids.max())} but model.{field}={size}: raise it")

        return PretrainInputs(
            input_ids=masked_ids,
            attention_mask=attention_mask,
            mlm_labels=mlm_labels,
            region_features=masked_features,
            region_boxes=batch["region_boxes"],
            region_mask=region_mask,
            target_features=features,
            masked_regions=masked_regions,
            matched=matched.long(),
            object_ids=label("object_ids"),
            object_conf=label("object_conf"),
            attr_ids=label("attr_ids"),
            attr_conf=label("attr_conf"),
            qa_answers=qa_answers,
            token_type_ids=token_type_ids,
            shard=shard,
        )

    def qa_start(self) -> int:
        """The first step with the QA objective: ``qa_start_epochs`` passes over the training split when set (the
        paper's unit), else ``qa_start_step``."""
        if self.cfg.qa_start_epochs > 0 and self.ctx.steps_per_epoch > 0:
            return math.ceil(self.cfg.qa_start_epochs * self.ctx.steps_per_epoch)
        return self.cfg.qa_start_step

    def qa_enabled(self, batch: Batch, step: int) -> bool:
        """QA trains when the model has the head, the step has come, and the batch carries answers."""
        return self.qa_head is not None and step >= self.qa_start() and "qa_targets" in batch and "qa_mask" in batch

    def losses_from(self, inputs: PretrainInputs) -> dict[str, torch.Tensor]:
        """Every objective from one forward pass over the corrupted batch (deterministic given ``inputs``). Losses
        counted per token, region or answer are means over the global batch (``BatchShard.mean``)."""
        shard = inputs.shard or BatchShard(inputs.input_ids.shape[0])
        chosen = inputs.mlm_labels != -100
        labelled = self._labelled_regions(inputs)
        # skip_unread_states: the last cross-modality layer computes [CLS], the masked words and the labelled
        # regions alone — all the losses below read
        read = (
            (ReadPositions.of(chosen, keep_first=True), ReadPositions.of(labelled)) if self.skip_unread_states else None
        )
        streams = self._forward(
            inputs.input_ids,
            inputs.attention_mask,
            inputs.region_features,
            inputs.region_boxes,
            inputs.region_mask,
            inputs.token_type_ids,
            read=read,
        )
        words, regions = (
            (streams.language[chosen], streams.vision[labelled])
            if read is None
            else (streams.language[read[0].picked], streams.vision[read[1].picked])
        )
        # the sums below are empty where nothing is masked or answerable here: zeros that keep every head in the graph
        mlm = F.cross_entropy(self.mlm_head(words), inputs.mlm_labels[chosen], reduction="sum")
        losses = {"mlm": shard.mean(mlm, chosen.sum())}
        losses.update(self._object_losses(regions, labelled, inputs, shard))
        losses["matched"] = F.cross_entropy(self.match_head(streams.pooled), inputs.matched)
        if inputs.qa_answers is not None:
            answerable = inputs.qa_answers >= 0
            logits = self.qa_head(streams.pooled[answerable])
            qa = F.cross_entropy(logits, inputs.qa_answers[answerable], reduction="sum")
            losses["qa"] = shard.mean(qa, answerable.sum())
        return losses

    def _labelled_regions(self, inputs: PretrainInputs) -> torch.Tensor:
        """(B, K) bool: the regions the object losses read — every real one (``label_all_regions``) or the masked."""
        return inputs.region_mask if self.cfg.label_all_regions else inputs.masked_regions

    def _object_losses(
        self, regions: torch.Tensor, labelled: torch.Tensor, inputs: PretrainInputs, shard: BatchShard
    ) -> dict[str, torch.Tensor]:
        """Masked-object losses from the ``labelled`` regions' states (N, H), in ``vision[labelled]`` order; each a
        (confidence-weighted) mean over the real regions × the normaliser."""
        cfg, head = self.cfg, self.object_head
        real, masked = inputs.region_mask, inputs.masked_regions
        hidden = head.transform(regions)  # (N, H)
        masked_among = masked[labelled]  # which of those rows are masked regions
        regression = F.smooth_l1_loss(
            head.feat(hidden[masked_among]), inputs.target_features[masked].to(hidden.dtype), reduction="none"
        )

        def scaled_mean(total: torch.Tensor) -> torch.Tensor:
            return shard.mean(total, real.sum()) * cfg.visual_loss_normalizer

        losses = {"obj_feat": scaled_mean(regression.mean(dim=-1).sum())}
        for name, ids, conf, decoder in (
            ("obj_label", inputs.object_ids, inputs.object_conf, head.obj),
            ("obj_attr", inputs.attr_ids, inputs.attr_conf, head.attr),
        ):
            if ids is None:
                continue
            targets = ids[labelled]
            weights = (targets >= 0).float() if conf is None else conf[labelled].float()
            ce = F.cross_entropy(decoder(hidden), targets, ignore_index=-1, reduction="none")
            losses[name] = scaled_mean((ce * weights).sum())
        return losses

    # ----- reference weights ------------------------------------------------------------------------------------
    def load_reference_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a converted reference state dict: every backbone tensor must be there; heads may be absent (an
        ``LxmertModel`` file has none) and then keep their initialisation."""
        ours = self.state_dict()
        wrong = [
            f"{k}: {tuple(v.shape)} vs ours {tuple(ours[k].shape)}"
            for k, v in state_dict.items()
            if k in ours and v.shape != ours[k].shape
        ]
        if wrong:
            raise VlbenchError("LXMERT checkpoint does not fit the configured sizes: " + "; ".join(wrong[:8]))
        missing, unexpected = self.load_state_dict(state_dict, strict=False)
        heads = ("mlm_head.", "match_head.", "object_head.", "qa_head.")
        missing_backbone = [k for k in missing if not k.startswith(heads)]
        if missing_backbone or unexpected:
            raise VlbenchError(
                f"LXMERT checkpoint does not fit the configuration: missing {missing_backbone[:8]}, "
                f"unexpected {unexpected[:8]} (check model.l_layers/r_layers/x_layers)"
            )


# ----- the reference's key layout (original release and transformers) ----------------------------------------------
def reference_key_pairs(l_layers: int, r_layers: int, x_layers: int) -> list[tuple[str, str]]:
    """Every (transformers/original key, our key) of an LXMERT with these depths, heads included."""
    pairs = [
        (f"lxmert.embeddings.{n}", f"embeddings.{n}")
        for n in (
            "word_embeddings.weight",
            "position_embeddings.weight",
            "token_type_embeddings.weight",
            "LayerNorm.weight",
            "LayerNorm.bias",
        )
    ]
    visual = {
        "visn_fc": "feature_proj",
        "visn_layer_norm": "feature_norm",
        "box_fc": "box_proj",
        "box_layer_norm": "box_norm",
    }
    pairs += [(f"lxmert.encoder.visn_fc.{r}.{p}", f"visual_embeddings.{o}.{p}") for r, o in visual.items() for p in WB]
    bert = ("attention.self", "attention.output", "intermediate.dense", "output")
    for i in range(l_layers):
        pairs += bert_layer_pairs(f"lxmert.encoder.layer.{i}", f"language_encoder.layer.{i}", *bert)
    for i in range(r_layers):
        pairs += bert_layer_pairs(f"lxmert.encoder.r_layers.{i}", f"object_encoder.layer.{i}", *bert)
    for i in range(x_layers):
        ref, ours = f"lxmert.encoder.x_layers.{i}", f"cross_encoder.{i}"
        pairs += attention_block_pairs(
            ref, ours, "visual_attention.att", "visual_attention.output", "cross_attention", "cross_attention_output"
        )
        for stream, name in (("lang", "language"), ("visn", "vision")):
            parts = (
                f"{stream}_self_att.self",
                f"{stream}_self_att.output",
                f"{stream}_inter.dense",
                f"{stream}_output",
            )
            pairs += bert_layer_pairs(ref, f"{ours}.{name}", *parts)
    pairs += [(f"lxmert.pooler.dense.{p}", f"pooler.{p}") for p in WB]
    pairs += [(f"cls.predictions.transform.{s}.{p}", f"mlm_head.{s}.{p}") for s in ("dense", "LayerNorm") for p in WB]
    pairs += [
        ("cls.predictions.bias", "mlm_head.decoder.bias"),
        ("cls.predictions.decoder.weight", "mlm_head.decoder.weight"),
    ]
    pairs += [(f"cls.seq_relationship.{p}", f"match_head.{p}") for p in WB]
    pairs += [
        (f"obj_predict_head.transform.{s}.{p}", f"object_head.{s}.{p}") for s in ("dense", "LayerNorm") for p in WB
    ]
    pairs += [
        (f"obj_predict_head.decoder_dict.{k}.{p}", f"object_head.{k}.{p}") for k in ("obj", "attr", "feat") for p in WB
    ]
    pairs += [
        (f"answer_head.logit_fc.{r}.{p}", f"qa_head.net.{o}.{p}") for r, o in ((0, 0), (2, 2), (3, 4)) for p in WB
    ]
    return pairs


def _depths(keys, patterns: tuple[str, str, str]) -> tuple[int, ...]:
    """Number of language / relationship / cross layers named in a key set."""
    depths = []
    for pattern in patterns:
        found = [int(m.group(1)) for k in keys if (m := re.match(pattern, k))]
        depths.append(max(found) + 1 if found else 0)
    return tuple(depths)


def from_transformers_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers ``LxmertModel``/``LxmertForPreTraining`` state dict, or the original release's (``bert.``
    prefix, optionally ``module.`` from DataParallel), as our LXMERT's keys. Unknown keys are an error, listed."""
    normalised = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith("bert."):
            key = "lxmert." + key.removeprefix("bert.")
        elif not key.startswith(("lxmert.", "cls.", "obj_predict_head.", "answer_head.")):
            key = "lxmert." + key  # a bare LxmertModel state dict
        normalised[key] = value
    depths = _depths(
        normalised,
        (
            r"lxmert\.encoder\.layer\.(\d+)\.",
            r"lxmert\.encoder\.r_layers\.(\d+)\.",
            r"lxmert\.encoder\.x_layers\.(\d+)\.",
        ),
    )
    mapping = dict(reference_key_pairs(*depths))
    ignored = {"lxmert.embeddings.position_ids"}
    unknown = sorted(k for k in normalised if k not in mapping and k not in ignored)
    if unknown:
        raise VlbenchError(f"LXMERT checkpoint: {len(unknown)} keys we cannot map: {', '.join(unknown[:12])}")
    converted = {mapping[k]: v for k, v in normalised.items() if k in mapping}
    if "mlm_head.decoder.bias" in converted and "mlm_head.decoder.weight" not in converted:  # tied, often not saved
        converted["mlm_head.decoder.weight"] = converted["embeddings.word_embeddings.weight"]
    return converted


def to_transformers_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our LXMERT's state dict in transformers' ``LxmertForPreTraining`` layout (heads that we have)."""
    depths = _depths(
        state_dict, (r"language_encoder\.layer\.(\d+)\.", r"object_encoder\.layer\.(\d+)\.", r"cross_encoder\.(\d+)\.")
    )
    mapping = {ours: ref for ref, ours in reference_key_pairs(*depths)}
    unknown = sorted(k for k in state_dict if k not in mapping)
    if unknown:
        raise VlbenchError(f"LXMERT state dict: {len(unknown)} keys with no reference name: {', '.join(unknown[:12])}")
    return {mapping[k]: v for k, v in state_dict.items()}


def load_lxmert_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a local reference checkpoint (``.safetensors``, or a torch ``.bin``/``.pth`` state dict such as the
    original ``model_LXRT.pth``) and convert it to our keys. Nothing is downloaded."""
    return from_transformers_state_dict(read_state_dict(path, "model.init_checkpoint"))
