"""The answer prior of a run's test split: what predicting each question type's most frequent training answer scores.

Why: a model that has learned nothing from the image still scores the answer prior (VQA's "yes" for every yes/no
question, NLVR2's majority class), and a tiny or mis-configured run can sit there looking like a result. Every
answer-classification run (VQA, GQA, NLVR2) computes that floor from its own data in the same run — the `majority`
baseline's counts over one pass of the training split, scored by the task's own evaluator on the test split — records
it, and says so at the end when the model does not clear it by more than the test split's sampling error.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

PRIOR_HEADS = ("answer_classifier", "pair_classifier")  # the tasks that answer from a fixed set of classes
COUNT_BATCH = 1024


def has_answer_prior(task_cls: type) -> bool:
    return getattr(task_cls, "head_kind", "") in PRIOR_HEADS


@torch.no_grad()
def answer_prior(
    task_cls: type, cfg: DictConfig, data_root: Path, tokenizer, split: str, main_metric: str
) -> dict[str, float | int | str]:
    """``{metric, value, split, examples}``: the main metric of the per-group majority answer on ``split``, its
    answers counted over the training split (read again without images: a few seconds)."""
    from vlbench.models.majority import GroupCountClassifier  # the models package imports every family: not at start

    task = task_cls(cfg.task, cfg.data, data_root, tokenizer, "none")
    counter = GroupCountClassifier(task.num_groups, task.num_outputs)
    counter.train()
    for batch in _batches(task.dataset("train")):
        counter(None, batch)
    counter.eval()
    predictions: list[dict] = []
    for batch in _batches(task.dataset(split)):
        predictions += task.predict(counter(None, batch), batch, split)
    scored = task.evaluate(split, predictions)
    if scored is None:
        return {}
    return {"metric": main_metric, "value": float(scored.metrics[main_metric]), "split": split,
            "examples": len(predictions)}  # fmt: skip


def _batches(dataset) -> DataLoader:
    return DataLoader(dataset, batch_size=COUNT_BATCH, shuffle=False, collate_fn=dataset.collate)


def clears_prior(value: float, prior: dict) -> bool:
    """Whether a percentage ``value`` lies above the prior by more than two standard errors of an accuracy on that
    many test examples (sqrt(p(1-p)/n) at the prior's rate): below that, the difference may be sampling noise."""
    return value > prior["value"] + prior_margin(prior)


def prior_margin(prior: dict) -> float:
    """The margin ``clears_prior`` asks for, in the metric's points (for the message)."""
    p, n = prior["value"] / 100.0, max(int(prior["examples"]), 1)
    return 200.0 * math.sqrt(max(p * (1.0 - p), 1e-4) / n)
