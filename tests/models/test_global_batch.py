"""The global batch's random draws (``models/global_batch.py``)."""

from __future__ import annotations

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
