"""Building blocks shared by every model family: BERT-style embeddings and layers, the ViT factory, heads.

Why our own BERT layer rather than ``transformers.BertLayer``: since transformers 5 a BertLayer with cross-attention
must be a (causal) decoder, while ALBEF's fusion layers (and LXMERT's/UNIMO's cross layers) are bidirectional with
cross-attention. The layer below is BERT's exactly (post-LayerNorm, GELU, the same sub-module order and parameter
shapes), with attention through ``torch.nn.functional.scaled_dot_product_attention``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlbench.models.base import Batch, JointEncoding, ModelObjectives, TextSizes


class MultiHeadAttention(nn.Module):
    """Self- or cross-attention with separate Q/K/V projections (BERT's layout) and an output projection.

    ``eager`` (class-wide; see ``attention_implementation``) computes softmax(QKᵀ/√d)V with explicit matmuls, as
    BERT's reference does, instead of ``scaled_dot_product_attention``: the same numbers, for measuring SDPA's gain.
    """

    eager: ClassVar[bool] = False

    def __init__(self, hidden_size: int, num_heads: int, dropout: float, context_size: int | None = None):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not a multiple of num_heads {num_heads}")
        context_size = context_size or hidden_size
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(context_size, hidden_size)
        self.value = nn.Linear(context_size, hidden_size)
        self.dropout = dropout

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        causal: bool = False,
        shared_key_value: MultiHeadAttention | None = None,
    ) -> torch.Tensor:
        """x: (B, L, H); context: (B, S, C) (x itself when None); context_mask: (B, S) with 1/True = attend;
        causal: position i attends to positions ≤ i only (self-attention of a decoder); shared_key_value: another
        attention whose key/value projections this one uses (ALBEF's NLVR2 block pairs share theirs)."""
        context = x if context is None else context
        projections = self if shared_key_value is None else shared_key_value
        b, length, hidden = x.shape
        heads = self.num_heads

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, T, H) -> (B, heads, T, H/heads)
            return t.view(b, t.shape[1], heads, hidden // heads).transpose(1, 2)

        q, k, v = split(self.query(x)), split(projections.key(context)), split(projections.value(context))
        attn_mask = None if context_mask is None else context_mask.bool()[:, None, None, :]
        if causal:
            lower = torch.ones(length, k.shape[2], dtype=torch.bool, device=x.device).tril()
            attn_mask = lower if attn_mask is None else attn_mask & lower
        dropout = self.dropout if self.training else 0.0
        if self.eager:
            out = eager_attention(q, k, v, attn_mask, dropout)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        return out.transpose(1, 2).reshape(b, length, hidden)


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None, dropout: float
) -> torch.Tensor:
    """Attention the way BERT's reference writes it: scores, additive mask, softmax, dropout, weighted sum."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
    probs = F.dropout(scores.softmax(dim=-1), p=dropout, training=dropout > 0)
    return probs @ v


@contextlib.contextmanager
def attention_implementation(name: str, module: nn.Module | None = None) -> Iterator[None]:
    """``"eager"`` or ``"sdpa"`` for every attention inside: our layers (class-wide) and timm's ViT blocks of
    ``module`` (their ``fused_attn`` flag). For benchmarks; restores the previous setting on exit."""
    if name not in ("eager", "sdpa"):
        raise ValueError(f"attention implementation {name!r}: expected eager or sdpa")
    timm_blocks = [m for m in (module.modules() if module is not None else []) if hasattr(m, "fused_attn")]
    saved = MultiHeadAttention.eager, [m.fused_attn for m in timm_blocks]
    MultiHeadAttention.eager = name == "eager"
    for m in timm_blocks:
        m.fused_attn = name == "sdpa"
    try:
        yield
    finally:
        MultiHeadAttention.eager = saved[0]
        for m, fused in zip(timm_blocks, saved[1], strict=True):
            m.fused_attn = fused


class ResidualLayerNorm(nn.Module):
    """BERT's ``*Output`` block: dense → dropout → add residual → LayerNorm (post-LN)."""

    def __init__(self, in_size: int, hidden_size: int, dropout: float):
        super().__init__()
        self.dense = nn.Linear(in_size, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=1e-12)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class TransformerLayer(nn.Module):
    """One BERT layer: self-attention, optional cross-attention to another stream, feed-forward.

    ``first_token_only``: the output at position 0 ([CLS]) alone, (B, 1, H) — its query reads every position's keys
    and values as in the full layer, but no other position is computed. For the last layer under a head that reads
    only the pooled [CLS] (``trainer.skip_unread_states``): the same function, rounding aside. ``query_positions``
    (B, Q) generalises it: the outputs at those positions alone, (B, Q, H) (an MLM loss reads its masked tokens)."""

    def __init__(self, sizes: TextSizes, cross_attention_size: int | None = None):
        super().__init__()
        h, p = sizes.hidden_size, sizes.dropout
        self.attention = MultiHeadAttention(h, sizes.num_heads, p)
        self.attention_output = ResidualLayerNorm(h, h, p)
        self.has_cross_attention = cross_attention_size is not None
        if self.has_cross_attention:
            self.crossattention = MultiHeadAttention(h, sizes.num_heads, p, context_size=cross_attention_size)
            self.crossattention_output = ResidualLayerNorm(h, h, p)
        self.intermediate = nn.Linear(h, sizes.intermediate_size)
        self.output = ResidualLayerNorm(sizes.intermediate_size, h, p)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
        causal: bool = False,
        shared_key_value: MultiHeadAttention | None = None,
        first_token_only: bool = False,
        query_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        rows = None  # the positions computed, when not all of them
        if first_token_only:
            rows = x[:, :1]
        elif query_positions is not None:
            rows = gather_rows(x, query_positions)
        if rows is not None:
            if causal:
                raise ValueError("first_token_only/query_positions with causal self-attention: not the same function")
            x = self.attention_output(self.attention(rows, context=x, context_mask=mask), rows)
        else:
            x = self.attention_output(self.attention(x, context_mask=mask, causal=causal), x)
        if self.has_cross_attention:
            if context is None:
                raise ValueError("this layer has cross-attention: pass the other stream as `context`")
            read = self.crossattention(x, context, context_mask, shared_key_value=shared_key_value)
            x = self.crossattention_output(read, x)
        return self.output(F.gelu(self.intermediate(x)), x)


def gather_rows(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """x (B, L, H) at positions (B, Q) → (B, Q, H)."""
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))


