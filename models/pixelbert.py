"""Pixel-BERT — Aligning Image Pixels with Text by Deep Multi-Modal Transformers (Huang et al., arXiv 2004.00849,
2020; no official code was released).

What we follow (see ../shared/specs/pixelbert.md):
- Pixels: a CNN (a timm ResNet; ResNet-50 at base scale) trained end to end. Its feature map is flattened into
  "pixel" tokens, each projected to the hidden size, plus one learned visual semantic embedding (the paper's s_v)
  that marks the modality, then LayerNorm and dropout.
- Words: BERT embeddings (word + position + segment), LayerNorm, dropout.
- One single-stream BERT stack over [text ; pixels]; the pooled output is BERT's pooler, tanh(Linear([CLS])).
- Random pixel sampling: in pre-training, ``pixel_sample`` of each image's pixel tokens (100 in the paper), a fresh
  uniform draw per image at every step.
- Pre-training, from one forward pass: ``mlm`` (BERT masking, 15 %, 80/10/10) and ``itm`` (a 2-way classifier on the
  pooled output; with probability ``matching_probability`` a caption is shown another caption's image, never one of
  its own image — ``image_ids``), returned separately.
- Native heads: VQA/GQA and NLVR2 classify pooled outputs (``PooledMLPHead``: one pair, or NLVR2's two pairs
  concatenated); retrieval ranks pairs by the ITM head's score (``head=native``: the model's ranking objective).

Choices the paper leaves open (or that we could not check against its text offline), and ours — each a config field:
- ``pixel_position``: ``none`` — the paper describes no position signal for pixel tokens (the CNN's receptive fields
  carry some); ``learned_2d`` adds learned row + column embeddings, sized for ``image_size``.
- ``pixel_sample_in_finetune``: false — the paper samples in pre-training only, so fine-tuning sees every pixel;
  evaluation never samples. ``pixel_sample: null`` turns sampling off.
- ``cnn``/``cnn_kwargs``/``cnn_out_index``: which timm network and which feature map (the paper: the last ResNet
  stage). BatchNorm trains as timm's default (the paper says nothing about freezing it).
- ``channels_last``: true — the CNN's weights and input in NHWC memory order, where CPU (oneDNN) and GPU (cuDNN)
  convolutions run faster (ResNet-50, 384 px, batch 2, one CPU thread, medians: the CNN's forward + backward
  1.04–1.12×, a whole pre-training step 1.02–1.06×; the tiny scale's CNN 1.26×); the numbers are the contiguous
  network's up to float rounding. Not a modelling choice: speed only.
- ``mlm_matched_only``: the MLM loss counts matched pairs only (a mismatched caption does not describe the pixels it
  sees); both losses come from one forward pass over the masked batch, as LXMERT's reference does, rather than an
  unmasked second pass for ITM.
- ``pixel_norm``: ``batchnorm`` — the paper adds s_v to the pixel features and says nothing about normalising them.
  BERT's embedding recipe, LayerNorm(Linear(f) + s_v) (``layernorm``), let AdamW grow the part every pixel token
  shares (s_v, the bias, the features' mean direction) until all pixel tokens were nearly one vector (tiny, across-
  image std 0.61 → 0.2 within 20 steps) and the model answered from the text alone: VQA 51.21, the text-only
  model's, with the tiny CNN trained by AdamW or by SGD, frozen at random, replaced by one 16 × 16 patch
  convolution, at lr 3e-4, and with a bias-free Linear before the LayerNorm. A per-channel BatchNorm of Linear(f)
  over the batch's pixels keeps every channel varying across images and pixels; s_v is added after it. Measured
  (tiny, from scratch, seed 0): VQA 53.61 at 1,500 steps, 60.39 at 3,000; after pre-training 69.33 (NOTES.md).
  In several processes it and the CNN's BatchNorms take the global batch's statistics, as in one process
  (SyncBatchNorm on GPUs, ``vlbench.distributed.GlobalBatchNorm`` on CPU).
- ``init_std``: 0.02, BERT's initializer_range — the paper starts from BERT-base (768 wide), where it was chosen. From
  random weights a narrow stack starts with near-uniform attention, and image–text matching sits at ln 2 until the
  [CLS]-to-pixel interaction has grown out of that saddle. Measured at the tiny scale (128 wide, tiny_96k budget,
  1 thread): with 0.02 the pre-training's ITM loss leaves ln 2 at steps ~1,000, ~1,400, ~1,200 (seeds 0–2) of 1,500 —
  a late step that float rounding moves, so the rows that follow are noisy and machine-dependent — and VQA from
  scratch stays at the answer prior (53.28, floor 51.21); with 0.05 ITM leaves at ~550 (seed 0); with 0.088
  (1/√128) at 300–500 for all three seeds, pre-training ends at ITM 0.29 / 0.31 / 0.25 (test), VQA from scratch
  reaches 68.03 / 66.44 / 78.88 and VQA fine-tuned from the pre-training 69.51 / 68.83 / 81.14 (0.02: 58.79 /
  59.38 / 73.77). Neither pixel_position=learned_2d, nor lr 3e-4 or 2e-3, nor ITM alone (MLM off: ITM stays at
  exactly ln 2) moved the escape before step 600. The tiny preset therefore uses 0.088; the base preset keeps 0.02
  (BERT's own width, and the paper initialises from BERT-base). The price: the wider start amplifies float rounding
  step by step (1 thread vs 2: gradient norm 1.6e-5 apart at step 1, 5e-4 at step 2; at 0.02 bitwise equal), while
  the run as a whole no longer hangs on when it leaves a saddle.
- VQA/NLVR2 heads: the paper puts a fully connected classifier on [CLS] without saying its depth; we use LXMERT's
  two-layer MLP on the pooled output (the shared heads give the controlled comparison).
- Retrieval fine-tuning: softmax cross-entropy of each caption's score with its image against ``retrieval_negatives``
  captions of other images of the batch (drawn with replacement when the batch has fewer); the score is the ITM
  head's log-odds, which orders pairs as P(match) does, so a pre-trained ITM head ranks from the start. With the
  shared matching head (``tasks/retrieval.py``) the CNN runs once per image of the batch and its pixel tokens are
  reused by the image's positive and negative pairs: BatchNorm sees each image once (before b9f5aa4 it saw an image
  as often as it was drawn into the batch's 3 × B pairs).
- Nothing is pre-trained or downloaded: ``cnn_init`` loads a local timm state dict into the CNN. The transformer starts
  from random weights (the paper starts from BERT-base).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vlbench.errors import VlbenchError
from vlbench.models.base import Batch, JointEncoding, ModelContext, TextSizes, VisionLanguageModel
from vlbench.models.checkpoints import read_state_dict
from vlbench.models.global_batch import BatchShard
from vlbench.models.layers import (
    MaskedLMHead,
    PooledNativeHeads,
    ReadPositions,
    TextEmbeddings,
    TransformerStack,
    init_bert_weights,
)
from vlbench.models.losses import mask_caption_tokens, sample_mismatches
from vlbench.registry import MODELS

PIXEL_POSITIONS = ("none", "learned_2d")
PIXEL_NORMS = ("batchnorm", "layernorm")


def build_cnn(cfg: DictConfig) -> nn.Module:
    """The timm CNN cut at its ``cnn_out_index`` feature map (later stages and the classifier are not built), randomly
    initialised: nothing is downloaded."""
    import timm

    kwargs = OmegaConf.to_container(cfg.cnn_kwargs) if isinstance(cfg.cnn_kwargs, DictConfig) else dict(cfg.cnn_kwargs)
    try:
        cnn = timm.create_model(
            cfg.cnn, pretrained=False, features_only=True, out_indices=(cfg.cnn_out_index,), **kwargs
        )
    except (RuntimeError, TypeError, ValueError, IndexError) as e:
        raise VlbenchError(f"model.cnn={cfg.cnn} (cnn_kwargs {kwargs}, cnn_out_index {cfg.cnn_out_index}): {e}") from e
    check_stem_width(cnn, kwargs.get("stem_width"), str(kwargs.get("stem_type", "")))
    return cnn


def check_stem_width(cnn: nn.Module, stem_width: int | None, stem_type: str = "") -> None:
    """timm's ResNet takes ``stem_width`` but uses it only for its deep stems (``stem_type=deep``…): the default 7×7
    stem is 64 channels whatever it says. A width asked for and not built is an error, not a silent wider net."""
    if stem_width is None:
        return
    first = next((m for m in cnn.modules() if isinstance(m, nn.Conv2d)), None)
    expected = 3 * (stem_width // 4) if "tiered" in stem_type else stem_width  # timm's tiered stem starts at 3/4
    if first is None or first.out_channels != expected:
        built = "no convolution" if first is None else f"a first convolution of {first.out_channels} channels"
        raise VlbenchError(
            f"model.cnn_kwargs.stem_width={stem_width}: the {type(cnn).__name__} built has {built} (timm's ResNet "
            "uses stem_width only with a deep stem, e.g. stem_type=deep; its 7×7 stem is 64 wide)"
        )


def load_cnn_weights(cnn: nn.Module, path: str) -> None:
    """A local timm state dict (e.g. ``resnet50`` from timm's release) into the CNN: every tensor of the cut network
    must be there with our shape; tensors of stages we do not build (and the classifier) are ignored."""
    what = "model.cnn_init"
    state = read_state_dict(path, what)
    ours = cnn.state_dict()
    missing = [k for k in ours if k not in state]
    if missing:
        raise VlbenchError(
            f"{what}={path}: {len(missing)} of the CNN's {len(ours)} tensors are missing "
            f"({', '.join(missing[:6])}): not a state dict of model.cnn with these cnn_kwargs?"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} vs ours {tuple(v.shape)}" for k, v in ours.items() if state[k].shape != v.shape
    ]
    if wrong:
        raise VlbenchError(f"{what}={path}: tensors of another shape: {'; '.join(wrong[:6])}")
    cnn.load_state_dict({k: state[k] for k in ours})


def sample_pixels(tokens: torch.Tensor, count: int, shard: BatchShard | None = None) -> torch.Tensor:
    """Random pixel sampling: ``count`` of each image's pixel tokens (B, N, H) → (B, count, H), a uniform draw
    without replacement, independent per image; every token when ``count`` ≥ N. The draws come from ``shard`` (in
    training the step's global-batch generator, on the CPU: the same pixels on a GPU as on the CPU, and under DDP as
    in one process), else from the global CPU generator."""
    batch, pixels, hidden = tokens.shape
    if count >= pixels:
        return tokens
    shard = shard or BatchShard.of(batch, training=False)
    keep = shard.uniform(pixels, device=tokens.device).topk(count, dim=1).indices  # (B, count)
    return tokens.gather(1, keep[..., None].expand(-1, -1, hidden))


class PixelEmbeddings(nn.Module):
    """Images → pixel tokens (B, h·w, H): CNN feature map, flattened, Linear to the hidden size; then with
    ``pixel_norm=batchnorm`` per-channel BatchNorm + the visual semantic embedding, with ``layernorm`` + the visual
    semantic embedding then LayerNorm; learned row/column embeddings with ``learned_2d``; dropout."""

    def __init__(self, cfg: DictConfig, sizes: TextSizes, image_size: int):
        super().__init__()
        hidden = sizes.hidden_size
        self.cnn = build_cnn(cfg)
        self.channels_last = cfg.channels_last
        if self.channels_last:  # copies of these weights (state dicts, optimizer moments) keep the memory order
            self.cnn.to(memory_format=torch.channels_last)
        self.proj = nn.Linear(self.cnn.feature_info.channels()[-1], hidden)
        self.visual_type = nn.Parameter(torch.empty(hidden))
        self.rows = self.cols = None
        if cfg.pixel_position == "learned_2d":
            side = math.ceil(image_size / self.cnn.feature_info.reduction()[-1])
            self.rows, self.cols = nn.Embedding(side, hidden), nn.Embedding(side, hidden)
        self.batch_norm = cfg.pixel_norm == "batchnorm"
        self.norm = nn.BatchNorm1d(hidden) if self.batch_norm else nn.LayerNorm(hidden, eps=1e-12)
        self.dropout = nn.Dropout(sizes.dropout)
        for module in (self.proj, self.rows, self.cols, self.norm):
            if module is not None:
                init_bert_weights(module, cfg.init_std)
        nn.init.normal_(self.visual_type, std=cfg.init_std)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        feature_map = self.cnn(pixel_values)[-1]  # (B, C, h, w); NHWC in memory with channels_last: no copy below
        height, width = feature_map.shape[2:]
        x = self.proj(feature_map.flatten(2).transpose(1, 2))  # (B, h·w, H), row-major
        if self.batch_norm:  # statistics per channel over every image and pixel of the batch
            x = self.norm(x.transpose(1, 2)).transpose(1, 2)
        x = x + self.visual_type
        if self.rows is not None:
            if height > self.rows.num_embeddings or width > self.cols.num_embeddings:
                raise VlbenchError(
                    f"a {height}×{width} feature map exceeds the {self.rows.num_embeddings}-wide learned_2d grid "
                    "(sized for data.image_size)"
                )
            grid = self.rows.weight[:height, None] + self.cols.weight[None, :width]  # (h, w, H)
            x = x + grid.reshape(height * width, -1)
        return self.dropout(x if self.batch_norm else self.norm(x))


@MODELS.register("pixelbert")
class PixelBERT(PooledNativeHeads, VisionLanguageModel):
    visual_input = "pixels"
    encodes_pooled_only = True  # the last fused layer can compute [CLS] alone
    inputs_replaced_by_tokens = ("pixel_values",)

    def __init__(self, cfg: DictConfig, ctx: ModelContext):
        super().__init__()
        if cfg.pixel_position not in PIXEL_POSITIONS:
            raise VlbenchError(f"model.pixel_position={cfg.pixel_position!r}: expected one of {PIXEL_POSITIONS}")
        if cfg.pixel_norm not in PIXEL_NORMS:
            raise VlbenchError(f"model.pixel_norm={cfg.pixel_norm!r}: expected one of {PIXEL_NORMS}")
        if cfg.pixel_sample is not None and cfg.pixel_sample < 1:
            raise VlbenchError(f"model.pixel_sample={cfg.pixel_sample}: expected a positive count, or null for none")
        if cfg.retrieval_negatives < 1:
            raise VlbenchError(f"model.retrieval_negatives={cfg.retrieval_negatives}: expected at least 1")
        if cfg.init_std <= 0:
            raise VlbenchError(f"model.init_std={cfg.init_std}: expected a positive standard deviation")
        self.cfg = cfg
        self.ctx = ctx
        sizes = TextSizes(**cfg.text)
        h = self.hidden_size = sizes.hidden_size
        self.embeddings = TextEmbeddings(ctx.vocab_size, sizes)
        self.pixel_embeddings = PixelEmbeddings(cfg, sizes, ctx.image_size)
        self.encoder = TransformerStack(sizes, cfg.num_layers)
        self.pooler = nn.Linear(h, h)
        self.mlm_head = MaskedLMHead(self.embeddings.word_embeddings)
        self.itm_head = nn.Linear(h, 2)
        for module in (self.embeddings, self.encoder, self.pooler, self.mlm_head, self.itm_head):
            init_bert_weights(module, cfg.init_std)  # not the CNN: timm's own initialisation (or cnn_init) stays
        if cfg.cnn_init:
            load_cnn_weights(self.pixel_embeddings.cnn, cfg.cnn_init)

    # ----- encoding -----------------------------------------------------------------------------------------------
    def pixel_tokens(self, pixel_values: torch.Tensor, sample: bool) -> torch.Tensor:
        """Pixel tokens (B, N, H); with ``sample`` and in training, ``pixel_sample`` of them per image."""
        tokens = self.pixel_embeddings(pixel_values)
        if sample and self.training and self.cfg.pixel_sample is not None:
            tokens = sample_pixels(tokens, self.cfg.pixel_sample, self.batch_shard(tokens.shape[0]))
        return tokens

    def fuse(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_tokens: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        pooled_only: bool = False,
    ) -> JointEncoding:
        """The single-stream transformer over [text ; pixels]: tokens (B, L + N, H), their mask, pooled [CLS]
        (``pooled_only``: the last layer computes [CLS] alone; tokens None)."""
        states, mask = self._joint_states(input_ids, attention_mask, pixel_tokens, token_type_ids, pooled_only)
        pooled = torch.tanh(self.pooler(states[:, 0]))
        return JointEncoding(pooled=pooled, tokens=None if pooled_only else states, mask=mask)

    def _joint_states(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_tokens: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        first_token_only: bool = False,
        query_positions: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(states, mask) of the single stream over [text ; pixels]; the last layer computes [CLS] alone
        (``first_token_only``) or the ``query_positions`` alone, if given."""
        mask = torch.cat([attention_mask.bool(), attention_mask.new_ones(pixel_tokens.shape[:2], dtype=torch.bool)], 1)
        tokens = torch.cat([self.embeddings(input_ids, token_type_ids), pixel_tokens], dim=1)
        states = self.encoder(tokens, mask, first_token_only=first_token_only, query_positions=query_positions)
        return states, mask

    def encode(self, batch: Batch, pooled_only: bool = False) -> JointEncoding:
        pixels = self.pixel_tokens(batch["pixel_values"], sample=self.cfg.pixel_sample_in_finetune)
        return self.fuse(batch["input_ids"], batch["attention_mask"], pixels, batch.get("token_type_ids"), pooled_only)

    # ----- pre-training -------------------------------------------------------------------------------------------
    def pretrain_losses(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """MLM and ITM from one forward pass; the CNN runs once per image, mismatched captions reuse its tokens.
        Uses the global RNG (pixels, mismatches, masks): the pretrain task forks it for evaluation."""
        cfg, ctx = self.cfg, self.ctx
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        pixels = self.pixel_tokens(batch["pixel_values"], sample=True)
        image, matched = sample_mismatches(
            input_ids.shape[0], cfg.matching_probability, batch.get("image_ids"), input_ids.device
        )
        masked_ids, labels = mask_caption_tokens(ctx, input_ids, attention_mask, cfg.mlm_probability)
        if cfg.mlm_matched_only:
            labels = labels.masked_fill(~matched[:, None], -100)
        chosen = labels != -100
        pixels, token_type_ids = pixels[image], batch.get("token_type_ids")
        if self.skip_unread_states:  # the last layer computes [CLS] (ITM) and the masked words (MLM) alone
            over_pixels = chosen.new_zeros(pixels.shape[:2])
            read = ReadPositions.of(torch.cat([chosen, over_pixels], dim=1), keep_first=True)
            states, _ = self._joint_states(
                masked_ids, attention_mask, pixels, token_type_ids, query_positions=read.index
            )
            pooled, masked_states = torch.tanh(self.pooler(states[:, 0])), states[read.picked]
        else:
            encoding = self.fuse(masked_ids, attention_mask, pixels, token_type_ids)
            pooled, masked_states = encoding.pooled, encoding.tokens[:, : input_ids.shape[1]][chosen]
        return {
            "mlm": self._mlm_loss(masked_states, labels[chosen]),
            "itm": F.cross_entropy(self.itm_head(pooled), matched.long()),
        }

    def _mlm_loss(self, masked_states: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over the masked words' states (N, H) and their targets (N,)."""
        if not len(targets):  # nothing masked on a matched pair: a zero that keeps the head in the graph
            return self.mlm_head(masked_states).sum()
        return F.cross_entropy(self.mlm_head(masked_states), targets)

    # ----- retrieval ----------------------------------------------------------------------------------------------
    def _match_score(self, pooled: torch.Tensor) -> torch.Tensor:
        logits = self.itm_head(pooled)
        return logits[:, 1] - logits[:, 0]  # log-odds of a match: the order of P(match)

    def match_scores(self, batch: Batch) -> torch.Tensor:
        """The ITM head's log-odds per pair: retrieval ranks with it."""
        return self._match_score(self.encode(batch, self.skip_unread_states).pooled)

    def unimodal_tokens(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Each image's pixel tokens, sampled as ``encode`` samples them (the CNN runs once per image in retrieval);
        text needs no separate encoding."""
        if "pixel_values" not in batch:
            return {}
        return {"pixel_tokens": self.pixel_tokens(batch["pixel_values"], sample=self.cfg.pixel_sample_in_finetune)}

    def encode_from_tokens(self, tokens: Batch, pooled_only: bool = False) -> JointEncoding:
        return self.fuse(
            tokens["input_ids"],
            tokens["attention_mask"],
            tokens["pixel_tokens"],
            tokens.get("token_type_ids"),
            pooled_only,
        )

    def match_scores_from_tokens(self, tokens: Batch) -> torch.Tensor:
        return self._match_score(self.encode_from_tokens(tokens, self.skip_unread_states).pooled)

    def retrieval_losses(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """Ranking: softmax cross-entropy of each image's caption against ``retrieval_negatives`` captions of other
        images of the batch (any other caption when the batch has only one image)."""
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        size, device = input_ids.shape[0], input_ids.device
        if size < 2:
            raise VlbenchError("Pixel-BERT retrieval needs a batch of at least 2 captions (negatives come from it)")
        count = self.cfg.retrieval_negatives
        rows = torch.arange(size, device=device)
        others = rows[:, None] != rows[None, :]
        allowed = others.clone()
        if "image_ids" in batch:
            allowed &= batch["image_ids"][:, None] != batch["image_ids"][None, :]
        lacking = ~allowed.any(dim=1)
        allowed[lacking] = others[lacking]
        replacement = bool(allowed.sum(dim=1).min() < count)
        # (B, count), from the step's generator: the same draws on any device
        negatives = self.batch_shard(size).choose(allowed.float(), count, replacement=replacement)
        text_index = torch.cat([rows[:, None], negatives], dim=1).reshape(-1)  # positive first
        pixels = self.pixel_tokens(batch["pixel_values"], sample=self.cfg.pixel_sample_in_finetune)
        encoding = self.fuse(
            input_ids[text_index],
            attention_mask[text_index],
            pixels.repeat_interleave(count + 1, dim=0),
            pooled_only=self.skip_unread_states,
        )
        scores = self._match_score(encoding.pooled).view(size, count + 1)
        return {"itm_rank": F.cross_entropy(scores, torch.zeros(size, dtype=torch.long, device=device))}
