"""UNIMO-3 — multi-granularity interaction for vision-language representation learning (Yang, Gao, Liu, Xiao, Zhao,
Qin; arXiv 2305.13697, 2023). No official code, and only the abstract was available to us (../shared/specs/unimo3.md).

What the abstract fixes, and we follow:
- A cross-modal encoder that learns in-layer interaction (a layer of one modality attends to the other modality's same
  layer) and cross-layer interaction (connections between different layers) simultaneously.
- An adaptive mechanism that captures the interaction of the two modalities at different levels.
- The ablation that cross-layer learning helps: ``cross_layer=false`` is the in-layer model (it reduces to it exactly,
  tested); ``gate=average`` keeps the levels but removes the adaptivity.

Choices the abstract leaves open, and ours (a config field wherever it is a choice between designs):
- Unimodal encoders: a ViT (timm) and a BERT text encoder of ``text_layers`` layers, as the contemporaneous two-tower +
  fusion designs (METER, BridgeTower, ManagerTower). Nothing is pre-trained or downloaded.
- Cross-modal encoder: two streams (text, vision) of ``cross_layers`` layers with the text sizes. A layer, per
  stream: self-attention → cross-attention to the other stream → feed-forward (post-LN BERT blocks,
  ``TransformerLayer``; METER's co-attention layer); both streams read each other as they entered the layer. Stream
  inputs: each encoder's top layer → Linear → LayerNorm.
- Levels a stream's cross-attention reads: the in-layer level (the other stream entering the layer) plus, with
  ``cross_layer=true``, cross-layer levels chosen by ``cross_layer_source``: ``unimodal`` — the top ``unimodal_levels``
  layers (0: all) of the other modality's unimodal encoder, through that stream's input Linear (shared by all levels,
  as BridgeTower's) — or ``cross_modal`` — the other stream's outputs of every earlier cross-modal layer (its input
  included; the first layer then has only the in-layer level). ViT levels are block outputs through the ViT's final
  LayerNorm; every cross-layer level gets its own LayerNorm per layer.
- The gate (``gate=adaptive``): per example and layer, g = softmax(Linear(masked mean of the stream's states entering
  the layer)) over the levels; the context (keys and values) is Σ_k g_k · level_k. The in-layer level enters as it is
  (already a LayerNorm output), so a gate all on it is exactly the in-layer model. ``gate=average``: g uniform.
- Pooled output (``hidden_size`` = 2 × the cross-modal hidden size): tanh(Linear) of each stream's [CLS], concatenated
  (METER, BridgeTower). Shared heads, the ITM head and the native heads read it.
- Objectives (``pretrain_losses``): the abstract names none; the spec calls ITC, ITM and MLM this family's standard
  set, and we use those. ITC on the unimodal [CLS] states (projections to ``embed_dim``, learnable temperature clamped
  as in ALBEF), the global batch's negatives, no momentum encoder or queue (the abstract mentions none). ITM on the
  pooled output: per image a hard negative text, per text a hard negative image, ∝ softmax(ITC similarity). MLM: BERT
  masking (15 %, 80/10/10), predicted from the cross-modal text stream. Several processes (torchrun DDP): ITC's
  negatives, the MLM masks and MLM's mean over masked tokens are the global batch's; ITM negatives are drawn within
  each process's batch (as the ALBEF reference does).
- Native heads (the abstract describes none): VQA/GQA an MLP over the pooled output; NLVR2 the same over both pairs'
  pooled outputs concatenated (``PooledMLPHead``); retrieval and pre-training the model's own objectives (ITC ranking,
  ITM re-ranking).
- Retrieval re-ranks from cached unimodal encodings (``unimodal_tokens``): with ``cross_layer_source=unimodal`` the
  cache holds every level the cross-modal layers read, ``unimodal_levels`` times ALBEF's cache (base, 5k COCO test
  images at 384 px: ~100 GB instead of ~9). ``retrieval_cache=false`` re-encodes each pair instead (in evaluation,
  and in shared-head retrieval training, which otherwise encodes each image and caption of a batch once); or lower
  ``unimodal_levels``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from vlbench.errors import VlbenchError
from vlbench.models.base import Batch, JointEncoding, ModelContext, TextSizes, VisionLanguageModel
from vlbench.models.checkpoints import resample_vit_pos_embeds
from vlbench.models.layers import (
    MaskedLMHead,
    PooledNativeHeads,
    ReadPositions,
    TextEncoder,
    TransformerLayer,
    build_vit,
    init_bert_weights,
)
from vlbench.models.losses import in_batch_contrastive_loss, itm_pair_indices, mask_caption_tokens
from vlbench.registry import MODELS

SOURCES = ("unimodal", "cross_modal")
GATES = ("adaptive", "average")


def text_layer_states(
    encoder: TextEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, count: int
) -> torch.Tensor:
    """The text encoder's top ``count`` layer outputs, (B, count, L, H), the top layer last."""
    x = encoder.embeddings(input_ids)
    states = []
    for layer in encoder.encoder.layer:
        x = layer(x, attention_mask)
        states.append(x)
    return torch.stack(states[-count:], dim=1)


