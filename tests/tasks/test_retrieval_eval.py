"""Retrieval recalls and the ITC→ITM rerank, checked by hand and against brute-force references."""

import numpy as np
import pytest
import torch

from vlbench.tasks.retrieval_eval import (
    image_to_text_ranks,
    itm_rerank,
    retrieval_recalls,
    text_to_image_ranks,
)

TXT2IMG = [0, 0, 1, 1, 2, 2]  # two captions per image
SIMS = np.array(
    [
        [0.9, 0.1, 0.8, 0.2, 0.3, 0.4],
        [0.7, 0.6, 0.5, 0.1, 0.2, 0.3],
        [0.9, 0.8, 0.7, 0.6, 0.5, 0.1],
    ]
)


def brute_force_ranks(sims, txt2img):
    """Reference: plain loops; negatives tied with a positive rank before it, other positives only when higher."""
    n_images, n_texts = sims.shape

    def tr_rank(i, t):
        return sum(
            sims[i, u] >= sims[i, t] if txt2img[u] != i else sims[i, u] > sims[i, t] for u in range(n_texts) if u != t
        )

    tr = [min(tr_rank(i, t) for t in range(n_texts) if txt2img[t] == i) for i in range(n_images)]
    ir = [sum(sims[j, t] >= sims[txt2img[t], t] for j in range(n_images) if j != txt2img[t]) for t in range(n_texts)]
    return np.array(tr), np.array(ir)


def albef_ranks(scores_i2t, scores_t2i, txt2img):
    """ALBEF's itm_eval ranking (argsort, reversed), here with (n_texts, n_images) scores_t2i as ALBEF has it."""
    img2txt = [[t for t, i in enumerate(txt2img) if i == image] for image in range(scores_i2t.shape[0])]
    tr = [min(np.where(np.argsort(s)[::-1] == t)[0][0] for t in img2txt[i]) for i, s in enumerate(scores_i2t)]
    ir = [np.where(np.argsort(s)[::-1] == txt2img[t])[0][0] for t, s in enumerate(scores_t2i)]
    return np.array(tr), np.array(ir)


def test_ranks_by_hand():
    # image 0: caption 0 first; image 1: caption 2 after 0.7, 0.6; image 2: caption 4 after four
    assert image_to_text_ranks(SIMS, TXT2IMG).tolist() == [0, 2, 4]
    # caption 0 ties image 2 at 0.9: a tied negative ranks first, so caption 0's image is second
    assert text_to_image_ranks(SIMS, TXT2IMG).tolist() == [1, 2, 2, 2, 0, 2]


def test_recalls_by_hand():
    recalls = retrieval_recalls(SIMS, TXT2IMG)
    assert recalls == {
        "tr_r1": pytest.approx(100 / 3),
        "tr_r5": 100.0,
        "tr_r10": 100.0,
        "ir_r1": pytest.approx(100 / 6),
        "ir_r5": 100.0,
        "ir_r10": 100.0,
        "mean_recall": pytest.approx((100 / 3 + 100 / 6 + 400) / 6),
        "rsum": pytest.approx(100 / 3 + 100 / 6 + 400),
    }
    small_k = retrieval_recalls(SIMS, TXT2IMG, recall_at=(2, 3))
    assert small_k["tr_r2"] == pytest.approx(100 / 3) and small_k["tr_r3"] == pytest.approx(200 / 3)
    assert small_k["ir_r2"] == pytest.approx(100 / 3) and small_k["ir_r3"] == 100.0


def test_ties_count_against_the_query():
    # constant scores (a collapsed model): every positive ranks after all its tied negatives
    recalls = retrieval_recalls(np.zeros((3, 6)), TXT2IMG)
    assert recalls["tr_r1"] == 0.0 and recalls["ir_r1"] == 0.0
    assert image_to_text_ranks(np.zeros((3, 6)), TXT2IMG).tolist() == [4, 4, 4]
    # a positive tied with a negative ranks after it, whichever column comes first
    sims = np.array([[1.0, 1.0], [1.0, 0.0]])
    assert image_to_text_ranks(sims, [1, 0]).tolist() == [1, 0]
    assert text_to_image_ranks(sims, [1, 0]).tolist() == [1, 0]
    # two captions of one image tied with each other: no penalty (the other positive is not a negative)
    assert image_to_text_ranks(np.array([[0.5, 0.5, 0.1], [0.0, 0.0, 0.9]]), [0, 0, 1]).tolist() == [0, 0]


def test_separate_t2i_scores_rank_the_images():
    t2i = SIMS.copy()
    t2i[0, 4] = 0.6  # caption 4 (image 2, 0.5) now ranks image 0 first: its R@1 — the only one in SIMS — is lost
    t2i[0, 2] = 0.95  # read image → text, caption 2 would outrank image 0's own captions: it must not be read so
    recalls = retrieval_recalls(SIMS, TXT2IMG, sims_t2i=t2i)
    assert recalls["ir_r1"] == 0.0  # 100 / 6 if sims_t2i were ignored
    assert recalls["tr_r1"] == pytest.approx(100 / 3)  # 0 if image → text read sims_t2i


@pytest.mark.parametrize("seed", range(5))
def test_vectorised_ranks_equal_brute_force(seed):
    rng = np.random.default_rng(seed)
    txt2img = np.concatenate([np.arange(7), rng.integers(0, 7, size=13)])
    sims = rng.integers(0, 4, size=(7, 20)).astype(float)  # few values: many ties
    tr, ir = brute_force_ranks(sims, txt2img)
    np.testing.assert_array_equal(image_to_text_ranks(sims, txt2img, chunk_size=3), tr)
    np.testing.assert_array_equal(text_to_image_ranks(sims, txt2img, chunk_size=3), ir)


