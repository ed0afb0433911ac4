"""Data-parallel training under torchrun: joining the process group, which process does what, agreeing across them.

``torchrun --nproc_per_node=N -m vlbench.cli …`` starts N copies of one run, trained with PyTorch's
DistributedDataParallel. Each joins the process group from torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT): gloo for CPU tensors, NCCL for CUDA tensors, one GPU per process (cuda:LOCAL_RANK).
How the runner uses it:

- ``trainer.batch_size`` is the global batch; each process loads its contiguous 1/N of every global batch, and the
  models make cross-example objectives, random draws and loss normalisers the global batch's
  (``models/global_batch.py``): N processes train as one process on the global batch.
- Evaluation is sharded: each process predicts a contiguous shard of the split and rank 0 gathers the predictions
  (``gather_objects``, in the split's order, each example once) and scores them; rank 0 alone writes the run
  directory. Tasks whose prediction needs the whole split (retrieval, pre-training, NLVR2 text assignment) and FSDP
  runs evaluate on rank 0 alone while the others wait at a barrier (hence the long timeout).
- ``trainer.fsdp=true`` shards parameters, gradients and optimizer state over the processes with PyTorch's FSDP2
  (``fully_shard``: one unit per transformer block, the rest in the root) instead of replicating them (DDP); the
  same gradients (each process's average over the global batch), so the same training. Rank 0 then keeps an
  unsharded replica, refreshed from the shards (``copy_gathered_state``), that it evaluates and saves: checkpoints are
  full state dicts, as without FSDP (resume and ``init_from`` read them either way).

Without WORLD_SIZE > 1 everything here is the single-process case and does nothing.
"""

from __future__ import annotations

import copy
import inspect
import os
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel

from vlbench.errors import VlbenchError