def vit_layer_states(vit: nn.Module, pixel_values: torch.Tensor, count: int) -> torch.Tensor:
    """A timm ViT's top ``count`` block outputs through its final LayerNorm, (B, count, 1 + N, D), [CLS] first and the
    top layer (= ``forward_features``) last."""
    levels = vit.forward_intermediates(
        pixel_values, indices=count, return_prefix_tokens=True, norm=True, output_fmt="NLC", intermediates_only=True
    )
    return torch.stack([torch.cat([prefix, spatial], dim=1) for spatial, prefix in levels], dim=1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, N, H) averaged over the positions where ``mask`` (B, N) is set (all when None)."""
    if mask is None:
        return x.mean(dim=1)
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)


LEVEL_NORM_EPS = 1e-12  # BERT's LayerNorm epsilon, as every LayerNorm of the cross-modal encoder


def normalise_levels(levels: torch.Tensor) -> torch.Tensor:
    """(B, K, N, H) levels standardised over H without an affine: the part of each gate's per-level LayerNorm that
    does not depend on the layer, computed once per fusion instead of once per cross-modal layer."""
    return F.layer_norm(levels, levels.shape[-1:], eps=LEVEL_NORM_EPS)


class LevelGate(nn.Module):
    """The context one stream's cross-attention reads: Σ_k g_k · level_k over the other modality's levels — level 0
    the in-layer states as they are, the cross-layer levels each through its own LayerNorm; g a softmax over
    Linear(masked mean of the query stream) (``adaptive``) or uniform.

    The cross-layer levels arrive standardised (``normalise_levels``, shared by every layer that reads them); each
    LayerNorm's affine is folded into the sum: Σ_k g_k (γ_k ⊙ x̂_k + β_k) = Σ_k (g_k γ_k) ⊙ x̂_k + Σ_k g_k β_k. The same
    arithmetic as K LayerNorms, a stack and a weighted sum per layer, without materialising K normalised copies per
    layer (UNIMO-3 base reads 12 ViT levels of 577 tokens in each of 6 layers)."""

    def __init__(self, hidden_size: int, num_cross_levels: int, adaptive: bool):
        super().__init__()
        self.num_levels = num_cross_levels + 1
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_size, eps=LEVEL_NORM_EPS) for _ in range(num_cross_levels))
        self.logits = nn.Linear(hidden_size, self.num_levels) if adaptive else None

    def weights(self, query: torch.Tensor, query_mask: torch.Tensor | None) -> torch.Tensor:
        """(B, num_levels): non-negative, summing to 1 per example."""
        if self.logits is None:
            return query.new_full((query.shape[0], self.num_levels), 1.0 / self.num_levels)
        return F.softmax(self.logits(masked_mean(query, query_mask)).float(), dim=-1)

    def forward(
        self,
        query: torch.Tensor,
        query_mask: torch.Tensor | None,
        in_layer: torch.Tensor,
        normalised_levels: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(context (B, N, H), weights (B, num_levels)); ``in_layer`` is (B, N, H), ``normalised_levels`` the
        cross-layer levels standardised, (B, K, N, H)."""
        weights = self.weights(query, query_mask)
        gamma = torch.stack([norm.weight for norm in self.norms])  # (K, H)
        beta = torch.stack([norm.bias for norm in self.norms])
        cross = weights[:, 1:]
        scales = cross[:, :, None] * gamma  # (B, K, H)
        context = (normalised_levels * scales[:, :, None, :]).sum(dim=1) + (cross @ beta)[:, None, :]
        return context + weights[:, :1, None] * in_layer, weights


