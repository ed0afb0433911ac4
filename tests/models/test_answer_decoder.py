"""The generative answer decoder: candidate ranking on a constructed case, padding-free loss, causality, and
ALBEF's native VQA head (initialised from the fusion layers, gradients, momentum decoder, scores)."""

import math

import pytest
import torch

from tests.models.test_albef import CTX, make_batch, tiny_albef
from vlbench.models.answer_decoder import (
    AnswerDecoder,
    answer_lm_loss,
    answer_pairs,
    pad_answers,
    rank_answers,
    sequence_log_likelihood,
)
from vlbench.models.base import TextSizes

PAD, CLS, SEP = 0, 1, 2
# candidates: "3", "4 5", "6", "4 7"
ANSWERS = [[CLS, 3, SEP], [CLS, 4, 5, SEP], [CLS, 6, SEP], [CLS, 4, 7, SEP]]
# a bigram "decoder": the next-token distribution depends on the previous token only
NEXT = {CLS: {3: 0.3, 4: 0.5, 6: 0.2}, 3: {SEP: 0.1, 5: 0.9}, 4: {5: 0.6, 7: 0.4}, 5: {SEP: 0.2, 7: 0.8},
        7: {SEP: 0.2, 5: 0.8}, 6: {SEP: 1.0}}  # fmt: skip
LIKELIHOOD = [0.3 * 0.1, 0.5 * 0.6 * 0.2, 0.2 * 1.0, 0.5 * 0.4 * 0.2]  # by hand: 0.03, 0.06, 0.2, 0.04
FIRST = [0.3, 0.5, 0.2, 0.5]


