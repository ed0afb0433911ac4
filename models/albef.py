"""ALBEF — Align before Fuse (Li et al., NeurIPS 2021; reference code salesforce/ALBEF).

What we follow (see ../shared/specs/albef.md):
- Image encoder: a ViT (timm ``VisionTransformer``), all tokens with [CLS] first.
- Text encoder: the first ``text_layers`` BERT layers; fusion encoder: the last ``fusion_layers`` BERT layers, each
  with an added cross-attention to the image tokens (BERT-base split 6 + 6 at base scale).
- ITC: linear projections of the image and text [CLS] to ``embed_dim``, L2-normalised, learnable temperature clamped
  to [temperature_min, temperature_max]; contrasted against in-batch momentum features plus feature queues.
- Momentum model: an EMA copy (``momentum``) of every online tower (image, text, fusion, projections, MLM head); the
  momentum features fill the queues and give the distillation targets (weight ``alpha``, ramped from 0 over
  ``alpha_warmup_steps``, or ``alpha_warmup_epochs`` — the paper ramps over the first epoch).
- ITM: binary classifier on the fusion [CLS], one hard negative text per image and one hard negative image per text,
  sampled ∝ softmax(ITC similarity) over the batch, positive excluded.
- MLM: BERT 15 % masking (80/10/10), predicted by the fusion encoder conditioned on the image, distilled from the
  momentum model's predictions.
- Several processes (torchrun DDP): ITC's in-batch columns are every process's momentum features, the queues take
  every process's batch, the ITM negatives are drawn from the whole global batch (every process's token states,
  gathered with gradients) and the MLM loss is a mean over the global batch's masked tokens, with masks and
  negatives drawn for the global batch (``models/global_batch.py``): N processes train as one process on the
  global batch. The reference samples ITM negatives within each GPU's batch and averages MLM per GPU.

Choices the paper leaves open, and ours:
- The queue is a ring buffer that wraps around, so its size need not be a multiple of the batch size (the reference
  asserts divisibility).
- The shared-head joint encoding is the fusion encoder's [CLS] state (ALBEF has no pooler on the fusion output).
- MLM never masks [SEP] (the masking code every model shares, as BERT and LXMERT); the reference ALBEF excludes only
  padding and [CLS], so its [SEP] can be masked.
- Gradient accumulation (``trainer.grad_accum_steps``, the paper's 8-GPU batches on one device): the momentum EMA
  runs on the first micro-batch of each optimizer step only, as the reference runs it once per iteration; the
  queues take every micro-batch's features.
- Nothing is pre-trained or downloaded by default; the paper's initialisation comes from a user's local files:
  ``model.vit_init`` (timm ViT / DeiT weights), ``model.bert_init`` (BERT-base), or ``model.init_checkpoint`` (the
  official ALBEF release), with the key map in ``models/albef_checkpoint.py``.

Native VQA head (``head=native``, the paper's): an answer decoder (``models/answer_decoder.py``) with as many layers
as the fusion encoder, initialised from it (embeddings, fusion layers, MLM head — the reference's key remapping),
causal self-attention and cross-attention to the fused question states; trained with the answers' LM loss weighted by
their share of the soft scores, distilled from a momentum decoder reading the momentum encoders (``distill``/``alpha``);
prediction ranks the candidate answers: top ``answer_rank_k`` by first-token probability, rescored by full likelihood.

Native NLVR2 head (``head=native``): every fusion layer reads both images; ``nlvr_merge=replicate`` (default) is
ALBEF's own design (``model_nlvr.py``): each fusion layer becomes two consecutive full blocks (``TwinBlockLayer``),
the first reading image 1 and the second image 2, both starting as the pre-trained layer and sharing the
cross-attention key/value projections; ``linear``/``mean`` are BLIP's (``TwinCrossAttentionLayer``: one
cross-attention per image in one block, merged by a linear layer or averaged). An MLP on [CLS] classifies;
``task=nlvr2_ta`` trains the same head on text assignment first (first / second / neither image, hard negatives by
image–image similarity, as the reference), and ``init_from`` carries it to NLVR2. The model's single-image fusion
layers stay in the checkpoint unused by this head. With ``distill`` (the reference's NLVR config), NLVR2 trains on
(1 − alpha) · cross-entropy + alpha · cross-entropy against the softmax of a momentum copy (encoders, two-image
layers, classifier), as ``model_nlvr.py``; text assignment is not distilled (as ``model_pretrain_nlvr.py``).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from vlbench.errors import VlbenchError
from vlbench.models.albef_checkpoint import load_bert_weights, load_official_checkpoint, load_vit_weights
from vlbench.models.answer_decoder import AnswerDecoder, answer_lm_loss, answer_pairs, pad_answers, rank_answers
from vlbench.models.base import (
    Batch,
    GenerativeAnswerHead,
    JointEncoding,
    ModelContext,
    ModelObjectives,
    TextSizes,
    TwoImageHead,
    VisionLanguageModel,
)
from vlbench.models.checkpoints import resample_vit_pos_embeds
from vlbench.models.layers import (
    MaskedLMHead,
    ReadPositions,
    TextEncoder,
    TransformerStack,
    TwinBlockLayer,
    TwinCrossAttentionLayer,
    build_vit,
    init_bert_weights,
)
from vlbench.models.losses import (
    BatchShard,
    all_gather_batch,
    distillation_targets,
    enqueue,
    image_text_contrastive_loss,
    mask_caption_tokens,
    momentum_update,
    sample_hard_negatives,
    text_assignment_pairs,
)
from vlbench.registry import MODELS


class AlbefTowers(nn.Module):
    """Every module the momentum model mirrors: image encoder, text encoder, fusion encoder, projections, MLM head."""

    def __init__(self, cfg: DictConfig, ctx: ModelContext, sizes: TextSizes):
        super().__init__()
        self.visual_encoder = build_vit(
            ctx.image_size,
            cfg.vit_patch_size,
            cfg.vit_hidden_size,
            cfg.vit_depth,
            cfg.vit_num_heads,
            cfg.vit_mlp_ratio,
        )
        self.text_encoder = TextEncoder(ctx.vocab_size, sizes, cfg.text_layers)
        self.fusion_encoder = TransformerStack(sizes, cfg.fusion_layers, cross_attention_size=cfg.vit_hidden_size)
        self.vision_proj = nn.Linear(cfg.vit_hidden_size, cfg.embed_dim)
        self.text_proj = nn.Linear(sizes.hidden_size, cfg.embed_dim)
        self.mlm_head = MaskedLMHead(self.text_encoder.embeddings.word_embeddings)
        for module in (self.text_encoder, self.fusion_encoder, self.vision_proj, self.text_proj, self.mlm_head):
            init_bert_weights(module)

    def encode_image(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens (B, 1+N, Dv) and the normalised ITC feature (B, E)."""
        tokens = self.visual_encoder.forward_features(pixel_values)
        return tokens, F.normalize(self.vision_proj(tokens[:, 0]), dim=-1)

    def encode_text(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, first_token_only: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text tokens (B, L, H) and the normalised ITC feature (B, E); ``first_token_only``: the last layer
        computes [CLS] alone, (B, 1, H) — all the ITC feature reads."""
        tokens = self.text_encoder(input_ids, attention_mask, first_token_only=first_token_only)
        return tokens, F.normalize(self.text_proj(tokens[:, 0]), dim=-1)

    def fuse(
        self,
        text_tokens,
        attention_mask,
        image_tokens,
        first_token_only: bool = False,
        query_positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The fusion encoder's token states (B, L, H); ``first_token_only``: the fused [CLS] alone, (B, 1, H);
        ``query_positions`` (B, Q): those positions alone, (B, Q, H) (the last layer computes nothing else)."""
        image_mask = torch.ones(image_tokens.shape[:2], dtype=torch.bool, device=image_tokens.device)
        return self.fusion_encoder(
            text_tokens,
            attention_mask,
            image_tokens,
            image_mask,
            first_token_only=first_token_only,
            query_positions=query_positions,
        )

    def masked_lm_logits(
        self, text_tokens, attention_mask, image_tokens, chosen: torch.Tensor, read: ReadPositions | None
    ) -> torch.Tensor:
        """MLM logits at the ``chosen`` (masked) positions, in ``fused[chosen]`` order; with ``read``
        (``trainer.skip_unread_states``) the last fusion layer computes those positions alone. The head runs on
        the chosen rows only (the reference runs it on every position and drops the rest: the same numbers)."""
        if read is None:
            return self.mlm_head(self.fuse(text_tokens, attention_mask, image_tokens)[chosen])
        fused = self.fuse(text_tokens, attention_mask, image_tokens, query_positions=read.index)
        return self.mlm_head(fused[read.picked])


@MODELS.register("albef")
class ALBEF(VisionLanguageModel):
    visual_input = "pixels"
    encodes_pooled_only = True  # the last fused layer can compute [CLS] alone
    inputs_replaced_by_tokens = ("pixel_values", "input_ids")

    def __init__(self, cfg: DictConfig, ctx: ModelContext):
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx
        sizes = TextSizes(**cfg.text)
        self.hidden_size = sizes.hidden_size
        self.online = AlbefTowers(cfg, ctx, sizes)
        self.temp = nn.Parameter(torch.tensor(float(cfg.temperature)))
        self.itm_head = nn.Linear(sizes.hidden_size, 2)
        init_bert_weights(self.itm_head)
        self.momentum_model = copy.deepcopy(self.online)
        self.momentum_model.requires_grad_(False)
        self.register_buffer("image_queue", F.normalize(torch.randn(cfg.embed_dim, cfg.queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(cfg.embed_dim, cfg.queue_size), dim=0))
        # image ids of the queued features (-1: unknown), so a caption's other captions are positives, not negatives
        self.register_buffer("id_queue", torch.full((cfg.queue_size,), -1, dtype=torch.long))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self._load_initial_weights()

    def _load_initial_weights(self) -> None:
        """Local files only (never downloaded): timm ViT and BERT weights as the paper starts, or an official ALBEF
        checkpoint; see ``models/albef_checkpoint.py`` for the key map."""
        cfg = self.cfg
        if cfg.vit_init:
            load_vit_weights(self, cfg.vit_init)
        if cfg.bert_init:
            load_bert_weights(self, cfg.bert_init)
        if cfg.vit_init or cfg.bert_init:  # the momentum towers start as copies (the reference's copy_params)
            self.momentum_model.load_state_dict(self.online.state_dict())
        if cfg.init_checkpoint:
            load_official_checkpoint(self, cfg.init_checkpoint)

    def adapt_checkpoint(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Resample ViT position embeddings saved at another image size (pre-training 256 px → fine-tuning 384)."""
        return resample_vit_pos_embeds(state_dict, self.state_dict())

    def native_head(
        self, kind: str, num_outputs: int, answer_token_ids: list[list[int]] | None = None
    ) -> nn.Module | None:
        if kind in ("image_text_matcher", "pretrain"):
            return ModelObjectives()
        if kind == "answer_classifier" and answer_token_ids is not None:
            return AlbefAnswerHead(self, answer_token_ids)
        if kind in ("pair_classifier", "text_assignment"):
            return AlbefTwoImageHead(self)
        return None

    # ----- the contract -----------------------------------------------------------------------------------------
    def encode(self, batch: Batch, pooled_only: bool = False) -> JointEncoding:
        fused = self.fused_tokens(batch, first_token_only=pooled_only)
        return JointEncoding(pooled=fused[:, 0], tokens=None if pooled_only else fused, mask=batch["attention_mask"])

    def fused_tokens(self, batch: Batch, momentum: bool = False, first_token_only: bool = False) -> torch.Tensor:
        """The fusion encoder's token states (B, L, H) of the online towers, or of the momentum ones."""
        towers = self.momentum_model if momentum else self.online
        image_tokens = towers.visual_encoder.forward_features(batch["pixel_values"])
        text_tokens = towers.text_encoder(batch["input_ids"], batch["attention_mask"])
        return towers.fuse(text_tokens, batch["attention_mask"], image_tokens, first_token_only)

    @torch.no_grad()
    def momentum_step(self) -> None:
        momentum_update(self.online, self.momentum_model, self.cfg.momentum)

    def alpha_at(self, step: int) -> float:
        if not self.cfg.distill:
            return 0.0
        warmup = self.cfg.alpha_warmup_steps
        if self.cfg.alpha_warmup_epochs > 0 and self.ctx.steps_per_epoch > 0:
            warmup = math.ceil(self.cfg.alpha_warmup_epochs * self.ctx.steps_per_epoch)
        if warmup <= 0:
            return float(self.cfg.alpha)
        return float(self.cfg.alpha) * min(1.0, step / warmup)

    def pretrain_losses(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """ITC + ITM + MLM as in the reference ``ALBEF.forward`` (pre-training), each returned separately."""
        losses, image_tokens, image_tokens_m, alpha = self._align_and_match(batch, step)
        shard = self.batch_shard(batch["input_ids"].shape[0])
        losses["mlm"] = self._mlm_loss(
            batch["input_ids"], batch["attention_mask"], image_tokens, image_tokens_m, alpha, shard
        )
        return losses

    def retrieval_losses(self, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        """ITC + ITM as in the reference ``ALBEF_Retrieval`` fine-tuning (every caption of an image is a positive)."""
        return self._align_and_match(batch, step)[0]

    def embed_image(self, batch: Batch) -> torch.Tensor:
        return self.online.encode_image(batch["pixel_values"])[1]

    def embed_text(self, batch: Batch) -> torch.Tensor:
        return self.online.encode_text(batch["input_ids"], batch["attention_mask"], self.skip_unread_states)[1]

    def match_scores(self, batch: Batch) -> torch.Tensor:
        """The ITM head's positive logit for each (image, text) pair of the batch: the reference's rerank score."""
        return self.itm_head(self.encode(batch, self.skip_unread_states).pooled)[:, 1]

    def unimodal_tokens(self, batch: Batch) -> dict[str, torch.Tensor]:
        tokens = {}
        if "pixel_values" in batch:
            tokens["image_tokens"] = self.online.visual_encoder.forward_features(batch["pixel_values"])
        if "input_ids" in batch:
            tokens["text_tokens"] = self.online.text_encoder(batch["input_ids"], batch["attention_mask"])
        return tokens

    def encode_from_tokens(self, tokens: Batch, pooled_only: bool = False) -> JointEncoding:
        fused = self.online.fuse(tokens["text_tokens"], tokens["attention_mask"], tokens["image_tokens"], pooled_only)
        return JointEncoding(pooled=fused[:, 0], tokens=None if pooled_only else fused, mask=tokens["attention_mask"])

    def match_scores_from_tokens(self, tokens: Batch) -> torch.Tensor:
        return self.itm_head(self.encode_from_tokens(tokens, self.skip_unread_states).pooled)[:, 1]

    def _align_and_match(self, batch: Batch, step: int):
        """ITC (+ momentum distillation, queues) and ITM with hard negatives; momentum/queue updates only in training.

        Returns (losses, online image tokens, momentum image tokens, alpha) so MLM can reuse the image encodings.
        """
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        shard = self.batch_shard(input_ids.shape[0])
        alpha = self.alpha_at(step)
        if self.training:
            with torch.no_grad():
                self.temp.clamp_(self.cfg.temperature_min, self.cfg.temperature_max)

        image_tokens, image_feat = self.online.encode_image(batch["pixel_values"])
        text_tokens, text_feat = self.online.encode_text(input_ids, attention_mask)

        with torch.no_grad():
            if self.training and self.first_micro_batch:
                self.momentum_step()
            image_tokens_m, image_feat_m = self.momentum_model.encode_image(batch["pixel_values"])
            # the momentum text tokens feed its ITC feature alone (its MLM pass encodes the masked words anew)
            _, text_feat_m = self.momentum_model.encode_text(input_ids, attention_mask, self.skip_unread_states)

        image_ids = batch.get("image_ids")
        positives = same_image = None
        if image_ids is not None:
            ids_all = torch.cat([shard.gather(image_ids), self.id_queue])
            positives = image_ids.view(-1, 1) == ids_all.view(1, -1)
            same_image = positives[:, : shard.global_size]
        loss_itc, sim_i2t, sim_t2i = image_text_contrastive_loss(
            image_feat,
            text_feat,
            image_feat_m,
            text_feat_m,
            self.image_queue.clone().detach(),
            self.text_queue.clone().detach(),
            self.temp,
            alpha,
            positives,
            shard,
        )
        if self.training:
            self._dequeue_and_enqueue(image_feat_m, text_feat_m, image_ids)

        loss_itm = self._itm_loss(text_tokens, attention_mask, image_tokens, sim_i2t, sim_t2i, same_image, shard)
        return {"itc": loss_itc, "itm": loss_itm}, image_tokens, image_tokens_m, alpha

    @torch.no_grad()
    def _dequeue_and_enqueue(
        self, image_feat_m: torch.Tensor, text_feat_m: torch.Tensor, image_ids: torch.Tensor | None
    ) -> None:
        # every process enqueues the momentum features of all processes' batches, in rank order (the reference's
        # concat_all_gather), so the queues stay identical across processes
        image_feat_m, text_feat_m = all_gather_batch(image_feat_m), all_gather_batch(text_feat_m)
        # the pointer stays a tensor: no host sync per step on a GPU, no graph break under torch.compile
        start = self.queue_ptr
        enqueue(self.image_queue, start, image_feat_m)
        enqueue(self.text_queue, start, text_feat_m)
        local = image_ids if image_ids is not None else torch.full_like(self.id_queue[: image_feat_m.shape[0]], -1)
        ids = all_gather_batch(local) if image_ids is not None else local
        enqueue(self.id_queue.view(1, -1), start, ids.view(-1, 1).to(self.id_queue.dtype))
        self.queue_ptr.add_(image_feat_m.shape[0]).remainder_(self.image_queue.shape[1])

    # ----- objectives ---------------------------------------------------------------------------------------------
    def _itm_loss(
        self, text_tokens, attention_mask, image_tokens, sim_i2t, sim_t2i, same_image, shard: BatchShard
    ) -> torch.Tensor:
        batch = text_tokens.shape[0]
        # negatives are indices into the global batch: every process's tokens, gradients going back to their owner
        neg_text_for_image, neg_image_for_text = sample_hard_negatives(sim_i2t, sim_t2i, same_image, shard)
        cls_only = self.skip_unread_states  # the ITM head reads the fused [CLS] alone
        positive = self.online.fuse(text_tokens, attention_mask, image_tokens, cls_only)[:, 0]
        all_texts, all_masks = shard.gather(text_tokens, with_grad=True), shard.gather(attention_mask)
        all_images = shard.gather(image_tokens, with_grad=True)
        rows = shard.rows(text_tokens.device)
        # negatives: (every text, its hard negative image) then (every image, its hard negative text)
        neg_texts = torch.cat([all_texts[rows], all_texts[neg_text_for_image]])
        neg_masks = torch.cat([all_masks[rows], all_masks[neg_text_for_image]])
        neg_images = torch.cat([all_images[neg_image_for_text], all_images[rows]])
        negative = self.online.fuse(neg_texts, neg_masks, neg_images, cls_only)[:, 0]
        logits = self.itm_head(torch.cat([positive, negative]))
        labels = torch.cat([torch.ones(batch), torch.zeros(2 * batch)]).long().to(logits.device)
        return F.cross_entropy(logits, labels)

    def _mlm_loss(
        self, input_ids, attention_mask, image_tokens, image_tokens_m, alpha, shard: BatchShard
    ) -> torch.Tensor:
        """Mean over the (global) batch's masked tokens; nothing masked here still keeps every MLM weight in the
        graph (a zero), as DDP needs."""
        masked_ids, labels = mask_caption_tokens(
            self.ctx, input_ids, attention_mask, self.cfg.mlm_probability, shard=shard
        )
        chosen = labels != -100
        read = ReadPositions.of(chosen) if self.skip_unread_states else None
        text_tokens = self.online.text_encoder(masked_ids, attention_mask)
        logits = self.online.masked_lm_logits(text_tokens, attention_mask, image_tokens, chosen, read)
        hard = F.one_hot(labels[chosen], self.ctx.vocab_size).float()
        if alpha > 0:
            with torch.no_grad():
                text_tokens_m = self.momentum_model.text_encoder(masked_ids, attention_mask)
                logits_m = self.momentum_model.masked_lm_logits(
                    text_tokens_m, attention_mask, image_tokens_m, chosen, read
                )
            targets = distillation_targets(logits_m, hard, alpha)
        else:
            targets = hard
        per_token = -(F.log_softmax(logits, dim=-1) * targets).sum(dim=-1)  # soft cross-entropy per masked token
        return shard.mean(per_token.sum(), chosen.sum())


def decoder_from_fusion(towers: AlbefTowers, sizes: TextSizes, vocab_size: int) -> AnswerDecoder:
    """The answer decoder initialised as the reference does: embeddings, fusion layers and MLM head copied (the
    cross-attention reads the fused question states; its key/value are copied when their shapes allow)."""
    layers = len(towers.fusion_encoder.layer)
    decoder = AnswerDecoder(vocab_size, sizes, layers, context_size=sizes.hidden_size)
    decoder.embeddings.load_state_dict(towers.text_encoder.embeddings.state_dict())
    fusion, fresh = towers.fusion_encoder.state_dict(), decoder.encoder.state_dict()
    decoder.encoder.load_state_dict({k: fusion[k] if fusion[k].shape == v.shape else v for k, v in fresh.items()})
    decoder.lm_head.load_state_dict(towers.mlm_head.state_dict())
    return decoder


class AlbefAnswerHead(GenerativeAnswerHead):
    """ALBEF's VQA head: answer decoder + momentum decoder over a fixed candidate list (see the module docstring)."""

    def __init__(self, model: ALBEF, answer_token_ids: list[list[int]]):
        super().__init__()
        cfg = model.cfg
        self.pad_id = model.ctx.pad_token_id
        self.rank_k = cfg.answer_rank_k
        self.momentum = cfg.momentum
        self.decoder = decoder_from_fusion(model.online, TextSizes(**cfg.text), model.ctx.vocab_size)
        self.decoder_m = copy.deepcopy(self.decoder).requires_grad_(False)
        # derived from the task's answer vocabulary, so not saved with the weights
        self.register_buffer("answer_ids", pad_answers(answer_token_ids, self.pad_id), persistent=False)

    def answer_losses(self, model: ALBEF, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        mask = batch["attention_mask"]
        rows, answers, weights = answer_pairs(batch["targets"])
        if rows.numel() == 0:  # no question of the batch has a candidate answer: a zero that keeps the graph
            return {"answer_lm": self.decoder.lm_head.dense.weight.sum() * 0.0}
        fused = model.fused_tokens(batch)
        ids = self.answer_ids[answers]
        logits = self.decoder(ids, fused[rows], mask[rows])
        teacher, alpha = None, model.alpha_at(step)
        if model.cfg.distill:
            with torch.no_grad():
                if self.training and model.first_micro_batch:
                    model.momentum_step()
                    momentum_update(self.decoder, self.decoder_m, self.momentum)
                fused_m = model.fused_tokens(batch, momentum=True)
                teacher = self.decoder_m(ids, fused_m[rows], mask[rows])
        per_answer = answer_lm_loss(logits, ids, self.pad_id, teacher, alpha)
        return {"answer_lm": (weights * per_answer).sum() / mask.shape[0]}

    def answer_scores(self, model: ALBEF, batch: Batch) -> torch.Tensor:
        fused, mask = model.fused_tokens(batch), batch["attention_mask"]

        def decode(ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            return self.decoder(ids, fused[rows], mask[rows])

        return rank_answers(decode, self.answer_ids, fused.shape[0], self.pad_id, self.rank_k)


class AlbefTwoImageHead(TwoImageHead):
    """ALBEF's NLVR2 head: two-image copies of the fusion layers (``nlvr_merge``: ALBEF's replicated block pairs, or
    BLIP's parallel cross-attentions), an MLP (hidden → ReLU → 2) for NLVR2 and a linear 3-way text-assignment head,
    both on the fused [CLS]."""

    def __init__(self, model: ALBEF):
        super().__init__()
        hidden = model.hidden_size
        merge = model.cfg.nlvr_merge
        if merge not in ("replicate", "linear", "mean"):
            raise VlbenchError(f"model.nlvr_merge={merge!r}: expected replicate (ALBEF's), linear or mean (BLIP-style)")
        self.layers = nn.ModuleList(
            TwinBlockLayer(layer) if merge == "replicate" else TwinCrossAttentionLayer(layer, merge)
            for layer in model.online.fusion_encoder.layer
        )
        self.cls_head = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))
        self.ta_head = nn.Linear(hidden, 3)
        init_bert_weights(self.cls_head)
        init_bert_weights(self.ta_head)
        self.momentum = model.cfg.momentum
        self.distill = model.cfg.distill
        if self.distill:  # the NLVR2 teacher: EMA copies of the two-image layers and the classifier (model_nlvr.py)
            self.layers_m = copy.deepcopy(self.layers).requires_grad_(False)
            self.cls_head_m = copy.deepcopy(self.cls_head).requires_grad_(False)

    def fuse(
        self,
        text_tokens,
        attention_mask,
        images: tuple[torch.Tensor, torch.Tensor],
        layers: nn.ModuleList | None = None,
        first_token_only: bool = False,
    ) -> torch.Tensor:
        """The fused [CLS] (B, H) of a text with two images' tokens (through ``layers``, default the online ones);
        ``first_token_only`` (``trainer.skip_unread_states``): the last layer computes [CLS] alone."""
        masks = tuple(torch.ones(im.shape[:2], dtype=torch.bool, device=im.device) for im in images)
        layers = self.layers if layers is None else layers
        x = text_tokens
        for depth, layer in enumerate(layers):
            x = layer(x, attention_mask, images, masks, first_token_only=first_token_only and depth == len(layers) - 1)
        return x[:, 0]

    def _pair_logits(
        self, model: ALBEF, towers: AlbefTowers, layers, cls_head, first: Batch, second: Batch
    ) -> torch.Tensor:
        images = tuple(towers.visual_encoder.forward_features(b["pixel_values"]) for b in (first, second))
        text = towers.text_encoder(first["input_ids"], first["attention_mask"])
        return cls_head(self.fuse(text, first["attention_mask"], images, layers, model.skip_unread_states))

    def pair_logits(self, model: ALBEF, first: Batch, second: Batch) -> torch.Tensor:
        return self._pair_logits(model, model.online, self.layers, self.cls_head, first, second)

    def pair_teacher(self, model: ALBEF, first: Batch, second: Batch, step: int) -> tuple[torch.Tensor, float] | None:
        """The reference's NLVR2 distillation: logits of the momentum encoders, two-image layers and classifier
        (updated first, once per optimizer step), weighted by ``alpha`` (ramped as in pre-training)."""
        if not (self.training and self.distill):
            return None
        with torch.no_grad():
            if model.first_micro_batch:
                model.momentum_step()
                momentum_update(self.layers, self.layers_m, self.momentum)
                momentum_update(self.cls_head, self.cls_head_m, self.momentum)
            teacher = self._pair_logits(model, model.momentum_model, self.layers_m, self.cls_head_m, first, second)
        return teacher, model.alpha_at(step)

    def assignment_logits(self, model: ALBEF, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        towers = model.online
        image_tokens, image_feat = towers.encode_image(batch["pixel_values"])
        text_tokens = towers.text_encoder(batch["input_ids"], batch["attention_mask"])
        ids = batch.get("image_ids")
        same_image = None if ids is None else ids.view(-1, 1) == ids.view(1, -1)
        # hard negatives as the reference's (model_pretrain_nlvr.py): images like the pair's own, by the similarity of
        # their ITC features at a fixed temperature of 0.07
        sim_i2i = image_feat @ image_feat.t() / 0.07
        first, second, labels = text_assignment_pairs(sim_i2i.detach(), same_image, model.batch_shard(len(sim_i2i)))
        images = (image_tokens[first], image_tokens[second])
        pooled = self.fuse(text_tokens, batch["attention_mask"], images, first_token_only=model.skip_unread_states)
        return self.ta_head(pooled), labels
