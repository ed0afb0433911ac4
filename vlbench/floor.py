"""A run's floor: what a model that learned nothing scores on its test split, and whether the run clears it.

Why: a model that has learned nothing from the image still scores the answer prior (VQA's "yes" for every yes/no
question, NLVR2's majority class) or, in retrieval, chance; a tiny or mis-configured run can sit there looking like a
result. Every run computes its task's floor from its own data (``Task.floor``): for VQA, GQA and NLVR2 the answer
prior — the `majority` baseline's counts over the training split's answers, scored by the task's own evaluator on the
test split; for retrieval the expected recalls of a random ranking — records it, and says so at the end when the
model does not clear it by more than the test split's sampling error.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

CHUNK = 4096  # examples counted or predicted at once (VQA v2's soft targets: 3,129 floats each)


def answer_prior(task, split: str, main_metric: str) -> dict[str, float | int | str]:
    """``{name, metric, value, split, examples}``: the main metric of the per-group majority answer on ``split``,
    counted over the task's training split. It reads only the datasets' answers and question groups — no image, no new
    tokenisation — so it costs a fraction of a second; ``{}`` when the split has no public answers."""
    import torch  # here, not at the top: the leaderboard imports this module and must not load torch

    from vlbench.models.majority import GroupCountClassifier  # the models package imports every family: not at start

    train, scored_split = task.dataset("train"), task.dataset(split)
    if getattr(train, "targets", None) is None:
        return {}
    counter = GroupCountClassifier(task.num_groups, task.num_outputs)
    predictions: list[dict] = []
    with torch.no_grad():
        counter.train()
        for batch in _answer_batches(train):
            counter(None, batch)
        counter.eval()
        for batch in _answer_batches(scored_split):
            predictions += task.predict(counter(None, batch), batch, split)
    scored = task.evaluate(split, predictions)
    if scored is None:
        return {}
    return {"name": "answer prior: each question type's most frequent training answer", "metric": main_metric,
            "value": float(scored.metrics[main_metric]), "split": split, "examples": len(predictions)}  # fmt: skip


def _answer_batches(dataset) -> Iterator[dict]:
    """The dataset's examples as batches of index, group and (where given) answer keys, as its collate makes them."""
    import torch

    for start in range(0, len(dataset), CHUNK):
        index = range(start, min(start + CHUNK, len(dataset)))
        batch = {"index": torch.tensor(index), "group_ids": torch.tensor([dataset.group_ids[i] for i in index])}
        if dataset.targets is not None and dataset.collate_targets is not None:
            batch.update(dataset.collate_targets([dataset.targets[i] for i in index]))
        yield batch


def clears_floor(value: float, floor: dict) -> bool:
    """Whether a percentage ``value`` lies above the floor by more than two standard errors of a rate measured on the
    floor's ``examples`` (sqrt(p(1-p)/n) at the floor's rate; retrieval counts its images, the fewer queries): below
    that, the difference may be sampling noise."""
    return value > floor["value"] + floor_margin(floor)


def floor_margin(floor: dict) -> float:
    """The margin ``clears_floor`` asks for, in the metric's points (for the message)."""
    p, n = floor["value"] / 100.0, max(int(floor["examples"]), 1)
    return 200.0 * math.sqrt(max(p * (1.0 - p), 1e-4) / n)