def bigram_decode(ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    table = torch.full((8, 8), 1e-9)
    for prev, nxt in NEXT.items():
        for token, p in nxt.items():
            table[prev, token] = p
    return table.log()[ids]  # (P, T, V): logits whose softmax is the table's row


@pytest.mark.parametrize(("k", "expected"), [(4, 2), (3, 1), (2, 1), (1, 1)])
def test_ranking_returns_the_best_full_likelihood_among_the_top_k_first_tokens(k, expected):
    answer_ids = pad_answers(ANSWERS, PAD)
    scores = rank_answers(bigram_decode, answer_ids, num_questions=2, pad_id=PAD, k=k)
    assert scores.shape == (2, 4)
    assert scores.argmax(dim=1).tolist() == [expected, expected]
    # brute force: the top-k by first-token probability keep their exact log-likelihood, the rest −inf
    kept = sorted(range(4), key=lambda a: -FIRST[a])[:k]
    for a in range(4):
        if a in kept:
            assert scores[0, a].item() == pytest.approx(math.log(LIKELIHOOD[a]), abs=1e-5)
        else:
            assert scores[0, a].item() == float("-inf")


def test_ranking_in_chunks_equals_ranking_at_once():
    answer_ids = pad_answers(ANSWERS, PAD)
    whole = rank_answers(bigram_decode, answer_ids, 3, PAD, k=4)
    chunked = rank_answers(bigram_decode, answer_ids, 3, PAD, k=4, chunk_size=5)
    assert torch.equal(whole, chunked)


def test_sequence_likelihood_and_loss_ignore_padding():
    short = pad_answers(ANSWERS, PAD)
    longer = torch.cat([short, torch.full((4, 3), PAD)], dim=1)
    for ids in (short, longer):
        logits = bigram_decode(ids, torch.zeros(4, dtype=torch.long))
        likelihood = sequence_log_likelihood(logits, ids, PAD)
        assert likelihood.exp().tolist() == pytest.approx(LIKELIHOOD, rel=1e-4)
        assert answer_lm_loss(logits, ids, PAD).tolist() == pytest.approx((-likelihood).tolist(), rel=1e-5)


def test_distillation_mixes_one_hot_and_teacher_targets():
    ids = pad_answers(ANSWERS, PAD)
    torch.manual_seed(0)
    logits, teacher = torch.randn(4, ids.shape[1], 8), torch.randn(4, ids.shape[1], 8)
    hard = answer_lm_loss(logits, ids, PAD)
    only_teacher = answer_lm_loss(logits, ids, PAD, teacher, alpha=1.0)
    mixed = answer_lm_loss(logits, ids, PAD, teacher, alpha=0.4)
    assert torch.allclose(mixed, 0.6 * hard + 0.4 * only_teacher, atol=1e-5)
    assert not torch.allclose(hard, only_teacher)


def test_answer_pairs_weights_sum_to_one_per_answered_question():
    targets = torch.tensor([[0.0, 0.3, 0.9], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    rows, answers, weights = answer_pairs(targets)
    assert rows.tolist() == [0, 0, 2] and answers.tolist() == [1, 2, 0]
    assert weights.tolist() == pytest.approx([0.25, 0.75, 1.0])


def test_pad_answers_rejects_malformed_candidates():
    with pytest.raises(ValueError, match="non-empty"):
        pad_answers([[CLS, SEP]], PAD)
    with pytest.raises(ValueError, match="same start token"):
        pad_answers([[CLS, 3, SEP], [5, 3, SEP]], PAD)


def test_decoder_is_causal():
    sizes = TextSizes(hidden_size=16, num_heads=2, intermediate_size=32, dropout=0.0, max_position_embeddings=8)
    torch.manual_seed(0)
    decoder = AnswerDecoder(10, sizes, num_layers=2, context_size=16).eval()
    context, mask = torch.randn(1, 5, 16), torch.ones(1, 5)
    a = decoder(torch.tensor([[1, 4, 5, 6]]), context, mask)
    b = decoder(torch.tensor([[1, 4, 9, 9]]), context, mask)
    assert torch.allclose(a[:, :2], b[:, :2], atol=1e-6)  # positions 0-1 do not see tokens 2-3
    assert not torch.allclose(a[:, 2:], b[:, 2:])


# ----- ALBEF's native VQA head ---------------------------------------------------------------------------------------
CANDIDATES = [[CTX.cls_token_id, t, CTX.sep_token_id] for t in (10, 11, 12)] + [[CTX.cls_token_id, 13, 14, 3]]


def albef_and_head(**overrides):
    model = tiny_albef(**overrides)
    return model, model.native_head("answer_classifier", len(CANDIDATES), answer_token_ids=CANDIDATES)


def vqa_batch():
    batch = make_batch()
    batch["targets"] = torch.tensor([[1.0, 0, 0, 0], [0, 0.3, 0, 0.9], [0, 0, 0, 0], [0, 0, 0, 1.0]])
    return batch


def test_albef_answer_decoder_starts_as_the_fusion_encoder():
    model, head = albef_and_head()
    fusion = model.online.fusion_encoder.state_dict()
    decoder = head.decoder.encoder.state_dict()
    assert fusion.keys() == decoder.keys()
    assert all(torch.equal(fusion[k], decoder[k]) for k in fusion)
    assert torch.equal(head.decoder.lm_head.dense.weight, model.online.mlm_head.dense.weight)
    assert torch.equal(
        head.decoder.embeddings.word_embeddings.weight, model.online.text_encoder.embeddings.word_embeddings.weight
    )
    assert head.decoder.lm_head.decoder.weight is head.decoder.embeddings.word_embeddings.weight  # tied, as BERT's
    assert model.native_head("answer_classifier", 4) is None  # no candidates: no generative head


def test_albef_answer_loss_trains_decoder_and_encoders_and_moves_the_momentum_decoder():
    model, head = albef_and_head(alpha_warmup_steps=0)
    model.train(), head.train()
    before = [p.clone() for p in head.decoder_m.parameters()]
    loss = head.answer_losses(model, vqa_batch(), step=5)["answer_lm"]
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    for name, module in (("decoder", head.decoder), ("fusion", model.online.fusion_encoder),
                         ("vit", model.online.visual_encoder), ("text", model.online.text_encoder)):  # fmt: skip
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    assert all(p.grad is None for p in head.decoder_m.parameters())
    assert all(p.grad is None for p in model.momentum_model.parameters())
    # the first update moves the momentum decoder only after the online one changed; compare after a step
    with torch.no_grad():
        for p in head.decoder.parameters():
            p.add_(0.1)
    head.answer_losses(model, vqa_batch(), step=6)
    assert any(not torch.equal(a, b) for a, b in zip(before, head.decoder_m.parameters(), strict=True))
    model.eval(), head.eval()
    frozen = [p.clone() for p in head.decoder_m.parameters()]
    head.answer_losses(model, vqa_batch(), step=7)
    assert all(torch.equal(a, b) for a, b in zip(frozen, head.decoder_m.parameters(), strict=True))


def test_albef_answer_loss_counts_only_questions_with_candidates():
    model, head = albef_and_head(distill=False)
    batch = vqa_batch()
    batch["pixel_values"].requires_grad_(True)
    full = head.answer_losses(model, batch, step=0)["answer_lm"]
    full.backward()
    image_grad = batch["pixel_values"].grad.flatten(1).abs().sum(dim=1)
    # question 2 has no candidate answer: its image gets no gradient at all; the answered questions' images do
    assert image_grad[2] == 0 and (image_grad[[0, 1, 3]] > 0).all()
    batch["pixel_values"] = batch["pixel_values"].detach()
    batch["targets"][1] = 0.0  # one answered question fewer: the mean is over the other two
    assert not torch.allclose(head.answer_losses(model, batch, step=0)["answer_lm"], full, rtol=0, atol=1e-3)
    batch["targets"].zero_()
    zero = head.answer_losses(model, batch, step=0)["answer_lm"]
    assert zero.item() == 0.0 and zero.requires_grad


def test_albef_answer_scores_rank_k_candidates_per_question():
    model, head = albef_and_head(answer_rank_k=2)
    model.eval(), head.eval()
    scores = head.answer_scores(model, vqa_batch())
    assert scores.shape == (4, len(CANDIDATES))
    assert (torch.isfinite(scores).sum(dim=1) == 2).all()
    assert (scores[torch.isfinite(scores)] < 0).all()  # log-likelihoods
