"""The NaN guard: a step whose loss or gradient norm is not finite makes no update and is counted; too many in a row
stop the run with one line, keeping the last good checkpoint and writing no result.json."""

import json
import re

import pytest
import torch

from vlbench.errors import VlbenchError
from vlbench.runner import run
from vlbench.tasks.vqa import VQATask


def poison_training_losses(monkeypatch, nan_loss: set[int], nan_gradient: set[int]) -> None:
    """The n-th training loss (1-based; evaluation computes none) is NaN, or finite with NaN gradients."""
    original = VQATask.loss
    calls = [0]

    def loss(self, outputs, batch):
        calls[0] += 1
        value = original(self, outputs, batch)
        if calls[0] in nan_loss:
            return value * float("nan")
        if calls[0] in nan_gradient:  # d√x/dx at 0 is infinite: value + 0, gradients 0 · ∞ = NaN
            return value + torch.sqrt(outputs.sum() * 0)
        return value

    monkeypatch.setattr(VQATask, "loss", loss)


def test_non_finite_steps_are_skipped_and_counted(make_cfg, tmp_path, monkeypatch, capsys):
    poison_training_losses(monkeypatch, nan_loss={2, 4}, nan_gradient={5})
    result = run(make_cfg("model=textonly", "trainer.max_steps=6"), tmp_path / "r")
    assert result["skipped_steps"] == 3 and result["steps"] == 6
    state = torch.load(tmp_path / "r" / "checkpoints" / "last.state.pt", weights_only=True)
    assert state["optimizer"]["state"][0]["step"] == 3  # three updates of six steps
    assert state["scheduler"]["last_epoch"] == 6  # the lr schedule moved on
    lines = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines if "train/loss" in e] == [1, 3, 6]
    assert [(e["step"], e["train/skipped_steps"]) for e in lines if "train/skipped_steps" in e] == [
        (2, 1),
        (4, 2),
        (5, 3),
    ]
    out = capsys.readouterr().out
    assert "step 2: loss nan, gradient norm nan: not finite, update skipped (1 in a row, 1 in all)" in out
    # step 5: a finite loss whose gradients are not (after step 4's NaN loss: 2 in a row)
    step_5 = r"step 5: loss \d+\.\d+, gradient norm nan: not finite, update skipped \(2 in a row, 3 in all\)"
    assert re.search(step_5, out)


def test_too_many_bad_steps_in_a_row_stop_the_run(make_cfg, tmp_path, monkeypatch):
    poison_training_losses(monkeypatch, nan_loss=set(range(3, 100)), nan_gradient=set())
    cfg = make_cfg("model=textonly", "trainer.max_steps=8", "trainer.max_bad_steps=2", "trainer.checkpoint_every=1")
    with pytest.raises(VlbenchError) as caught:
        run(cfg, tmp_path / "r")
    message = str(caught.value)
    assert message == (
        "step 4: 2 steps in a row with a non-finite loss or gradient norm (trainer.max_bad_steps=2); last good "
        "checkpoint: checkpoints/last.* (step 2); lower trainer.lr or check the data"
    )
    assert not (tmp_path / "r" / "result.json").exists()
    assert torch.load(tmp_path / "r" / "checkpoints" / "last.state.pt", weights_only=True)["step"] == 2