@dataclass(frozen=True)
class ReadPositions:
    """The positions a loss reads, per example, for a last layer that computes those alone (``query_positions``).

    ``index`` (B, Q): ascending positions, padded with position 0 up to the batch's largest count (Q ≥ 1);
    ``picked`` (B, Q): the entries that hold a chosen position — ``states[picked]`` lists the same rows, in the same
    order, as ``full_states[chosen]`` would."""

    index: torch.Tensor
    picked: torch.Tensor

    @classmethod
    def of(cls, chosen: torch.Tensor, keep_first: bool = False) -> ReadPositions:
        """``chosen`` (B, L) bool; ``keep_first``: position 0 too, at index 0 of every row (a pooler reads it)."""
        wanted = chosen.clone()
        if keep_first:
            wanted[:, 0] = True
        length = wanted.shape[1]
        count = max(int(wanted.sum(dim=1).max()), 1) if wanted.numel() else 1
        positions = torch.arange(length, device=chosen.device).expand_as(wanted)
        index = torch.where(wanted, positions, length).sort(dim=1).values[:, :count]
        real = index < length
        index = index.masked_fill(~real, 0)
        return cls(index, real & chosen.gather(1, index))


class TwinBlockLayer(nn.Module):
    """ALBEF's own two-image fusion layer (``model_nlvr.py``), built from a single-image ``TransformerLayer``: the
    layer replicated into two consecutive full blocks (self-attention, cross-attention, feed-forward), the first
    reading image 1 and the second image 2, both starting as the layer and sharing the cross-attention key/value
    projections (the reference's ``share_cross_attention``). The second block uses the first's projections and keeps
    none of its own, so no tensor is stored twice in a checkpoint."""

    def __init__(self, layer: TransformerLayer):
        super().__init__()
        if not layer.has_cross_attention:
            raise ValueError("a two-image block pair is built from a layer with cross-attention")
        self.first = copy.deepcopy(layer)
        self.second = copy.deepcopy(layer)
        self.second.crossattention.key = None
        self.second.crossattention.value = None

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        contexts: tuple[torch.Tensor, torch.Tensor],
        context_masks: tuple[torch.Tensor | None, torch.Tensor | None],
        first_token_only: bool = False,
    ) -> torch.Tensor:
        """(B, L, H); ``first_token_only``: the second block computes [CLS] alone, (B, 1, H) (the first block's every
        position feeds its self-attention)."""
        x = self.first(x, mask, contexts[0], context_masks[0])
        return self.second(
            x,
            mask,
            contexts[1],
            context_masks[1],
            shared_key_value=self.first.crossattention,
            first_token_only=first_token_only,
        )


