"""Pre-training losses shared by the families: ITC with momentum distillation, ITM hard negatives, MLM masking.

Written once here (as open_clip keeps its contrastive loss in one module) so every family computes them the same way.
Each takes an optional ``BatchShard`` (``models/global_batch.py``): under torchrun DDP it makes in-batch columns,
negatives and random draws those of the step's global batch, so N processes compute what one process computes; without
one the batch is whole and draws use the global RNG (or ``generator``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlbench.models.global_batch import BatchShard, all_gather_batch

__all__ = [
    "BatchShard",
    "all_gather_batch",
    "distillation_targets",
    "enqueue",
    "image_text_contrastive_loss",
    "in_batch_contrastive_loss",
    "itm_pair_indices",
    "mask_tokens",
    "momentum_update",
    "sample_hard_negatives",
    "sample_mismatches",
    "soft_cross_entropy",
    "text_assignment_pairs",
]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of −Σ targets · log_softmax(logits): cross-entropy against a distribution."""
    return -(F.log_softmax(logits, dim=-1) * targets).sum(dim=-1).mean()


def distillation_targets(momentum_logits: torch.Tensor, hard_targets: torch.Tensor, alpha: float) -> torch.Tensor:
    """ALBEF's momentum distillation: (1 − α) · ground truth + α · softmax(momentum model's logits)."""
    return alpha * F.softmax(momentum_logits, dim=-1) + (1 - alpha) * hard_targets


def image_text_contrastive_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    image_feat_m: torch.Tensor,
    text_feat_m: torch.Tensor,
    image_queue: torch.Tensor,
    text_queue: torch.Tensor,
    temperature: torch.Tensor,
    alpha: float,
    positives: torch.Tensor | None = None,
    shard: BatchShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ITC in both directions against in-batch momentum features plus the queues, with distilled targets.

    image_feat/text_feat: (b, D) L2-normalised online features of this process's rows; *_m the momentum ones (no
    grad), whose gather over processes gives the B in-batch columns of the global batch; queues: (D, Q).
    ``positives`` (b, B + Q) marks every column that shows the same image as the row (ALBEF's retrieval fine-tuning:
    all captions of an image are positives, weighted equally); default: the row's own pair only. A mean over rows:
    DDP's average over processes is the mean over the global batch. Returns (loss, sim_i2t, sim_t2i) where sims are
    (b, B + Q), online vs momentum + queue.
    """
    shard = shard or BatchShard(image_feat.shape[0])
    with torch.no_grad():
        image_feat_all = torch.cat([shard.gather(image_feat_m).t(), image_queue], dim=1)  # (D, B + Q)
        text_feat_all = torch.cat([shard.gather(text_feat_m).t(), text_queue], dim=1)
        if positives is None:
            hard = F.pad(shard.own_columns(image_feat.device).float(), (0, image_queue.shape[1]))
        else:
            hard = positives.float() / positives.float().sum(dim=1, keepdim=True)
        i2t_targets = distillation_targets(image_feat_m @ text_feat_all / temperature, hard, alpha)
        t2i_targets = distillation_targets(text_feat_m @ image_feat_all / temperature, hard, alpha)
    sim_i2t = image_feat @ text_feat_all / temperature
    sim_t2i = text_feat @ image_feat_all / temperature
    loss = (soft_cross_entropy(sim_i2t, i2t_targets) + soft_cross_entropy(sim_t2i, t2i_targets)) / 2
    return loss, sim_i2t, sim_t2i


def sample_hard_negatives(
    sim_i2t: torch.Tensor,
    sim_t2i: torch.Tensor,
    same_image: torch.Tensor | None = None,
    shard: BatchShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each image a negative text, for each text a negative image, drawn ∝ softmax(similarity), never the positive.

    sim_*: (b, ≥B) similarities of this process's b rows whose first B columns are the pairs of the (global) batch.
    ``same_image`` (b, B) excludes pairs that show the same image (several captions of one image in a batch).
    Returns (negative text index per image, negative image index per text), each (b,), indices into the global batch.
    As in ALBEF, 1e-4 is added so an all-zero row cannot occur.
    """
    shard = shard or BatchShard(sim_i2t.shape[0])
    batch = shard.global_size
    if batch < 2:
        raise ValueError("ITM hard negatives need a batch of at least 2 pairs")
    with torch.no_grad():
        own = shard.own_columns(sim_i2t.device)
        weights_i2t = (F.softmax(sim_i2t[:, :batch].float(), dim=1) + 1e-4).masked_fill(own, 0)
        weights_t2i = (F.softmax(sim_t2i[:, :batch].float(), dim=1) + 1e-4).masked_fill(own, 0)
        if same_image is not None:
            weights_i2t.masked_fill_(same_image, 0)
            weights_t2i.masked_fill_(same_image, 0)
            # a batch made only of one image's captions has no negative: fall back to any other pair
            empty = weights_i2t.sum(dim=1) == 0
            weights_i2t[empty] = (~own[empty]).float()
            weights_t2i[empty] = (~own[empty]).float()
        neg_text_for_image = shard.choose(weights_i2t).squeeze(1)
        neg_image_for_text = shard.choose(weights_t2i).squeeze(1)
    return neg_text_for_image, neg_image_for_text


