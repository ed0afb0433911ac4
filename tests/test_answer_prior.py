"""The answer prior beside every answer-classification run: its value, its record, and the end-of-run warning."""

import re
from collections import Counter

import pytest

from tests.test_tasks_end_to_end import SMALL_FORMATS
from vlbench.answer_prior import answer_prior, clears_prior, prior_margin
from vlbench.config_hash import config_hash
from vlbench.data.sources import resolve_data_root
from vlbench.data.text import load_tokenizer
from vlbench.registry import TASKS
from vlbench.runner import format_summary, run


def test_the_prior_is_the_majority_baselines_score_and_the_run_records_it(make_cfg, tmp_path, small_world):
    """A 4-step text-only run records the prior of its test split; it equals what the `majority` model scores after
    one pass over the 288 training questions (18 × 16; its predictions are checked by hand in test_runner.py)."""
    result = run(make_cfg("model=textonly"), tmp_path / "t")
    majority = run(make_cfg("model=majority", "trainer.max_steps=18"), tmp_path / "m")
    prior = result["answer_prior"]
    assert prior["metric"] == "accuracy" and prior["split"] == "test" and prior["examples"] == 72
    assert prior["value"] == pytest.approx(majority["metrics"]["accuracy"], abs=1e-9)
    assert majority["answer_prior"] is None  # the baseline itself: nothing to compare
    off = make_cfg("model=textonly", "trainer.answer_prior=false")
    assert run(off, tmp_path / "off")["answer_prior"] is None
    assert config_hash(off) == config_hash(make_cfg("model=textonly"))  # results-neutral: the same run


def test_nlvr2_prior_is_the_majority_class_rate(make_cfg):
    cfg = make_cfg("task=nlvr2", *SMALL_FORMATS)
    task_cls = TASKS.get("nlvr2")
    root = resolve_data_root(cfg.data, task_cls.data_format)
    task = task_cls(cfg.task, cfg.data, root, load_tokenizer(cfg.data.tokenizer, root), "none")
    majority = Counter(task.dataset("train").targets).most_common(1)[0][0]
    test = task.dataset("test").targets
    expected = 100.0 * sum(label == majority for label in test) / len(test)
    prior = answer_prior(task, "test", "accuracy")
    assert prior["value"] == pytest.approx(expected) and prior["examples"] == len(test)


def test_the_margin_is_two_standard_errors_of_the_prior_rate():
    prior = {"metric": "accuracy", "value": 50.0, "split": "test", "examples": 100}
    assert prior_margin(prior) == pytest.approx(10.0)  # 2 · 100 · sqrt(0.5 · 0.5 / 100)
    assert clears_prior(60.1, prior) and not clears_prior(59.9, prior)
    sure = {**prior, "value": 100.0}  # a prior of 100 % still asks for a sliver, never a zero margin
    assert prior_margin(sure) > 0 and not clears_prior(100.0, sure)


def test_the_summary_warns_only_when_the_prior_is_not_cleared():
    record = {
        "model": "pixelbert", "task": "vqa", "scale": "tiny", "seed": 0, "split": "test", "checkpoint": "last",
        "metrics": {"accuracy": 52.78}, "main_metric": "accuracy", "params": 1, "train_samples": 96_000,
        "wall_s": 253.0,
        "answer_prior": {"metric": "accuracy", "value": 51.21, "split": "test", "examples": 3000},
    }  # fmt: skip
    summary = format_summary(record)
    assert re.search(r"\nanswer prior +\| 51\.21 \(majority answer per question type\)\n", summary)
    assert "warning: test accuracy 52.78 does not clear the answer prior 51.21 by more than 1.83" in summary
    assert "warning" not in format_summary({**record, "metrics": {"accuracy": 72.03}})
    assert "answer prior" not in format_summary({**record, "answer_prior": None})  # retrieval, pre-training