class TwinCrossAttentionLayer(nn.Module):
    """BLIP's two-image fusion layer (``blip_nlvr.py``), built from a single-image ``TransformerLayer``.

    Self-attention and feed-forward are the layer's; its cross-attention and output projection are duplicated, one
    per image, both starting as the layer's (BLIP loads ``crossattention.self`` into ``self0``/``self1`` and
    ``output.dense`` into ``dense0``/``dense1``). The two reads are merged by a linear layer over their concatenation
    (``merge="linear"``, BLIP's) or averaged (``"mean"``), then dropout, residual, LayerNorm.
    """

    def __init__(self, layer: TransformerLayer, merge: str = "linear"):
        super().__init__()
        if not layer.has_cross_attention:
            raise ValueError("a twin cross-attention layer is built from a layer with cross-attention")
        if merge not in ("linear", "mean"):
            raise ValueError(f"merge={merge!r}: expected linear or mean (replicate is TwinBlockLayer)")
        self.attention = copy.deepcopy(layer.attention)
        self.attention_output = copy.deepcopy(layer.attention_output)
        self.crossattention = nn.ModuleList(copy.deepcopy(layer.crossattention) for _ in range(2))
        self.cross_dense = nn.ModuleList(copy.deepcopy(layer.crossattention_output.dense) for _ in range(2))
        self.cross_dropout = copy.deepcopy(layer.crossattention_output.dropout)
        self.cross_norm = copy.deepcopy(layer.crossattention_output.LayerNorm)
        hidden = self.cross_norm.normalized_shape[0]
        self.merge = nn.Linear(2 * hidden, hidden) if merge == "linear" else None
        if self.merge is not None:
            init_bert_weights(self.merge)
        self.intermediate = copy.deepcopy(layer.intermediate)
        self.output = copy.deepcopy(layer.output)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None,
        contexts: tuple[torch.Tensor, torch.Tensor],
        context_masks: tuple[torch.Tensor | None, torch.Tensor | None],
        first_token_only: bool = False,
    ) -> torch.Tensor:
        """(B, L, H); ``first_token_only``: [CLS] alone, (B, 1, H), its query reading every position."""
        rows = x[:, :1] if first_token_only else x
        x = self.attention_output(self.attention(rows, context=x, context_mask=mask), rows)
        reads = [
            dense(cross(x, context, context_mask))
            for cross, dense, context, context_mask in zip(
                self.crossattention, self.cross_dense, contexts, context_masks, strict=True
            )
        ]
        merged = self.merge(torch.cat(reads, dim=-1)) if self.merge is not None else (reads[0] + reads[1]) / 2
        x = self.cross_norm(self.cross_dropout(merged) + x)
        return self.output(F.gelu(self.intermediate(x)), x)


