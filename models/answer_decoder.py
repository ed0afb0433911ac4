"""A generative answer decoder and candidate-list ranking (ALBEF's VQA head; any family may reuse it).

The decoder is a BERT stack whose self-attention is causal and whose cross-attention reads the fused question states;
an LM head (tied to its word embeddings, as BERT's) predicts the next answer token. Answers are token sequences
``[CLS] answer [SEP]``: [CLS] is the start token and [SEP] ends the answer, so a prefix of a longer answer is not
scored as complete.

Inference ranks a fixed candidate list as the ALBEF/BLIP reference does: one decoder step from [CLS] gives every
candidate's first-token probability; the top ``k`` candidates are rescored by their full-sequence log-likelihood
(every token after [CLS], [SEP] included) and the best is the prediction. The reference ALBEF code adds the first-token
log-probability once more to that sum; we score by the plain full-answer likelihood (as BLIP does), which is what
"rescored by full answer likelihood" means.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vlbench.models.base import TextSizes
from vlbench.models.layers import MaskedLMHead, TextEmbeddings, TransformerStack, init_bert_weights

# decode(answer ids (P, T), question rows (P,)) → next-token logits (P, T, V): the decoder over those questions' states
DecodeFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class AnswerDecoder(nn.Module):
    """Embeddings → causal self-attention + cross-attention layers → LM head (next-token logits)."""

    def __init__(self, vocab_size: int, sizes: TextSizes, num_layers: int, context_size: int):
        super().__init__()
        self.embeddings = TextEmbeddings(vocab_size, sizes)
        self.encoder = TransformerStack(sizes, num_layers, cross_attention_size=context_size)
        self.lm_head = MaskedLMHead(self.embeddings.word_embeddings)
        init_bert_weights(self)

    def forward(self, ids: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        states = self.encoder(self.embeddings(ids), None, context, context_mask, causal=True)
        return self.lm_head(states)


def pad_answers(answer_token_ids: list[list[int]], pad_id: int) -> torch.Tensor:
    """(N, T) candidate answers, right-padded; each must be [start, ≥1 answer token, ..., end]."""
    if not answer_token_ids or any(len(ids) < 3 for ids in answer_token_ids):
        raise ValueError("answer candidates must be non-empty token sequences [CLS] answer... [SEP]")
    if len({ids[0] for ids in answer_token_ids}) != 1:
        raise ValueError("every answer candidate must start with the same start token ([CLS])")
    length = max(len(ids) for ids in answer_token_ids)
    out = torch.full((len(answer_token_ids), length), pad_id, dtype=torch.long)
    for row, ids in enumerate(answer_token_ids):
        out[row, : len(ids)] = torch.tensor(ids)
    return out


def token_targets(ids: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token targets for positions 0..T-2 and which of them count (not padding)."""
    targets = ids[:, 1:]
    return targets, targets != pad_id


def sequence_log_likelihood(logits: torch.Tensor, ids: torch.Tensor, pad_id: int) -> torch.Tensor:
    """log p(ids[1:] | ids[0]) per sequence (P,): the sum of next-token log-probabilities over non-pad targets."""
    targets, real = token_targets(ids, pad_id)
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logp * real).sum(dim=1)


def answer_lm_loss(
    logits: torch.Tensor,
    ids: torch.Tensor,
    pad_id: int,
    teacher_logits: torch.Tensor | None = None,
    alpha: float = 0.0,
) -> torch.Tensor:
    """Per-sequence LM loss (P,), summed over the answer's tokens; padding contributes nothing.

    With a teacher (the momentum decoder), each token's target is (1 − alpha) · one-hot + alpha · softmax(teacher):
    ALBEF's momentum distillation.
    """
    targets, real = token_targets(ids, pad_id)
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    loss = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if teacher_logits is not None and alpha > 0:
        soft = -(F.softmax(teacher_logits[:, :-1].float(), dim=-1) * logp).sum(dim=-1)
        loss = (1 - alpha) * loss + alpha * soft
    return (loss * real).sum(dim=1)


def answer_pairs(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(question row, answer index, weight) for every answer with a positive score; weights sum to 1 per question.

    Why normalised: ALBEF weights each annotated answer by its share of the annotators, so every question contributes
    the same total weight; we take the share of the official soft scores (only in-candidate answers are trainable).
    """
    rows, answers = targets.nonzero(as_tuple=True)
    scores = targets[rows, answers]
    totals = targets.clamp(min=0).sum(dim=1)
    return rows, answers, scores / totals[rows]


@torch.no_grad()
def rank_answers(
    decode: DecodeFn, answer_ids: torch.Tensor, num_questions: int, pad_id: int, k: int, chunk_size: int = 1024
) -> torch.Tensor:
    """Scores (Q, N) of the candidate answers: the full-answer log-likelihood for each question's top-``k`` candidates
    by first-token probability, −inf for the rest (so the arg-max is the prediction). The Q·k candidate sequences are
    decoded ``chunk_size`` at a time (their logits span the whole vocabulary)."""
    device = answer_ids.device
    questions = torch.arange(num_questions, device=device)
    start = answer_ids[:1, :1].expand(num_questions, 1)
    first_logp = F.log_softmax(decode(start, questions)[:, 0].float(), dim=-1)  # (Q, V)
    first_token_scores = first_logp[:, answer_ids[:, 1]]  # (Q, N)
    k = min(k, answer_ids.shape[0])
    top = first_token_scores.topk(k, dim=1).indices  # (Q, k)
    candidates, rows = answer_ids[top.reshape(-1)], questions.repeat_interleave(k)
    parts = []
    for i in range(0, candidates.shape[0], chunk_size):
        ids = candidates[i : i + chunk_size]
        parts.append(sequence_log_likelihood(decode(ids, rows[i : i + chunk_size]), ids, pad_id))
    likelihood = torch.cat(parts)
    scores = torch.full(first_token_scores.shape, float("-inf"), device=device)
    return scores.scatter(1, top, likelihood.view(num_questions, k))