def gated_context(
    gate: LevelGate | None,
    query: torch.Tensor,
    query_mask: torch.Tensor | None,
    in_layer: torch.Tensor,
    normalised_levels: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The context and gate weights; a layer without a gate (in-layer only) reads the in-layer states directly."""
    if gate is None:
        return in_layer, None
    return gate(query, query_mask, in_layer, normalised_levels)


class CrossModalLayer(nn.Module):
    """Both streams at one depth: each self-attends, cross-attends to its (gated) context of the other modality and
    feeds forward. ``text_reads``/``vision_reads``: how many cross-layer levels each stream reads (0: in-layer only)."""

    def __init__(self, sizes: TextSizes, text_reads: int, vision_reads: int, adaptive: bool):
        super().__init__()
        h = sizes.hidden_size
        self.text = TransformerLayer(sizes, cross_attention_size=h)
        self.vision = TransformerLayer(sizes, cross_attention_size=h)
        self.text_gate = LevelGate(h, text_reads, adaptive) if text_reads else None
        self.vision_gate = LevelGate(h, vision_reads, adaptive) if vision_reads else None

    def forward(
        self,
        text: torch.Tensor,
        text_mask: torch.Tensor,
        vision: torch.Tensor,
        vision_levels: torch.Tensor | None,
        text_levels: torch.Tensor | None,
        first_token_only: bool = False,
        text_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Returns (text, vision, text gate weights | None, vision gate weights | None); the levels are the
        cross-layer ones each stream reads, standardised, (B, K, N, H) (None: in-layer only). ``first_token_only``:
        each stream's [CLS] alone, (B, 1, H) (the gates still read the whole streams). ``text_positions`` (B, Q):
        the text stream at those positions alone, (B, Q, H), and no vision stream (None) — an MLM loss reads
        nothing else."""
        vision_context, text_weights = gated_context(self.text_gate, text, text_mask, vision, vision_levels)
        if text_positions is not None:
            text_out = self.text(text, text_mask, vision_context, None, query_positions=text_positions)
            return text_out, None, text_weights, None
        text_context, vision_weights = gated_context(self.vision_gate, vision, None, text, text_levels)
        text_out = self.text(text, text_mask, vision_context, None, first_token_only=first_token_only)
        vision_out = self.vision(vision, None, text_context, text_mask, first_token_only=first_token_only)
        return text_out, vision_out, text_weights, vision_weights


@dataclass
class FusedStreams:
    text: torch.Tensor  # (B, L, H) the cross-modal text stream's last layer ((B, 1, H): [CLS] alone, pooled_only;
    # (B, Q, H): text_positions alone)
    vision: torch.Tensor | None  # (B, 1 + N, H) (or (B, 1, H); None with text_positions)
    pooled: torch.Tensor | None  # (B, 2H) (None with text_positions)
    text_gates: list[torch.Tensor | None]  # per layer: (B, K) weights over the vision levels the text stream read
    vision_gates: list[torch.Tensor | None]


class CrossModalEncoder(nn.Module):
    """The two-stream cross-modal encoder with in-layer and cross-layer interaction (see the module docstring)."""

    def __init__(self, cfg: DictConfig, sizes: TextSizes, num_text_levels: int, num_image_levels: int):
        super().__init__()
        h = sizes.hidden_size
        self.source = cfg.cross_layer_source if cfg.cross_layer else None
        self.text_transform = nn.Linear(sizes.hidden_size, h)
        self.vision_transform = nn.Linear(cfg.vit_hidden_size, h)
        self.text_norm = nn.LayerNorm(h, eps=1e-12)
        self.vision_norm = nn.LayerNorm(h, eps=1e-12)

        def reads(depth: int, unimodal_levels: int) -> int:
            return {None: 0, "unimodal": unimodal_levels, "cross_modal": depth}[self.source]

        adaptive = cfg.gate == "adaptive"
        self.layer = nn.ModuleList(
            CrossModalLayer(sizes, reads(i, num_image_levels), reads(i, num_text_levels), adaptive)
            for i in range(cfg.cross_layers)
        )
        self.text_pooler = nn.Linear(h, h)
        self.vision_pooler = nn.Linear(h, h)

    def forward(
        self,
        text_levels: torch.Tensor,
        text_mask: torch.Tensor,
        image_levels: torch.Tensor,
        pooled_only: bool = False,
        text_positions: torch.Tensor | None = None,
    ) -> FusedStreams:
        """text_levels (B, Kt, L, Ht), image_levels (B, Kv, 1 + N, Dv): unimodal layers, the top one last.
        ``pooled_only``: the last layer computes each stream's [CLS] alone (all the pooler reads);
        ``text_positions`` (B, Q): it computes the text stream at those positions alone, no vision stream and no
        pooled output (an MLM loss reads nothing else)."""
        text = self.text_norm(self.text_transform(text_levels[:, -1]))
        vision = self.vision_norm(self.vision_transform(image_levels[:, -1]))
        # cross-layer levels, standardised once for every layer that reads them: of the vision modality (read by the
        # text stream), of the text modality (read by the vision stream)
        read_by_text = read_by_vision = None
        if self.source == "unimodal":
            read_by_text = normalise_levels(self.vision_transform(image_levels))
            read_by_vision = normalise_levels(self.text_transform(text_levels))
        if self.source == "cross_modal":
            text_history, vision_history = [normalise_levels(text)], [normalise_levels(vision)]
        text_gates, vision_gates = [], []
        last = len(self.layer) - 1
        for depth, layer in enumerate(self.layer):
            if self.source == "cross_modal":  # every earlier output of the other stream, its input included
                read_by_text = torch.stack(vision_history[:depth], dim=1) if depth else None
                read_by_vision = torch.stack(text_history[:depth], dim=1) if depth else None
            text, vision, text_weights, vision_weights = layer(
                text,
                text_mask,
                vision,
                read_by_text,
                read_by_vision,
                first_token_only=pooled_only and depth == last,
                text_positions=text_positions if depth == last else None,
            )
            text_gates.append(text_weights)
            vision_gates.append(vision_weights)
            if self.source == "cross_modal" and depth + 1 < len(self.layer):
                text_history.append(normalise_levels(text))
                vision_history.append(normalise_levels(vision))
        if vision is None:  # text_positions: nothing reads the pooled output
            return FusedStreams(text, None, None, text_gates, vision_gates)
        pooled = torch.cat(
            [torch.tanh(self.text_pooler(text[:, 0])), torch.tanh(self.vision_pooler(vision[:, 0]))], dim=-1
        )
        return FusedStreams(text, vision, pooled, text_gates, vision_gates)


def check_choices(cfg: DictConfig) -> None:
    """Fail at start on a misspelled design choice (the schema only knows they are strings)."""
    for name, allowed in (("cross_layer_source", SOURCES), ("gate", GATES)):
        if cfg[name] not in allowed:
            raise VlbenchError(f"model.{name}={cfg[name]!r}: expected one of {', '.join(allowed)}")
    if cfg.unimodal_levels < 0:
        raise VlbenchError(f"model.unimodal_levels={cfg.unimodal_levels}: expected ≥ 0 (0: every layer)")


@MODELS.register("unimo3")
class UNIMO3(PooledNativeHeads, VisionLanguageModel):
    visual_input = "pixels"
    encodes_pooled_only = True  # the last fused layer can compute [CLS] alone
    inputs_replaced_by_tokens = ("pixel_values", "input_ids")

    def __init__(self, cfg: DictConfig, ctx: ModelContext):
        super().__init__()
        check_choices(cfg)
        self.cfg = cfg
        self.ctx = ctx
        sizes = TextSizes(**cfg.text)
        self.hidden_size = 2 * sizes.hidden_size
        self.visual_encoder = build_vit(
            ctx.image_size, cfg.vit_patch_size, cfg.vit_hidden_size, cfg.vit_depth, cfg.vit_num_heads, cfg.vit_mlp_ratio
        )
        self.text_encoder = TextEncoder(ctx.vocab_size, sizes, cfg.text_layers)
        self.num_text_levels = self._levels_read(cfg.text_layers)
        self.num_image_levels = self._levels_read(cfg.vit_depth)
        self.cross_encoder = CrossModalEncoder(cfg, sizes, self.num_text_levels, self.num_image_levels)
        self.vision_proj = nn.Linear(cfg.vit_hidden_size, cfg.embed_dim)
        self.text_proj = nn.Linear(sizes.hidden_size, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temperature)))
        self.itm_head = nn.Linear(self.hidden_size, 2)
        self.mlm_head = MaskedLMHead(self.text_encoder.embeddings.word_embeddings)
        for module in (self.text_encoder, self.cross_encoder, self.vision_proj, self.text_proj, self.itm_head):
            init_bert_weights(module)
        init_bert_weights(self.mlm_head)

    def _levels_read(self, depth: int) -> int:
        """How many of an encoder's top layers the cross-modal encoder reads (the top one alone feeds the streams)."""
        cfg = self.cfg
        if not cfg.cross_layer or cfg.cross_layer_source != "unimodal":
            return 1
        return depth if cfg.unimodal_levels == 0 else min(cfg.unimodal_levels, depth)

    def adapt_checkpoint(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Resample ViT position embeddings saved at another image size."""
        return resample_vit_pos_embeds(state_dict, self.state_dict())

    # ----- encoders ----------------------------------------------------------------------------------------------
    def image_levels(self, pixel_values: torch.Tensor, count: int | None = None) -> torch.Tensor:
        return vit_layer_states(self.visual_encoder, pixel_values, count or self.num_image_levels)

    def text_levels(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, count: int | None = None
    ) -> torch.Tensor:
        return text_layer_states(self.text_encoder, input_ids, attention_mask, count or self.num_text_levels)

    def fuse(
        self,
        text_levels: torch.Tensor,
        attention_mask: torch.Tensor,
        image_levels: torch.Tensor,
        pooled_only: bool = False,
        text_positions: torch.Tensor | None = None,
    ) -> FusedStreams:
        return self.cross_encoder(text_levels, attention_mask, image_levels, pooled_only, text_positions)

    def fuse_batch(self, batch: Batch, pooled_only: bool = False) -> FusedStreams:
        mask = batch["attention_mask"]
        text_levels, image_levels = self.text_levels(batch["input_ids"], mask), self.image_levels(batch["pixel_values"])
        return self.fuse(text_levels, mask, image_levels, pooled_only)

    def image_feature(self, image_levels: torch.Tensor) -> torch.Tensor:
        """The normalised ITC feature (B, E) from the top ViT layer's [CLS]."""
        return F.normalize(self.vision_proj(image_levels[:, -1, 0]), dim=-1)

    def text_feature(self, text_levels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_proj(text_levels[:, -1, 0]), dim=-1)

    # ----- the contract ------------------------------------------------------------------------------------------
    def encode(self, batch: Batch, pooled_only: bool = False) -> JointEncoding:
        fused = self.fuse_batch(batch, pooled_only)
        return JointEncoding(fused.pooled, None if pooled_only else fused.text, batch["attention_mask"])

    def embed_image(self, batch: Batch) -> torch.Tensor:
        return self.image_feature(self.image_levels(batch["pixel_values"], count=1))

    def embed_text(self, batch: Batch) -> torch.Tensor:
        return self.text_feature(self.text_levels(batch["input_ids"], batch["attention_mask"], count=1))

    def match_scores(self, batch: Batch) -> torch.Tensor:
        """The ITM head's positive logit per pair: retrieval's re-ranking score."""
        return self.itm_head(self.fuse_batch(batch, self.skip_unread_states).pooled)[:, 1]

    def unimodal_tokens(self, batch: Batch) -> dict[str, torch.Tensor] | None:
        """Every unimodal level the cross-modal encoder reads, per image and per caption (None: ``retrieval_cache``
        off, so retrieval re-encodes each pair)."""
        if not self.cfg.retrieval_cache:
            return None
        tokens = {}
        if "pixel_values" in batch:
            tokens["image_levels"] = self.image_levels(batch["pixel_values"])
        if "input_ids" in batch:
            tokens["text_levels"] = self.text_levels(batch["input_ids"], batch["attention_mask"])
        return tokens

    def encode_from_tokens(self, tokens: Batch, pooled_only: bool = False) -> JointEncoding:
        fused = self.fuse(tokens["text_levels"], tokens["attention_mask"], tokens["image_levels"], pooled_only)
        return JointEncoding(fused.pooled, None if pooled_only else fused.text, tokens["attention_mask"])

    def match_scores_from_tokens(self, tokens: Batch) -> torch.Tensor:
        return self.itm_head(self.encode_from_tokens(tokens, self.skip_unread_states).pooled)[:, 1]

    # ----- objectives --------------------------------------------------------------------------------------------
    def pretrain_losses(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """ITC + ITM + MLM (see the module docstring), each returned separately."""
        losses, image_levels = self._align_and_match(batch)
        losses["mlm"] = self._mlm_loss(batch["input_ids"], batch["attention_mask"], image_levels)
        return losses

    def retrieval_losses(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """ITC + ITM; every caption of an image is a positive (``image_ids``)."""
        return self._align_and_match(batch)[0]

    def _align_and_match(self, batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """ITC and ITM with hard negatives; also returns the image levels, which MLM reuses."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        if self.training:
            with torch.no_grad():
                self.temp.clamp_(self.cfg.temperature_min, self.cfg.temperature_max)
        image_levels = self.image_levels(batch["pixel_values"])
        text_levels = self.text_levels(input_ids, attention_mask)
        image_feat, text_feat = self.image_feature(image_levels), self.text_feature(text_levels)
        image_ids = batch.get("image_ids")
        shard = self.batch_shard(input_ids.shape[0])
        loss_itc = in_batch_contrastive_loss(image_feat, text_feat, self.temp, image_ids, shard)

        with torch.no_grad():
            sim_i2t = image_feat @ text_feat.t() / self.temp  # this process's pairs: the negatives are drawn here
        same_image = None if image_ids is None else image_ids.view(-1, 1) == image_ids.view(1, -1)
        text_index, image_index, labels = itm_pair_indices(sim_i2t, sim_i2t.t(), same_image)
        fused = self.fuse(
            text_levels[text_index], attention_mask[text_index], image_levels[image_index], self.skip_unread_states
        )
        loss_itm = F.cross_entropy(self.itm_head(fused.pooled), labels)
        return {"itc": loss_itc, "itm": loss_itm}, image_levels

    def _mlm_loss(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_levels: torch.Tensor
    ) -> torch.Tensor:
        shard = self.batch_shard(input_ids.shape[0])
        masked_ids, labels = mask_caption_tokens(
            self.ctx, input_ids, attention_mask, self.cfg.mlm_probability, shard=shard
        )
        chosen = labels != -100  # none here: an empty sum, a zero that keeps the head in the graph
        text_levels = self.text_levels(masked_ids, attention_mask)
        if self.skip_unread_states:  # the last layer computes the masked text positions alone, no vision stream
            read = ReadPositions.of(chosen)
            states = self.fuse(text_levels, attention_mask, image_levels, text_positions=read.index).text[read.picked]
        else:
            states = self.fuse(text_levels, attention_mask, image_levels).text[chosen]
        mlm = F.cross_entropy(self.mlm_head(states), labels[chosen], reduction="sum")
        return shard.mean(mlm, chosen.sum())  # over the global batch's masked tokens
