"""Image–text retrieval metrics (Flickr30K 1K / COCO 5K test, Karpathy splits), following ALBEF's ``itm_eval`` and
``evaluation`` (salesforce/ALBEF ``Retrieval.py``).

- Image→text (TR) Recall@K: an image query is correct when *any* of its captions ranks within the first K texts;
  text→image (IR) Recall@K: a caption's single image ranks within the first K images. Percentages, unrounded.
- ``mean_recall`` is ALBEF's ``r_mean`` (mean of the six recalls); ``rsum`` their sum (as in VSE++/UNITER papers).
- Ties: a positive's rank is the number of negatives scoring *at least as high* plus the positives scoring strictly
  higher (rank 0 = first). ALBEF ranks by ``np.argsort(score)[::-1]``, whose order among equal scores depends on
  numpy's sort algorithm and array length; on tie-free scores both give the same ranks. Ours is order-independent
  and resolves ties against the query: a model whose scores collapse to one constant ranks every positive last.
- ITC top-k then ITM rerank (``itm_rerank``): as ALBEF, each image's k best texts by ITC get ITM scores in the i2t
  matrix, each text's k best images by ITC in the t2i matrix, every other entry is excluded. ALBEF fills excluded
  entries with -100; we use -inf, so an ITM logit below -100 cannot rank after an excluded pair. Choose k ≥ the
  largest K: with k < K an excluded positive (rank ≥ k) may still count as within K.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

RECALL_AT = (1, 5, 10)


def _to_numpy(matrix: Any) -> np.ndarray:
    if isinstance(matrix, torch.Tensor):
        matrix = matrix.detach().cpu()
        if matrix.dtype in (torch.float16, torch.bfloat16):  # numpy has no bfloat16; float64 holds both exactly
            matrix = matrix.to(torch.float64)
        matrix = matrix.numpy()
    return np.asarray(matrix)


def _check_ground_truth(sims: np.ndarray, txt2img: np.ndarray) -> None:
    if sims.ndim != 2:
        raise ValueError(f"scores must be a (n_images, n_texts) matrix, got shape {sims.shape}")
    n_images, n_texts = sims.shape
    if txt2img.shape != (n_texts,):
        raise ValueError(f"txt2img must give one image index per text ({n_texts}), got shape {txt2img.shape}")
    if n_texts and (txt2img.min() < 0 or txt2img.max() >= n_images):
        raise ValueError(f"txt2img has image indices outside [0, {n_images})")
    without_text = np.setdiff1d(np.arange(n_images), txt2img)
    if without_text.size:
        raise ValueError(f"images without any caption (text→image recall undefined): {without_text[:10].tolist()}")


def image_to_text_ranks(sims: Any, txt2img: Any, chunk_size: int = 256) -> np.ndarray:
    """(n_images,) rank of each image's best-ranked caption among all texts (ties with negatives count against)."""
    sims, txt2img = _to_numpy(sims), _to_numpy(txt2img).astype(np.int64)
    _check_ground_truth(sims, txt2img)
    ranks = np.full(sims.shape[0], np.iinfo(np.int64).max)
    for start in range(0, len(txt2img), chunk_size):  # chunks of captions keep COCO 5K (25k × 25k) in memory
        texts = np.arange(start, min(start + chunk_size, len(txt2img)))
        rows = sims[txt2img[texts]]  # (chunk, n_texts): the row of each caption's own image
        own = rows[np.arange(len(texts)), texts]
        negative_ties = (rows == own[:, None]) & (txt2img[None, :] != txt2img[texts][:, None])
        np.minimum.at(ranks, txt2img[texts], (rows > own[:, None]).sum(axis=1) + negative_ties.sum(axis=1))
    return ranks


def text_to_image_ranks(sims: Any, txt2img: Any, chunk_size: int = 256) -> np.ndarray:
    """(n_texts,) rank of each caption's image among all images (ties count against)."""
    sims, txt2img = _to_numpy(sims), _to_numpy(txt2img).astype(np.int64)
    _check_ground_truth(sims, txt2img)
    ranks = np.empty(len(txt2img), dtype=np.int64)
    for start in range(0, len(txt2img), chunk_size):
        texts = np.arange(start, min(start + chunk_size, len(txt2img)))
        columns = sims[:, texts]  # (n_images, chunk)
        own = columns[txt2img[texts], np.arange(len(texts))]
        ranks[texts] = (columns >= own[None, :]).sum(axis=0) - 1  # every other image tied with the positive ranks first
    return ranks