# rank 0 may evaluate alone while the others wait in a barrier: a base-scale retrieval evaluation takes a while
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

    def gather_objects(self, obj: object) -> list | None:
        """Every process's ``obj`` (picklable), in rank order, on rank 0; None on the others (one collective)."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

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
        SyncBatchNorm on GPUs, GlobalBatchNorm on CPU: the global batch's statistics, as in one process."""
        net = _sync_batchnorm(net, device)
        return DistributedDataParallel(
            net,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
            **NO_BUFFER_BROADCAST,
        )

    def shard(self, net: nn.Module, device: torch.device, blocks: list[nn.Module]) -> nn.Module:
        """FSDP2, in place: each of ``blocks`` (the transformer blocks) a unit, the rest of ``net`` the root unit.
        Parameters become this process's shards (DTensors; the names stay), gathered for each unit's forward and
        backward, gradients reduce-scattered (averaged, as DDP). An optimizer must be built over them afterwards."""
        from torch.distributed.fsdp import fully_shard

        strided = [name for name, p in net.named_parameters() if not p.is_contiguous()]
        if strided:
            more = f" and {len(strided) - 1} more" if len(strided) > 1 else ""
            raise VlbenchError(
                f"trainer.fsdp=true: FSDP shards contiguous parameters only, and {strided[0]}{more} is stored "
                "channels-last; set model.channels_last=false"
            )
        net = _sync_batchnorm(net, device)
        for block in blocks:
            fully_shard(block)
        fully_shard(net)
        return net

    def check_replicas_agree(self, net: nn.Module) -> None:
        """Every parameter and buffer equal on every process (a per-tensor fingerprint, compared exactly); under FSDP
        each process holds its own part of each parameter (nothing to compare), and the buffers are compared."""
        if not self.distributed:
            return
        names, prints = [], []
        for name, tensor in net.state_dict().items():
            if isinstance(tensor, DTensor):
                continue
            if tensor.is_floating_point() or tensor.dtype in (torch.int64, torch.int32, torch.bool):
                values = torch.nan_to_num(tensor.detach().double())
                names.append(name)
                prints.append(torch.stack([values.sum(), (values * values).sum()]).cpu())
        if not prints:  # sharded parameters only
            return
        fingerprint = torch.stack(prints)
        low, high = fingerprint.clone(), fingerprint.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        differ = (low != high).any(dim=1).nonzero().flatten().tolist()
        if differ:
            shown = ", ".join(names[i] for i in differ[:5])
            raise VlbenchError(f"the {self.world_size} processes' models diverged ({len(differ)} tensors: {shown})")


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch where SyncBatchNorm does not run (CPU processes over gloo).

    In training each channel's mean is the all-reduced sum over every process's examples, and its variance the
    all-reduced sum of squared deviations from that mean (two passes, as one process computes it); both reductions
    carry gradients (the functional all-reduce's backward all-reduces them), so N processes normalise,
    back-propagate and update the running statistics as one process on the whole batch. Evaluation reads the
    running statistics, as BatchNorm does. Same parameters and buffers as the BatchNorm it replaces, so the same
    checkpoint keys."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"GlobalBatchNorm expects (N, C, ...) input, got {input.dim()}-d")

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        from torch.distributed._functional_collectives import all_reduce

        self._check_input_dim(input)
        if not self.training:  # running statistics (this process's batch where none are tracked): no collective
            local = self.running_mean is None
            stats = (self.running_mean, self.running_var)
            return F.batch_norm(input, *stats, self.weight, self.bias, local, 0.0, self.eps)
        reduce_dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        count = torch.tensor([float(input.numel() // input.shape[1])], device=input.device)
        dist.all_reduce(count)
        n = count.item()
        mean = all_reduce(input.sum(reduce_dims), "sum", dist.group.WORLD) / n
        centred = input - mean.view(shape)
        var = all_reduce((centred * centred).sum(reduce_dims), "sum", dist.group.WORLD) / n
        out = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            out = out * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
                unbiased = var.detach() * (n / max(n - 1.0, 1.0))
                self.running_var.mul_(1 - factor).add_(unbiased, alpha=factor)
        return out


PLAIN_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _global_batchnorm(module: nn.Module) -> nn.Module:
    """Every plain BatchNorm{1,2,3}d below ``module`` replaced, in place, by a GlobalBatchNorm holding the same
    parameter and buffer tensors."""
    for name, child in module.named_children():
        if type(child) in PLAIN_BATCHNORMS:
            replacement = GlobalBatchNorm(
                child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
            )
            for key, tensor in [*child.named_parameters(recurse=False), *child.named_buffers(recurse=False)]:
                setattr(replacement, key, tensor)
            replacement.train(child.training)
            setattr(module, name, replacement)
        else:
            _global_batchnorm(child)
    return module


def _sync_batchnorm(net: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm (Pixel-BERT's CNN and pixel tokens) with the global batch's statistics, as in one process: per-process
    statistics would make the replicas differ. SyncBatchNorm on GPUs, GlobalBatchNorm elsewhere (CPU)."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return net
    if device.type == "cuda":
        from timm.layers import convert_sync_batchnorm

        return convert_sync_batchnorm(net)  # in place below the root: the same parameters, the same state keys
    other = sorted({type(m).__name__ for m in norms if type(m) not in PLAIN_BATCHNORMS})
    if other:
        raise VlbenchError(
            f"this model has BatchNorm layers of type {', '.join(other)}: training it in several processes on "
            f"{device.type} supports plain BatchNorm1d/2d/3d only (on CUDA, SyncBatchNorm takes any)"
        )
    return _global_batchnorm(net)


def export_submitit_tasks() -> None:
    """A submitit job of several tasks (``hydra/launcher=slurm`` with ``tasks_per_node`` = GPUs per node, one process
    per GPU, as ``srun`` starts them): export the variables torchrun would set (RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR, MASTER_PORT), which submitit derives from SLURM's, so that the processes form one group as under
    torchrun. Nothing happens under torchrun or outside a submitit job. Every task keeps all the node's GPUs visible:
    LOCAL_RANK picks its own."""
    if "WORLD_SIZE" in os.environ or not os.environ.get("SUBMITIT_EXECUTOR"):
        return
    from submitit.helpers import TorchDistributedEnvironment

    tasks = TorchDistributedEnvironment()
    if tasks.world_size > 1:
        tasks.export(set_cuda_visible_devices=False)


# DDP must not overwrite buffers with rank 0's at each forward (queues, running statistics are synchronised by their
# own code): the keyword is ``forward_sync_buffers`` since torch 2.14, ``broadcast_buffers`` before (GPU images lag)
NO_BUFFER_BROADCAST = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)


def init_from_env() -> Processes:
    """Join the process group torchrun (or a submitit job of several tasks) describes in the environment (once per
    process); rank 0 of 1 without it."""
    export_submitit_tasks()
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


def parameters_updated_in_forward(net: nn.Module, training_forward: Callable[[], object]) -> list[str]:
    """Parameters that one training forward changes in place (momentum encoders' moving averages, clamped
    temperatures: their version counters move). Under FSDP a forward sees gathered copies of the parameters, so such
    updates would be lost without an error. Weights, buffers and RNG are left as they were."""
    saved = {name: value.detach().clone() for name, value in net.state_dict().items()}
    versions = {name: p._version for name, p in net.named_parameters()}
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        training_forward()
    updated = [name for name, p in net.named_parameters() if p._version != versions[name]]
    net.load_state_dict(saved)
    return updated


def unsharded_replica(net: nn.Module) -> nn.Module:
    """A copy of ``net``'s modules, parameters and buffers taken before sharding, for rank 0 to evaluate and save
    under FSDP; everything else a module refers to (configs, the task, the model context and its generator) is
    shared, not copied."""
    shared = {}
    for module in net.modules():
        for name, value in vars(module).items():
            plain = not isinstance(value, (nn.Module, torch.Tensor, dict, types.MethodType))
            if plain and not name.startswith("_"):
                shared[id(value)] = value
    return copy.deepcopy(net, memo=shared)


def copy_gathered_state(net: nn.Module, replica: nn.Module | None) -> None:
    """Gather each FSDP shard of ``net``'s state into its full tensor, one tensor at a time (a collective: every
    process calls it), and copy it into ``replica`` (rank 0's; the other processes pass None and drop it)."""
    target = replica.state_dict() if replica is not None else {}
    with torch.no_grad():
        for name, value in net.state_dict().items():
            full = _full(value)
            if replica is not None:
                target[name].copy_(full)


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer's ``state_dict`` with sharded state (Adam's moments under FSDP) gathered into full tensors on
    the CPU (a collective): the same format as without FSDP, so a resume reads it either way."""
    state = optimizer.state_dict()
    return {
        **state,
        "state": {
            index: {k: _full(v).cpu() if torch.is_tensor(v) else v for k, v in values.items()}
            for index, values in state["state"].items()
        },
    }


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def sharded_optimizer_state(state: dict, optimizer: torch.optim.Optimizer) -> dict:
    """A full optimizer ``state_dict`` (as saved) made into this process's shards for ``optimizer``, whose parameters
    are sharded: each tensor the shape of its parameter is distributed as the parameter is."""
    params = [p for group in optimizer.param_groups for p in group["params"]]

    def shard(value: object, param: torch.Tensor) -> object:
        if isinstance(param, DTensor) and torch.is_tensor(value) and value.shape == param.shape:
            return distribute_tensor(value.to(param.device), param.device_mesh, param.placements)
        return value

    return {
        **state,
        "state": {
            index: {k: shard(v, params[index]) for k, v in values.items()} for index, values in state["state"].items()
        },
    }
