"""Data-parallel training under torchrun: joining the process group, which process does what, agreeing across them.

``torchrun --nproc_per_node=N -m vlbench.cli …`` starts N copies of one run, trained with PyTorch's
DistributedDataParallel. Each joins the process group from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT): gloo for CPU tensors, NCCL for CUDA tensors, one GPU per process (cuda:LOCAL_RANK).
How the runner uses it:

- ``trainer.batch_size`` is the global batch; each process loads its contiguous 1/N of every global batch, and the
  models make cross-example objectives, random draws and loss normalisers the global batch's
  (``models/global_batch.py``): N processes train as one process on the global batch.
- Rank 0 alone writes the run directory and evaluates; the others wait at a barrier (hence the long timeout).

Without WORLD_SIZE > 1 everything here is the single-process case and does nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from vlbench.errors import VlbenchError

# rank 0 evaluates alone while the others wait in a barrier: a base-scale retrieval evaluation takes a while
TIMEOUT = timedelta(hours=3)


@dataclass(frozen=True)
class Processes:
    """This process's place among the run's processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_batch_size(self, global_batch_size: int) -> int:
        """This process's share of ``trainer.batch_size`` (the global batch)."""
        if global_batch_size % self.world_size:
            raise VlbenchError(
                f"trainer.batch_size={global_batch_size} is the global batch: it must divide evenly over the "
                f"{self.world_size} processes (torchrun --nproc_per_node)"
            )
        return global_batch_size // self.world_size

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, values: list[float]) -> list[float]:
        """The mean over processes of each value (one collective)."""
        if not self.distributed or not values:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return (tensor / self.world_size).tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on any."""
        if not self.distributed:
            return flag
        tensor = torch.tensor([float(flag)])
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return bool(tensor.item())

    def broadcast(self, value: float) -> float:
        """Rank 0's value, on every process."""
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(tensor, src=0)
        return float(tensor.item())

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it may write shared files: the synthetic world, extracted region features),
        then the others run it and find them there."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def wrap(self, net: nn.Module, device: torch.device, find_unused_parameters: bool) -> nn.Module:
        """DistributedDataParallel: averages gradients over processes in backward. Buffers are not broadcast each
        step: they change identically on every process (momentum encoders and queues are updated from gathered
        features), which ``check_replicas_agree`` verifies at every checkpoint. BatchNorm (Pixel-BERT's CNN) becomes
        SyncBatchNorm, whose statistics are the global batch's as in one process; it exists on GPUs only."""
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules()):
            if device.type != "cuda":
                raise VlbenchError(
                    "this model has BatchNorm layers: training it in several processes needs CUDA (SyncBatchNorm)"
                )
            from timm.layers import convert_sync_batchnorm

            net = convert_sync_batchnorm(net)  # in place below the root: the same parameters, the same state keys
        return DistributedDataParallel(
            net,
            device_ids=[device.index] if device.type == "cuda" else None,
            forward_sync_buffers=False,
            find_unused_parameters=find_unused_parameters,
        )

    def check_replicas_agree(self, net: nn.Module) -> None:
        """Every parameter and buffer equal on every process (a per-tensor fingerprint, compared exactly)."""
        if not self.distributed:
            return
        names, prints = [], []
        for name, tensor in net.state_dict().items():
            if tensor.is_floating_point() or tensor.dtype in (torch.int64, torch.int32, torch.bool):
                values = torch.nan_to_num(tensor.detach().double())
                names.append(name)
                prints.append(torch.stack([values.sum(), (values * values).sum()]).cpu())
        fingerprint = torch.stack(prints)
        low, high = fingerprint.clone(), fingerprint.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        differ = (low != high).any(dim=1).nonzero().flatten().tolist()
        if differ:
            shown = ", ".join(names[i] for i in differ[:5])
            raise VlbenchError(f"the {self.world_size} processes' models diverged ({len(differ)} tensors: {shown})")


def init_from_env() -> Processes:
    """Join the process group torchrun describes in the environment (once per process); rank 0 of 1 without it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Processes()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available() and local_rank < torch.cuda.device_count():
            torch.cuda.set_device(local_rank)
            backend = "cpu:gloo,cuda:nccl"  # collectives of CPU tensors (step statistics) stay possible
        dist.init_process_group(backend, timeout=TIMEOUT)
    return Processes(dist.get_rank(), dist.get_world_size(), local_rank)


def unused_parameters(net: nn.Module, training_loss: Callable[[], torch.Tensor]) -> list[str]:
    """Trainable parameters one training forward/backward leaves without a gradient (a task that does not use a
    model's pre-training heads): DDP must then search the graph for unused parameters every step, otherwise it need
    not. The probe leaves weights, buffers (a forward may update momentum encoders and queues), RNG and gradients as
    they were."""
    saved = {name: value.detach().clone() for name, value in net.state_dict().items()}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        loss = training_loss()
        if loss.requires_grad:
            loss.backward()
    unused = [name for name, p in net.named_parameters() if p.requires_grad and p.grad is None]
    net.zero_grad(set_to_none=True)
    net.load_state_dict(saved)
    return unused
