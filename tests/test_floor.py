"""The floor beside every run (answer prior, chance): its value, its record, and the end-of-run warning."""

import re
from collections import Counter

import pytest

from tests.test_tasks_end_to_end import SMALL_FORMATS
from vlbench.config_hash import config_hash
from vlbench.data.sources import resolve_data_root
from vlbench.data.text import load_tokenizer
from vlbench.floor import answer_prior, clears_floor, floor_margin
from vlbench.registry import TASKS
from vlbench.runner import format_summary, run


def test_the_prior_is_the_majority_baselines_score_and_the_run_records_it(make_cfg, tmp_path, small_world):
    """A 4-step text-only run records the prior of its test split; it equals what the `majority` model scores after
    one pass over the 288 training questions (18 × 16; its predictions are checked by hand in test_runner.py)."""
    result = run(make_cfg("model=textonly"), tmp_path / "t")
    majority = run(make_cfg("model=majority", "trainer.max_steps=18"), tmp_path / "m")
    floor = result["floor"]
    assert floor["metric"] == "accuracy" and floor["split"] == "test" and floor["examples"] == 72
    assert floor["name"].startswith("answer prior")
    assert floor["value"] == pytest.approx(majority["metrics"]["accuracy"], abs=1e-9)
    assert majority["floor"] is None  # the baseline itself: nothing to compare
    off = make_cfg("model=textonly", "trainer.floor=false")
    assert run(off, tmp_path / "off")["floor"] is None
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


def test_the_margin_is_two_standard_errors_of_the_floor_rate():
    floor = {"name": "answer prior", "metric": "accuracy", "value": 50.0, "split": "test", "examples": 100}
    assert floor_margin(floor) == pytest.approx(10.0)  # 2 · 100 · sqrt(0.5 · 0.5 / 100)
    assert clears_floor(60.1, floor) and not clears_floor(59.9, floor)
    sure = {**floor, "value": 100.0}  # a floor of 100 % still asks for a sliver, never a zero margin
    assert floor_margin(sure) > 0 and not clears_floor(100.0, sure)


def test_chance_recalls_by_hand():
    from vlbench.tasks.retrieval_eval import chance_recalls

    # 2 images with 2 captions each: one random text is one of an image's 2 of 4 (1/2), one random image is right 1/2
    two = chance_recalls([2, 2])
    assert two["tr_r1"] == pytest.approx(50.0) and two["ir_r1"] == pytest.approx(50.0)
    assert two["tr_r5"] == two["ir_r10"] == 100.0 and two["mean_recall"] == pytest.approx(500 / 6)
    # 3 images, captions 1, 1, 2 (4 texts), K = 2: P(none of c among 2 of 4) = C(4 − c, 2) / C(4, 2): 3/6, 3/6, 1/6
    uneven = chance_recalls([1, 1, 2], recall_at=(2,))
    assert uneven["tr_r2"] == pytest.approx(100 * (1 - (3 / 6 + 3 / 6 + 1 / 6) / 3))
    assert uneven["ir_r2"] == pytest.approx(100 * 2 / 3)
    assert chance_recalls([5] * 200)["mean_recall"] == pytest.approx(2.6484, abs=1e-4)  # the synthetic test split


def test_a_retrieval_run_records_chance_as_its_floor(make_cfg, tmp_path):
    result = run(make_cfg("model=albef", "task=retrieval", "trainer.max_steps=1", *SMALL_FORMATS), tmp_path / "r")
    floor = result["floor"]
    assert floor["metric"] == "mean_recall" and floor["name"].startswith("chance") and floor["examples"] == 6
    from vlbench.tasks.retrieval_eval import chance_recalls

    assert floor["value"] == pytest.approx(chance_recalls([5] * 6)["mean_recall"])


def test_the_summary_warns_only_when_the_floor_is_not_cleared():
    record = {
        "model": "pixelbert", "task": "vqa", "scale": "tiny", "seed": 0, "split": "test", "checkpoint": "last",
        "metrics": {"accuracy": 52.78}, "main_metric": "accuracy", "params": 1, "train_samples": 96_000,
        "wall_s": 253.0,
        "floor": {"name": "answer prior: each question type's most frequent training answer", "metric": "accuracy",
                  "value": 51.21, "split": "test", "examples": 3000},
    }  # fmt: skip
    summary = format_summary(record)
    assert re.search(r"\nfloor +\| 51\.21 \(answer prior: each question type's most frequent [a-z ]+\)\n", summary)
    assert "warning: test accuracy 52.78 does not clear the floor 51.21 (answer prior) by more than 1.83" in summary
    assert "warning" not in format_summary({**record, "metrics": {"accuracy": 72.03}})
    assert "floor" not in format_summary({**record, "floor": None})  # pre-training