@pytest.mark.parametrize("seed", range(3))
def test_equal_to_albef_itm_eval_without_ties(seed):
    rng = np.random.default_rng(seed)
    txt2img = np.repeat(np.arange(8), 5)
    sims = rng.standard_normal((8, 40))
    tr, ir = albef_ranks(sims, sims.T, txt2img)
    np.testing.assert_array_equal(image_to_text_ranks(sims, txt2img), tr)
    np.testing.assert_array_equal(text_to_image_ranks(sims, txt2img), ir)


def test_torch_inputs_any_float_dtype():
    expected = retrieval_recalls(SIMS, TXT2IMG)
    assert retrieval_recalls(torch.tensor(SIMS), torch.tensor(TXT2IMG)) == expected
    # image 0: its caption 0 (1.0) ranks last; image 1: caption 1 first
    halves = torch.tensor([[1.0, 4.0, 2.0], [1.0, 3.0, 2.0]], dtype=torch.bfloat16)
    assert retrieval_recalls(halves, [0, 1, 1], recall_at=(1,))["tr_r1"] == 50.0


def test_invalid_ground_truth():
    with pytest.raises(ValueError, match=r"images without any caption.*\[2\]"):
        retrieval_recalls(SIMS, [0, 0, 1, 1, 1, 1])
    with pytest.raises(ValueError, match="one image index per text"):
        retrieval_recalls(SIMS, [0, 1, 2])
    with pytest.raises(ValueError, match="outside"):
        retrieval_recalls(SIMS, [0, 0, 1, 1, 2, 3])
    with pytest.raises(ValueError, match="sims_t2i"):
        retrieval_recalls(SIMS, TXT2IMG, sims_t2i=SIMS.T)


class RecordingITM:
    """ITM scores looked up in a table; records every call."""

    def __init__(self, table):
        self.table = torch.as_tensor(table)
        self.calls = []

    def __call__(self, image_indices, text_indices):
        self.calls.append(list(zip(image_indices.tolist(), text_indices.tolist(), strict=True)))
        return self.table[image_indices, text_indices]


def brute_force_rerank(itc, itm, k, add_itc=False):
    """Reference: ALBEF's per-query loops (one ITM call per query), -inf outside the top-k."""
    itc, itm = np.asarray(itc), np.asarray(itm)
    i2t = np.full(itc.shape, -np.inf)
    t2i = np.full(itc.shape, -np.inf)
    for i in range(itc.shape[0]):
        for t in np.argsort(-itc[i], kind="stable")[:k]:
            i2t[i, t] = itm[i, t] + (itc[i, t] if add_itc else 0)
    for t in range(itc.shape[1]):
        for i in np.argsort(-itc[:, t], kind="stable")[:k]:
            t2i[i, t] = itm[i, t] + (itc[i, t] if add_itc else 0)
    return i2t, t2i


@pytest.mark.parametrize("add_itc", [False, True])
@pytest.mark.parametrize("seed", range(3))
def test_rerank_equals_brute_force(seed, add_itc):
    rng = np.random.default_rng(seed)
    itc = rng.standard_normal((5, 11))
    itm = RecordingITM(rng.standard_normal((5, 11)))
    i2t, t2i = itm_rerank(itc, itm, k=3, batch_size=4, add_itc=add_itc)
    ref_i2t, ref_t2i = brute_force_rerank(itc, itm.table.numpy(), k=3, add_itc=add_itc)
    np.testing.assert_allclose(i2t.numpy(), ref_i2t)
    np.testing.assert_allclose(t2i.numpy(), ref_t2i)
    assert i2t.shape == t2i.shape == (5, 11)
    assert (torch.isfinite(i2t).sum(dim=1) == 3).all() and (torch.isfinite(t2i).sum(dim=0) == 3).all()

    scored = [pair for call in itm.calls for pair in call]
    assert all(len(call) <= 4 for call in itm.calls)
    assert len(scored) == len(set(scored))  # a pair in both directions' top-k is scored once
    union = set(zip(*np.nonzero(np.isfinite(ref_i2t) | np.isfinite(ref_t2i)), strict=True))
    assert set(scored) == union


def test_rerank_then_recall_uses_itm_order():
    itc = np.array([[0.9, 0.8, 0.1], [0.7, 0.6, 0.5]])
    itm = torch.tensor([[0.0, 5.0, 9.0], [1.0, 2.0, 3.0]])  # ITM prefers caption 1 for image 0
    i2t, t2i = itm_rerank(itc, RecordingITM(itm), k=2)
    # image 0 keeps its top-2 ITC texts {0, 1}, reordered by ITM; text 2 (ITM 9.0) was not a candidate
    assert i2t[0].tolist() == [0.0, 5.0, float("-inf")]
    assert retrieval_recalls(i2t, [0, 1, 1], sims_t2i=t2i, recall_at=(1,))["tr_r1"] == 50.0


def test_rerank_ties_pick_lower_indices_and_k_is_clamped():
    i2t, t2i = itm_rerank(torch.zeros(2, 4), lambda i, t: (10 * i + t).float(), k=2)
    assert i2t.tolist() == [[0.0, 1.0, float("-inf"), float("-inf")], [10.0, 11.0, float("-inf"), float("-inf")]]
    _, t2i = itm_rerank(torch.zeros(2, 4), lambda i, t: (10 * i + t).float(), k=50)
    assert torch.isfinite(t2i).all()


def test_rerank_rejects_wrong_score_count():
    with pytest.raises(ValueError, match="returned 1 scores for 2 pairs"):
        itm_rerank(torch.zeros(1, 2), lambda i, t: torch.zeros(1), k=2)
