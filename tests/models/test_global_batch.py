"""The global batch's random draws (``models/global_batch.py``)."""

from __future__ import annotations

import pytest
import torch

from vlbench.models.global_batch import BatchShard


def test_evaluation_draws_come_from_the_cpu_generator_whatever_the_device():
    """A pre-training run's validation losses depend on evaluation's masks: drawn from the device's generator they
    would differ between a GPU and the CPU for the same seed. The meta device stands in for a GPU here: the draw must
    advance the CPU generator and be the numbers a seeded CPU draw gives."""
    torch.manual_seed(0)
    expected = torch.rand((4, 3, 2))
    torch.manual_seed(0)
    on_meta = BatchShard.of(4, training=False).uniform(3, 2, device=torch.device("meta"))
    assert on_meta.device.type == "meta" and on_meta.shape == (4, 3, 2)
    assert torch.equal(torch.rand(1), torch.rand((4 * 3 * 2 + 1,), generator=torch.Generator().manual_seed(0))[-1:])
    torch.manual_seed(0)
    on_cpu = BatchShard.of(4, training=False).uniform(3, 2, device=torch.device("cpu"))
    assert torch.equal(on_cpu, expected)


def test_training_draws_come_from_the_step_generator():
    generator = torch.Generator().manual_seed(5)
    drawn = BatchShard.of(2, training=True, generator=generator).uniform(3, device=torch.device("cpu"))
    assert torch.equal(drawn, torch.rand((2, 3), generator=torch.Generator().manual_seed(5)))


def test_choosing_with_replacement_follows_the_weights_and_skips_zero_weights():
    weights = torch.tensor([[0.0, 1.0, 3.0, 0.0]]).repeat(20_000, 1)
    shard = BatchShard.of(20_000, training=True, generator=torch.Generator().manual_seed(1))
    drawn = shard.choose(weights, count=3, replacement=True)
    assert drawn.shape == (20_000, 3) and set(drawn.unique().tolist()) == {1, 2}
    assert (drawn == 2).float().mean().item() == pytest.approx(0.75, abs=0.01)  # ∝ 1 : 3
    assert (drawn[:, 0] == drawn[:, 1]).any()  # with replacement a column may repeat within a row
    again = BatchShard.of(20_000, training=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again.choose(weights, count=3, replacement=True), drawn)