class TextEmbeddings(nn.Module):
    """BERT embeddings: word + learned position + token type, LayerNorm, dropout."""

    def __init__(self, vocab_size: int, sizes: TextSizes, type_vocab_size: int = 2):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, sizes.hidden_size)
        self.position_embeddings = nn.Embedding(sizes.max_position_embeddings, sizes.hidden_size)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, sizes.hidden_size)
        self.LayerNorm = nn.LayerNorm(sizes.hidden_size, eps=1e-12)
        self.dropout = nn.Dropout(sizes.dropout)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.position_embeddings.num_embeddings:
            raise ValueError(
                f"text of {length} tokens exceeds max_position_embeddings={self.position_embeddings.num_embeddings}"
            )
        positions = torch.arange(length, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        types = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        x = x + self.token_type_embeddings(types)
        return self.dropout(self.LayerNorm(x))


class TransformerStack(nn.Module):
    """A stack of TransformerLayers; with ``cross_attention_size`` every layer also attends to a context stream."""

    def __init__(self, sizes: TextSizes, num_layers: int, cross_attention_size: int | None = None):
        super().__init__()
        self.layer = nn.ModuleList(TransformerLayer(sizes, cross_attention_size) for _ in range(num_layers))

    def forward(
        self,
        x,
        mask=None,
        context=None,
        context_mask=None,
        causal: bool = False,
        first_token_only: bool = False,
        query_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, L, H); ``first_token_only``: the last layer computes position 0 alone, (B, 1, H);
        ``query_positions`` (B, Q): the last layer computes those positions alone, (B, Q, H)."""
        last = len(self.layer) - 1
        for depth, layer in enumerate(self.layer):
            final = depth == last
            x = layer(
                x,
                mask,
                context,
                context_mask,
                causal,
                first_token_only=first_token_only and final,
                query_positions=query_positions if final else None,
            )
        return x


class TextEncoder(nn.Module):
    """Embeddings + a BERT stack: the unimodal text encoder every family shares."""

    def __init__(self, vocab_size: int, sizes: TextSizes, num_layers: int):
        super().__init__()
        self.embeddings = TextEmbeddings(vocab_size, sizes)
        self.encoder = TransformerStack(sizes, num_layers)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, first_token_only: bool = False
    ) -> torch.Tensor:
        return self.encoder(self.embeddings(input_ids), attention_mask, first_token_only=first_token_only)


class MaskedLMHead(nn.Module):
    """BERT's LM prediction head: dense + GELU + LayerNorm, then a decoder tied to the word embeddings."""

    def __init__(self, word_embeddings: nn.Embedding):
        super().__init__()
        hidden = word_embeddings.embedding_dim
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=1e-12)
        self.decoder = nn.Linear(hidden, word_embeddings.num_embeddings)
        self.decoder.weight = word_embeddings.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.LayerNorm(F.gelu(self.dense(hidden_states))))


class MLPClassifier(nn.Module):
    """The shared classification head: Linear → GELU → LayerNorm → (dropout) → Linear (as in BUTD/ALBEF-style VQA)."""

    def __init__(self, in_size: int, hidden_size: int, num_outputs: int, dropout: float = 0.1):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_size, hidden_size),
            nn.GELU(),
            nn.LayerNorm(hidden_size, eps=1e-12),
            nn.Dropout(dropout),
            nn.Linear(hidden_size, num_outputs),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PooledMLPHead(nn.Module):
    """A native classifier over pooled joint encodings (LXMERT's ``logit_fc``, Pixel-BERT's heads): Linear(n·H, 2H) →
    GELU → LayerNorm → Linear, no dropout, BERT init. ``num_pairs=2``: NLVR2's two image–text pairs, whose pooled
    vectors are concatenated; the task hands it one encoding or that list."""

    reads_pooled_only: ClassVar[bool] = True  # the model may skip the token states (``pooled_only_for``)

    def __init__(self, hidden_size: int, num_outputs: int, num_pairs: int = 1):
        super().__init__()
        self.classifier = MLPClassifier(num_pairs * hidden_size, 2 * hidden_size, num_outputs, dropout=0.0)
        init_bert_weights(self)

    def forward(self, encodings: JointEncoding | list[JointEncoding], batch: Batch) -> torch.Tensor:
        encodings = [encodings] if isinstance(encodings, JointEncoding) else encodings
        return self.classifier(torch.cat([e.pooled for e in encodings], dim=-1))

    @classmethod
    def for_kind(cls, kind: str, hidden_size: int, num_outputs: int) -> PooledMLPHead | None:
        """The head for a native head kind: ``answer_classifier`` (VQA/GQA, one pooled vector), ``pair_classifier``
        (NLVR2, two); None for any other kind."""
        pairs = {"answer_classifier": 1, "pair_classifier": 2}.get(kind)
        return None if pairs is None else cls(hidden_size, num_outputs, num_pairs=pairs)


class PooledNativeHeads:
    """Mixin for models whose native heads read the pooled output: an MLP for VQA/GQA and NLVR2 (``PooledMLPHead``),
    the model's own objectives (``ModelObjectives``) for the kinds in ``objective_kinds``."""

    objective_kinds: ClassVar[tuple[str, ...]] = ("image_text_matcher", "pretrain")
    hidden_size: int

    def native_head(
        self, kind: str, num_outputs: int, answer_token_ids: list[list[int]] | None = None
    ) -> nn.Module | None:
        if kind in self.objective_kinds:
            return ModelObjectives()
        return PooledMLPHead.for_kind(kind, self.hidden_size, num_outputs)


