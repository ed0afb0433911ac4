"""A training step's global batch as each process holds it (torchrun DDP), written once for every family.

Under data parallelism N processes each hold a contiguous slice of the step's global batch of B examples (rank r:
rows [r·B/N, (r+1)·B/N), rank 0's first). What looks across examples — in-batch negatives, ITM hard negatives,
another pair's sentence — and per-example random draws — MLM masks, negatives, mismatches — would then depend on N.
``BatchShard`` makes them not, so N processes compute what one process computes on the global batch:

- ``gather``: every rank's rows in rank order, optionally carrying gradients back to the rank that owns them;
- ``uniform`` / ``choose``: draws for the whole global batch from a generator seeded alike on every rank (the runner
  reseeds ``ModelContext.sample_generator`` from (seed, step) each step), of which each rank keeps its own rows;
- ``mean``: a mean over the global batch whose count varies by rank (masked tokens, real regions) as this rank's
  share, so that DDP's average over ranks is the global mean — of the values and of the gradients.

One process is the case N = 1. In evaluation (``model.training`` false) the batch is whole: no collectives (rank 0
evaluates alone) and draws come from the global RNG, which evaluation seeds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _gumbel(uniform: torch.Tensor) -> torch.Tensor:
    return -(-uniform.clamp_min(1e-30).log()).log()


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_batch(tensor: torch.Tensor, with_grad: bool = False) -> torch.Tensor:
    """The concatenation over processes of every rank's (B, ...) tensor, in rank order; the tensor itself when not
    distributed. ``with_grad``: gradients flow back to each rank's own slice (the functional all-gather, whose backward
    sums every rank's gradient for a slice at its owner), otherwise the result is detached (ALBEF's
    ``concat_all_gather`` for the momentum features that fill the queues)."""
    if _world_size() == 1:
        return tensor
    if with_grad:
        # the autograd form that torch has had since 2.1 (2.14's all_gather_single is not in the GPU images' 2.11)
        from torch.distributed._functional_collectives import all_gather_tensor_autograd

        return all_gather_tensor_autograd(tensor.contiguous(), 0, dist.group.WORLD)
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.detach().contiguous())
    return torch.cat(parts, dim=0)


@dataclass(frozen=True)
class BatchShard:
    """This process's ``size`` rows of a global batch of ``size × world_size`` rows, starting at ``offset``."""

    size: int
    rank: int = 0
    world_size: int = 1
    generator: torch.Generator | None = None  # None: the global RNG of the device drawn on

    @classmethod
    def of(cls, size: int, training: bool, generator: torch.Generator | None = None) -> BatchShard:
        """In training, this process's part of the step's global batch, drawing from ``generator``; in evaluation a
        whole batch drawing from the global *CPU* RNG (which evaluation seeds), so that the draws, and so a
        pre-training run's validation losses, are the same on a GPU as on the CPU: CUDA's generator gives another
        stream for the same seed."""
        if not training:
            return cls(size, generator=torch.default_generator)
        world = _world_size()
        return cls(size, dist.get_rank() if world > 1 else 0, world, generator)

    @property
    def offset(self) -> int:
        return self.rank * self.size

    @property
    def global_size(self) -> int:
        return self.size * self.world_size

    def rows(self, device: torch.device) -> torch.Tensor:
        """This rank's rows as indices into the global batch (size,)."""
        return torch.arange(self.offset, self.offset + self.size, device=device)

    def own_columns(self, device: torch.device) -> torch.Tensor:
        """(size, global_size) bool: True where a column of the global batch is the row's own example."""
        # a comparison, not F.one_hot: one_hot reads its input's range back to the host (a GPU sync every step)
        return self.rows(device)[:, None] == torch.arange(self.global_size, device=device)

    def widest(self, shape: tuple[int, ...], device: torch.device) -> tuple[int, ...]:
        """The element-wise largest of every rank's ``shape`` (text padded to each slice's longest: the global
        batch of one process is padded to the longest of all)."""
        if self.world_size == 1 or not shape:
            return tuple(shape)
        sizes = torch.tensor(shape, device=device)
        dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
        return tuple(sizes.tolist())

    def gather(self, tensor: torch.Tensor, with_grad: bool = False, pad_value: float = 0) -> torch.Tensor:
        """(global_size, ...) every rank's rows in rank order, each padded with ``pad_value`` to the widest shape."""
        if self.world_size == 1:
            return tensor
        shape = tuple(tensor.shape[1:])
        target = self.widest(shape, tensor.device)
        if target != shape:
            padding = [p for have, want in reversed(list(zip(shape, target, strict=True))) for p in (0, want - have)]
            tensor = F.pad(tensor, padding, value=pad_value)
        return all_gather_batch(tensor, with_grad)

    @torch.compiler.disable
    def uniform(self, *shape: int, device: torch.device) -> torch.Tensor:
        """U[0, 1) draws (size, *shape): this rank's rows of one (global_size, *widest shape) draw — the draw one
        process makes for the padded global batch — cut to this rank's shape. Never compiled (a compiled forward,
        ``trainer.compile_scope=forward``, calls it eager): dynamo fails on ``torch.rand`` with a generator once the
        text length is a dynamic size (inductor, third step of a pre-training run)."""
        widest = self.widest(shape, device)
        drawn_on = self.generator.device if self.generator is not None else device
        draws = torch.rand((self.global_size, *widest), generator=self.generator, device=drawn_on)
        mine = draws[(slice(self.offset, self.offset + self.size), *(slice(0, n) for n in shape))]
        return mine.to(device)

    def choose(self, weights: torch.Tensor, count: int = 1, replacement: bool = False) -> torch.Tensor:
        """(size, count) columns per row drawn ∝ ``weights`` (size, C) from ``uniform``: the same draw for a row
        whichever rank holds it, and on any device. Without replacement (Gumbel top-k) the columns differ and
        zero-weight columns are never drawn while a row has ``count`` others; with replacement (one Gumbel argmax per
        draw) zero-weight columns are never drawn. ``weights`` may also be over this rank's own rows (C = size): the
        draws still differ by rank."""
        if replacement:
            gumbel = _gumbel(self.uniform(count, weights.shape[1], device=weights.device))
            return (weights.float().log()[:, None, :] + gumbel).argmax(dim=2)
        gumbel = _gumbel(self.uniform(weights.shape[1], device=weights.device))
        return (weights.float().log() + gumbel).topk(count, dim=1).indices

    def mean(self, total: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
        """The global batch's mean of a quantity whose sum over this rank's rows is ``total`` (``count`` terms here),
        as this rank's share total · N / (count over all ranks): the average over ranks — DDP's, of values and of
        gradients — is the global mean. 0 when nothing is counted."""
        count = torch.as_tensor(count, device=total.device).detach().float()
        if self.world_size > 1:
            count = count.clone()
            dist.all_reduce(count)
        return total * self.world_size / count.clamp(min=1)