def itm_pair_indices(
    sim_i2t: torch.Tensor, sim_t2i: torch.Tensor, same_image: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ALBEF's ITM batch as indices, so a model fuses all 3B pairs in one pass: the B positives, then every text with
    its hard negative image, then every image with its hard negative text (``sample_hard_negatives``).

    Returns (text index (3B,), image index (3B,), labels (3B,) long, 1 = matched)."""
    batch = sim_i2t.shape[0]
    neg_text_for_image, neg_image_for_text = sample_hard_negatives(sim_i2t, sim_t2i, same_image)
    rows = torch.arange(batch, device=sim_i2t.device)
    text_index = torch.cat([rows, rows, neg_text_for_image])
    image_index = torch.cat([rows, neg_image_for_text, rows])
    labels = torch.cat([torch.ones_like(rows), torch.zeros_like(rows), torch.zeros_like(rows)])
    return text_index, image_index, labels


def in_batch_contrastive_loss(
    image_feat: torch.Tensor,
    text_feat: torch.Tensor,
    temperature: torch.Tensor,
    image_ids: torch.Tensor | None = None,
    shard: BatchShard | None = None,
) -> torch.Tensor:
    """ITC without momentum encoder or queue (CLIP-style, symmetric): each process's rows against the features of
    every process (gathered with gradients), so the negatives are the global batch.

    image_feat/text_feat: (b, D) L2-normalised, row i of both one pair. ``image_ids`` (b,): every column showing the
    row's image is a positive, weighted equally (several captions of one image in a batch); default: the pair only.
    """
    shard = shard or BatchShard(image_feat.shape[0])
    image_all = shard.gather(image_feat, with_grad=True)  # (B, D)
    text_all = shard.gather(text_feat, with_grad=True)
    if image_ids is None:
        positives = shard.own_columns(image_feat.device).float()
    else:
        positives = (image_ids.view(-1, 1) == shard.gather(image_ids).view(1, -1)).float()
    targets = positives / positives.sum(dim=1, keepdim=True)
    sim_i2t = image_feat @ text_all.t() / temperature
    sim_t2i = text_feat @ image_all.t() / temperature
    return (soft_cross_entropy(sim_i2t, targets) + soft_cross_entropy(sim_t2i, targets)) / 2


def mask_tokens(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    vocab_size: int,
    mask_token_id: int,
    special_token_ids: list[int],
    probability: float,
    generator: torch.Generator | None = None,
    shard: BatchShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: choose `probability` of the real tokens; of those 80% → [MASK], 10% → random token, 10% kept.

    Returns (masked input ids, labels with −100 where not chosen). Special tokens and padding are never chosen.
    Draws come from ``shard`` (a process's rows of the global batch's draws), else from ``generator``.
    """
    shard = shard or BatchShard(input_ids.shape[0], generator=generator)
    draws = shard.uniform(input_ids.shape[1], 3, device=input_ids.device)  # (B, L, 3): choose, kind, random id
    never = ~attention_mask.bool()
    for token_id in special_token_ids:
        never |= input_ids == token_id
    chosen = (draws[..., 0] < probability) & ~never
    labels = input_ids.masked_fill(~chosen, -100)
    masked = input_ids.clone()
    to_mask = chosen & (draws[..., 1] < 0.8)
    to_random = chosen & (draws[..., 1] >= 0.8) & (draws[..., 1] < 0.9)
    masked[to_mask] = mask_token_id
    random_ids = (draws[..., 2] * vocab_size).long().clamp(max=vocab_size - 1)
    masked[to_random] = random_ids[to_random]
    return masked, labels


def mask_caption_tokens(
    ctx, input_ids: torch.Tensor, attention_mask: torch.Tensor, probability: float, shard: BatchShard | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask_tokens`` with the tokenizer of a ``ModelContext``: padding, [CLS] and [SEP] are never chosen."""
    special = [ctx.pad_token_id, ctx.cls_token_id, ctx.sep_token_id]
    return mask_tokens(input_ids, attention_mask, ctx.vocab_size, ctx.mask_token_id, special, probability, shard=shard)


def sample_mismatches(
    batch_size: int,
    probability: float,
    image_ids: torch.Tensor | None,
    device: torch.device,
    shard: BatchShard | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ITM mismatching: which pair's sentence (LXMERT) or image (Pixel-BERT) each pair gets — its own, or with
    ``probability`` another pair's of the (global) batch, never one of the same image (``image_ids``).

    Returns (partner index into the global batch (b,), matched (b,) bool). A pair whose batch has no other image
    stays matched.
    """
    shard = shard or BatchShard(batch_size)
    index = shard.rows(device)
    allowed = ~shard.own_columns(device)
    if image_ids is not None:
        allowed &= image_ids[:, None] != shard.gather(image_ids)[None, :]
    has_other = allowed.any(dim=1)
    flip = (shard.uniform(device=device) < probability) & has_other
    weights = allowed.float()
    weights[~has_other] = shard.own_columns(device)[~has_other].float()  # drawable rows; unused (flip is False)
    other = shard.choose(weights).squeeze(1)
    return torch.where(flip, other, index), ~flip


@torch.no_grad()
def momentum_update(online: torch.nn.Module, momentum_model: torch.nn.Module, momentum: float) -> None:
    """EMA: θ_m ← m · θ_m + (1 − m) · θ (parameters only, as in ALBEF/MoCo). Multi-tensor kernels (as torch's
    optimizers use): the same arithmetic as a loop over the parameters, in two launches per device and dtype instead
    of two per parameter (~800 per step for ALBEF base, which a GPU step notices)."""
    momentum_params = list(momentum_model.parameters())
    online_params = [p.detach() for p in online.parameters()]
    if len(momentum_params) != len(online_params):
        raise ValueError(f"momentum model has {len(momentum_params)} parameters, the online one {len(online_params)}")
    torch._foreach_mul_(momentum_params, momentum)
    torch._foreach_add_(momentum_params, online_params, alpha=1 - momentum)


@torch.no_grad()
def enqueue(queue: torch.Tensor, start: int | torch.Tensor, features: torch.Tensor) -> None:
    """Write (B, D) features into a (D, Q) ring-buffer queue from column `start` (an int or a one-element tensor on
    the queue's device, read without a host sync), wrapping around."""
    index = (start + torch.arange(features.shape[0], device=queue.device)) % queue.shape[1]
    queue[:, index] = features.t().to(queue.dtype)


def text_assignment_pairs(
    similarity: torch.Tensor, same_image: torch.Tensor | None = None, shard: BatchShard | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ALBEF's text-assignment batches: for each text an image pair and a label, uniform over three cases —
    0: (its image, a negative), 1: (a negative, its image), 2: (two different negatives) — negatives drawn
    ∝ softmax(similarity) over the batch, never the text's own image.

    similarity: (B, ≥B), row b scoring the in-batch images (first B columns) as negatives for pair b (the reference
    uses its own image's similarity to the others); ``same_image`` (B, B) marks images equal to the text's. Draws
    come from ``shard`` (the model's ``batch_shard``: the step's generator, the same on any device).
    Returns (first image index, second image index, label), each (B,).
    """
    batch = similarity.shape[0]
    shard = shard or BatchShard(batch)
    if batch < 3:
        raise ValueError("text assignment needs a batch of at least 3 pairs (two negatives per text)")
    with torch.no_grad():
        weights = F.softmax(similarity[:, :batch].float(), dim=1) + 1e-4
        own = torch.eye(batch, dtype=torch.bool, device=weights.device)
        if same_image is not None:
            own = own | same_image
        weights = weights.masked_fill(own, 0)
        lacking = (weights > 0).sum(dim=1) < 2  # fewer than two other images (one image's captions): any others
        weights[lacking] = (~torch.eye(batch, dtype=torch.bool, device=weights.device))[lacking].float()
        negatives = shard.choose(weights, 2)  # without replacement: two different negatives
        labels = (shard.uniform(device=weights.device) * 3).long().clamp(max=2)
        rows = torch.arange(batch, device=weights.device)
        first = torch.where(labels == 0, rows, negatives[:, 0])
        second = torch.where(labels == 1, rows, torch.where(labels == 0, negatives[:, 0], negatives[:, 1]))
    return first, second, labels