def build_vit(
    image_size: int, patch_size: int, hidden_size: int, depth: int, num_heads: int, mlp_ratio: float = 4.0
) -> nn.Module:
    """A timm VisionTransformer returning all tokens ([CLS] first), randomly initialised (nothing is downloaded)."""
    from timm.models.vision_transformer import VisionTransformer

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of the ViT patch size {patch_size}")
    return VisionTransformer(
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=hidden_size,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        num_classes=0,
        global_pool="",
    )


def transformer_block_types() -> tuple[type[nn.Module], ...]:
    """The blocks every family's stacks are made of: our BERT layer (also inside LXMERT's and UNIMO-3's cross layers
    and ALBEF's answer decoder), ALBEF's two-image fusion layer, and timm's ViT block."""
    from timm.models.vision_transformer import Block as VitBlock

    return (TransformerLayer, TwinCrossAttentionLayer, VitBlock)


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The block's own forward; while training with gradients, under activation checkpointing: its inner activations
    are dropped after the forward and recomputed in backward (dropout draws replayed: the same numbers)."""
    forward = functools.partial(type(self).forward, self)
    if self.training and torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def transformer_blocks(module: nn.Module) -> list[nn.Module]:
    """The outermost transformer blocks under ``module`` (a block inside a block is part of it), in module order: the
    units of activation checkpointing and of FSDP sharding."""
    block_types = transformer_block_types()
    blocks = []

    def visit(node: nn.Module) -> None:
        if isinstance(node, block_types):
            blocks.append(node)
            return
        for child in node.children():
            visit(child)

    visit(module)
    return blocks


def checkpoint_transformer_blocks(module: nn.Module) -> int:
    """Activation checkpointing for every transformer block under ``module`` (``trainer.activation_checkpointing``):
    a block then keeps only its inputs for backward, so activation memory grows with the number of blocks, not with
    their inner width — base scale on a small GPU, for about one more forward of compute. Weights, state-dict keys and
    numbers are unchanged; evaluation and no-grad forwards (momentum encoders) run as before. Returns how many blocks
    are checkpointed."""
    blocks = transformer_blocks(module)
    for block in blocks:
        # a method bound to the block, in the instance: a deep copy (ALBEF's momentum copies) binds to the copy
        block.forward = types.MethodType(_checkpointed_forward, block)
    return len(blocks)


def compile_transformer_blocks(module: nn.Module, backend: str = "inductor", options: dict | None = None) -> int:
    """``trainer.compile_scope=blocks``: torch.compile each transformer block under ``module`` (after activation
    checkpointing, if on: the compiled function is the block's forward as it is then) — where a step spends its time
    and its chains of element-wise work (residual adds, LayerNorm, GELU, dropout) that fusion removes. One compiled
    function per kind of block: blocks of one kind share its graphs, so a model compiles a few graphs, once, while the
    data-dependent code around the blocks (masking, picking the masked rows, sampling negatives) stays eager and
    cannot break a graph or recompile it every step. Compiled only while training with gradients; evaluation and
    no-grad forwards (momentum encoders) run the eager forward, as ``trainer.compile_scope=forward`` does. Sizes are
    dynamic from the first compilation (masked counts and text lengths change every step: specialising first and
    generalising after would compile each kind of block twice, which takes UNIMO-3 past dynamo's limit of 8 graphs a
    function, where it silently runs eager). Weights, state-dict keys and deep copies are as before. Returns how many
    blocks are compiled."""
    compiled: dict[Any, Any] = {}
    blocks = transformer_blocks(module)
    for block in blocks:
        eager = block.forward.__func__  # the class's forward, or the one activation checkpointing put in the instance
        if eager not in compiled:
            compiled[eager] = torch.compile(eager, backend=backend, options=options, dynamic=True)
        block.forward = types.MethodType(functools.partial(_compiled_forward, eager, compiled[eager]), block)
    return len(blocks)


def _compiled_forward(eager: Any, compiled: Any, self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The block's compiled forward while training with gradients, else its eager one."""
    if self.training and torch.is_grad_enabled():
        return compiled(self, *args, **kwargs)
    return eager(self, *args, **kwargs)


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation (normal(0, 0.02) for Linear/Embedding, unit LayerNorm); timm modules keep their own."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