def retrieval_recalls(
    sims: Any,
    txt2img: Any,
    sims_t2i: Any | None = None,
    recall_at: Sequence[int] = RECALL_AT,
    chunk_size: int = 256,
) -> dict[str, float]:
    """Recall@K both ways from (n_images, n_texts) scores (torch or numpy) and each text's image index.

    ``sims`` ranks texts for each image (TR); ``sims_t2i`` (same (n_images, n_texts) orientation, default ``sims``)
    ranks images for each text (IR) — they differ after ITM reranking. Returns ``tr_r{K}``, ``ir_r{K}`` for each K in
    ``recall_at``, ``mean_recall`` (mean of them all, ALBEF's ``r_mean``) and ``rsum`` (their sum), all in percent.
    """
    sims = _to_numpy(sims)
    sims_t2i = sims if sims_t2i is None else _to_numpy(sims_t2i)
    if sims_t2i.shape != sims.shape:
        raise ValueError(f"sims_t2i has shape {sims_t2i.shape}, sims {sims.shape}: both must be (n_images, n_texts)")
    tr_ranks = image_to_text_ranks(sims, txt2img, chunk_size)
    ir_ranks = text_to_image_ranks(sims_t2i, txt2img, chunk_size)
    recalls = {f"tr_r{k}": 100.0 * float(np.mean(tr_ranks < k)) for k in recall_at}
    recalls |= {f"ir_r{k}": 100.0 * float(np.mean(ir_ranks < k)) for k in recall_at}
    total = sum(recalls.values())
    return recalls | {"mean_recall": total / len(recalls), "rsum": total}


def chance_recalls(captions_per_image: Sequence[int], recall_at: Sequence[int] = RECALL_AT) -> dict[str, float]:
    """The expected recalls of a random ranking (what a model that learned nothing scores), in percent: text→image
    Recall@K = K / n_images; image→text, for an image with c of the n texts, one minus the chance that none of its
    captions is among K random texts, 1 − Π_{j<K} (n − c − j) / (n − j); averaged over images."""
    n_images, n_texts = len(captions_per_image), int(sum(captions_per_image))

    def image_hit(c: int, k: int) -> float:
        return 1.0 - math.prod((n_texts - c - j) / (n_texts - j) for j in range(min(k, n_texts)))

    recalls = {f"tr_r{k}": 100.0 * float(np.mean([image_hit(c, k) for c in captions_per_image])) for k in recall_at}
    recalls |= {f"ir_r{k}": 100.0 * min(k, n_images) / n_images for k in recall_at}
    total = sum(recalls.values())
    return recalls | {"mean_recall": total / len(recalls), "rsum": total}


def _top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    # a stable descending sort makes the choice among equal ITC scores deterministic (lower index first);
    # torch.topk leaves it unspecified
    return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]


def itm_rerank(
    itc_sims: Any,
    itm_score: Callable[[torch.Tensor, torch.Tensor], Any],
    k: int,
    batch_size: int = 256,
    add_itc: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ALBEF's retrieval evaluation: rerank each query's top-k ITC candidates with ITM.

    ``itc_sims`` is (n_images, n_texts). ``itm_score(image_indices, text_indices)`` scores P pairs (two (P,) long
    tensors on ``itc_sims``' device) and returns P scores (ALBEF: the ITM head's "match" logit); it is called with at
    most ``batch_size`` pairs, sorted by image then text, each pair once even when it is in both directions' top-k.
    ``add_itc`` adds the ITC score to the ITM score (BLIP's variant; ALBEF uses the ITM score alone).

    Returns ``(scores_i2t, scores_t2i)``, both (n_images, n_texts), -inf outside the top-k: feed them to
    ``retrieval_recalls(scores_i2t, txt2img, sims_t2i=scores_t2i)``.
    """
    sims = torch.as_tensor(itc_sims)
    if sims.ndim != 2:
        raise ValueError(f"itc_sims must be a (n_images, n_texts) matrix, got shape {tuple(sims.shape)}")
    if k < 1 or batch_size < 1:
        raise ValueError(f"k and batch_size must be positive, got k={k}, batch_size={batch_size}")
    n_images, n_texts = sims.shape
    dtype = torch.promote_types(sims.dtype, torch.float32)
    device = sims.device

    # pairs as flat indices image * n_texts + text
    top_texts = _top_k_indices(sims, min(k, n_texts))  # (n_images, k)
    i2t_pairs = (torch.arange(n_images, device=device)[:, None] * n_texts + top_texts).flatten()
    top_images = _top_k_indices(sims.T, min(k, n_images))  # (n_texts, k)
    t2i_pairs = (top_images * n_texts + torch.arange(n_texts, device=device)[:, None]).flatten()
    pairs = torch.unique(torch.cat([i2t_pairs, t2i_pairs]))  # sorted

    pair_scores = torch.empty(len(pairs), dtype=dtype, device=device)
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        scores = torch.as_tensor(itm_score(batch // n_texts, batch % n_texts)).to(dtype=dtype, device=device)
        if scores.numel() != len(batch):
            raise ValueError(f"itm_score returned {scores.numel()} scores for {len(batch)} pairs")
        pair_scores[start : start + len(batch)] = scores.reshape(-1)
    if add_itc:
        pair_scores += sims.flatten()[pairs].to(dtype)

    def fill(selected: torch.Tensor) -> torch.Tensor:
        matrix = torch.full((n_images * n_texts,), float("-inf"), dtype=dtype, device=device)
        matrix[selected] = pair_scores[torch.searchsorted(pairs, selected)]
        return matrix.view(n_images, n_texts)

    return fill(i2t_pairs), fill(t2i_pairs)
