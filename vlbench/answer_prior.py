"""The answer prior of a run's test split: what predicting each question type's most frequent training answer scores.

Why: a model that has learned nothing from the image still scores the answer prior (VQA's "yes" for every yes/no
question, NLVR2's majority class), and a tiny or mis-configured run can sit there looking like a result. Every
answer-classification run (VQA, GQA, NLVR2) computes that floor from its own data in the same run — the `majority`
baseline's counts over the training split's answers, scored by the task's own evaluator on the test split — records
it, and says so at the end when the model does not clear it by more than the test split's sampling error.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

PRIOR_HEADS = ("answer_classifier", "pair_classifier")  # the tasks that answer from a fixed set of classes
CHUNK = 4096  # examples counted or predicted at once (VQA v2's soft targets: 3,129 floats each)


def has_answer_prior(task) -> bool:
    return getattr(task, "head_kind", "") in PRIOR_HEADS


@torch.no_grad()
def answer_prior(task, split: str, main_metric: str) -> dict[str, float | int | str]:
    """``{metric, value, split, examples}``: the main metric of the per-group majority answer on ``split``, counted
    over the task's training split. It reads only the datasets' answers and question groups — no image, no new
    tokenisation — so it costs a fraction of a second; ``{}`` when the split has no public answers."""
    from vlbench.models.majority import GroupCountClassifier  # the models package imports every family: not at start

    train, scored_split = task.dataset("train"), task.dataset(split)
    if getattr(train, "targets", None) is None:
        return {}
    counter = GroupCountClassifier(task.num_groups, task.num_outputs)
    counter.train()
    for batch in _answer_batches(train):
        counter(None, batch)
    counter.eval()
    predictions: list[dict] = []
    for batch in _answer_batches(scored_split):
        predictions += task.predict(counter(None, batch), batch, split)
    scored = task.evaluate(split, predictions)
    if scored is None:
        return {}
    return {"metric": main_metric, "value": float(scored.metrics[main_metric]), "split": split,
            "examples": len(predictions)}  # fmt: skip


def _answer_batches(dataset) -> Iterator[dict[str, torch.Tensor]]:
    """The dataset's examples as batches of index, group and (where given) answer keys, as its collate makes them."""
    for start in range(0, len(dataset), CHUNK):
        index = range(start, min(start + CHUNK, len(dataset)))
        batch = {"index": torch.tensor(index), "group_ids": torch.tensor([dataset.group_ids[i] for i in index])}
        if dataset.targets is not None and dataset.collate_targets is not None:
            batch.update(dataset.collate_targets([dataset.targets[i] for i in index]))
        yield batch


def clears_prior(value: float, prior: dict) -> bool:
    """Whether a percentage ``value`` lies above the prior by more than two standard errors of an accuracy on that
    many test examples (sqrt(p(1-p)/n) at the prior's rate): below that, the difference may be sampling noise."""
    return value > prior["value"] + prior_margin(prior)


def prior_margin(prior: dict) -> float:
    """The margin ``clears_prior`` asks for, in the metric's points (for the message)."""
    p, n = prior["value"] / 100.0, max(int(prior["examples"]), 1)
    return 200.0 * math.sqrt(max(p * (1.0 - p), 1e-4) / n)
