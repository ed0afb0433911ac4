"""Data parallelism (DDP, gloo on CPU): 2 processes with global batch 8 train exactly as 1 process with batch 8.

What makes the two equal, and what the comparison holds fixed:
- each process loads its contiguous half of every global batch (``EpochShuffleSampler``); DDP averages gradients;
- per-example random draws — MLM masks, ALBEF's ITM hard negatives, LXMERT's mismatched sentences, masked regions and
  sampled QA answers — are drawn for the whole global batch from a generator seeded from (seed, step) alike on every
  process, each keeping its rows (``models/global_batch.py``);
- what reads across examples reads every process's rows: ALBEF's ITC columns and queues, its ITM negatives (token
  states gathered with gradients), LXMERT's mismatched sentences and replacement features; losses averaged over a
  count that varies by process (masked tokens, real regions, answerable questions) divide by the global count;
- held fixed: dropout masks are drawn per process, so they cannot match one process's. The tiny encoders have no
  dropout; the shared VQA head's (``task.head_dropout``) is set to 0 where it is used.
Every tensor of the final checkpoint (weights, momentum encoders, queues) must agree within 1e-5: what is left is float
summation order (~1e-6). With per-process draws instead, ALBEF differs by ~5e-3 after 3 steps.

The 2-process runs start from a forkserver (a clean process: forking pytest itself can deadlock) and join the
process group from torchrun's environment variables, as under torchrun; one test runs the real CLI under
``torch.distributed.run``.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from safetensors.torch import load_file

from tests.conftest import SMALL_WORLD
from tests.test_tasks_end_to_end import SMALL_FORMATS
from vlbench.distributed import Processes, init_from_env
from vlbench.errors import VlbenchError
from vlbench.runner import EpochShuffleSampler, run
from vlbench.tasks.base import EvalContext, Task, shard_bounds

WORLD = 2
TOLERANCE = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_torchrun_starts_it(rank: int, port: int) -> None:
    os.environ.update(
        WORLD_SIZE=str(WORLD), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )


def _worker(rank: int, cfg, run_dir: str, port: int) -> None:
    _as_torchrun_starts_it(rank, port)
    try:
        run(cfg, Path(run_dir))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_in_two_processes(cfg, run_dir: Path) -> None:
    mp.start_processes(_worker, args=(cfg, str(run_dir), free_port()), nprocs=WORLD, start_method="forkserver")


def _cli_worker(rank: int, overrides: list[str], port: int) -> None:
    from vlbench.cli import main

    _as_torchrun_starts_it(rank, port)
    sys.argv = ["vlbench", *overrides]
    main()


def cli_in_two_processes(overrides: list[str], tmp_path: Path, cache_dir: Path, launcher: str) -> str:
    """The CLI in two processes: forked with torchrun's environment, or started by torchrun itself. Its stdout."""
    if launcher == "fork":
        mp.start_processes(_cli_worker, args=(overrides, free_port()), nprocs=WORLD, start_method="forkserver")
        return ""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--master_addr=127.0.0.1"]
    command += [f"--master_port={free_port()}", "-m", "vlbench.cli", *overrides]
    env = {**os.environ, "VLBENCH_CACHE": str(cache_dir), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def assert_same_checkpoints(one: Path, two: Path, tolerance: float = TOLERANCE) -> float:
    """Every tensor of the two runs' last checkpoints within ``tolerance``; the largest difference."""
    a = load_file(one / "checkpoints" / "last.safetensors")
    b = load_file(two / "checkpoints" / "last.safetensors")
    assert a.keys() == b.keys()
    largest = 0.0
    for key in a:
        if a[key].is_floating_point():
            worst = (a[key].double() - b[key].double()).abs().max().item()
            assert worst <= tolerance, f"{key}: differs by {worst:.2e}"
            largest = max(largest, worst)
        else:  # queue pointers, queued image ids
            assert torch.equal(a[key], b[key]), key
    return largest


def train_losses(run_dir: Path) -> dict[int, dict[str, float]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: {k: v for k, v in e.items() if k.startswith("train/")} for e in lines if "train/loss" in e}


def assert_same_losses(one: Path, two: Path, tolerance: float = TOLERANCE) -> None:
    a, b = train_losses(one), train_losses(two)
    assert a.keys() == b.keys() and a
    for step in a:
        assert a[step].keys() == b[step].keys()
        for name, value in a[step].items():
            assert b[step][name] == pytest.approx(value, rel=tolerance, abs=tolerance), (step, name)


def test_albef_pretraining_in_two_processes_equals_one(make_cfg, tmp_path):
    """ITC against gathered momentum features + queue, ITM negatives from the global batch, MLM, distillation."""
    cfg = make_cfg(
        "model=albef", "task=pretrain", *SMALL_FORMATS, "trainer.batch_size=8", "trainer.max_steps=6",
        "trainer.stop_at_step=3",
    )  # fmt: skip
    run(cfg, tmp_path / "one")
    run_in_two_processes(cfg, tmp_path / "two")
    assert_same_checkpoints(tmp_path / "one", tmp_path / "two")
    assert_same_losses(tmp_path / "one", tmp_path / "two")
    state = torch.load(tmp_path / "two" / "checkpoints" / "last.state.pt", weights_only=True)
    assert state["step"] == 3 and not (tmp_path / "two" / "result.json").exists()


def test_lxmert_pretraining_in_two_processes_equals_one(make_cfg, tmp_path):
    """MLM, masked objects, matching and QA; the whole run, evaluated on rank 0 over every example once."""
    cfg = make_cfg("model=lxmert", "task=pretrain", *SMALL_FORMATS, "trainer.batch_size=8", "trainer.max_steps=3")
    one = run(cfg, tmp_path / "one")
    run_in_two_processes(cfg, tmp_path / "two")
    assert_same_checkpoints(tmp_path / "one", tmp_path / "two")
    assert_same_losses(tmp_path / "one", tmp_path / "two")
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert one["num_devices"] == 1 and two["num_devices"] == 2 and two["skipped_steps"] == 0
    assert two["train_samples"] == one["train_samples"] == 3 * 8
    assert two["metrics"] == pytest.approx(one["metrics"], rel=1e-4)
    assert two["val_metrics"] == pytest.approx(one["val_metrics"], rel=1e-4)
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["batch_size"] == 8 and manifest["per_device_batch_size"] == 4 and manifest["num_devices"] == 2


def test_lxmert_sharded_with_fsdp_in_two_processes_equals_one_and_resumes(make_cfg, tmp_path):
    """trainer.fsdp=true: FSDP2 shards (one unit per transformer block + the root) train as one process does; the
    checkpoints are full state dicts (rank 0's unsharded replica, the optimizer's moments gathered), so a sharded
    run stopped at step 2 resumes — sharded again — to one process's step 4, and one process reads them as its own.
    With activation checkpointing too: the blocks recompute under their FSDP unit's gathered parameters."""
    setting = ("model=lxmert", "task=pretrain", *SMALL_FORMATS, "trainer.batch_size=8", "trainer.max_steps=4")
    one = run(make_cfg(*setting), tmp_path / "one")
    sharded = make_cfg(*setting, "trainer.fsdp=true", "trainer.activation_checkpointing=true", "trainer.stop_at_step=2")
    run_in_two_processes(sharded, tmp_path / "two")
    half = load_file(tmp_path / "two" / "checkpoints" / "last.safetensors")
    assert half.keys() == load_file(tmp_path / "one" / "checkpoints" / "last.safetensors").keys()
    moments = torch.load(tmp_path / "two" / "checkpoints" / "last.state.pt", weights_only=True)["optimizer"]["state"]
    shapes = [tuple(v.shape) for v in half.values()]
    assert moments and all(tuple(m["exp_avg"].shape) in shapes for m in moments.values())  # whole, not halves
    run_in_two_processes(make_cfg(*setting, "trainer.fsdp=true", f"resume={tmp_path / 'two'}"), tmp_path / "two")
    assert_same_checkpoints(tmp_path / "one", tmp_path / "two")
    assert_same_losses(tmp_path / "one", tmp_path / "two")
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["num_devices"] == 2 and two["steps"] == 4
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["data_parallel"] == "fsdp" and manifest["per_device_batch_size"] == 4
    assert two["metrics"] == pytest.approx(one["metrics"], rel=1e-4)
    assert two["val_metrics"] == pytest.approx(one["val_metrics"], rel=1e-4)


def _shard_tiny_lxmert(rank: int, port: int, out_dir: str) -> None:
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from tests.models.test_lxmert import tiny_lxmert
    from vlbench.models.layers import transformer_blocks

    _as_torchrun_starts_it(rank, port)
    processes = init_from_env()
    try:
        net = tiny_lxmert()
        whole = {name: p.numel() for name, p in net.named_parameters()}
        blocks = transformer_blocks(net)
        processes.shard(net, torch.device("cpu"), blocks)
        params = dict(net.named_parameters())
        report = {
            "blocks": len(blocks),
            "units": sum(isinstance(m, FSDPModule) for m in net.modules()),
            "names_kept": list(params) == list(whole),
            "all_sharded": all(isinstance(p, DTensor) for p in params.values()),
            "local": sum(p.to_local().numel() for p in params.values()),
            "whole": sum(whole.values()),
        }
        (Path(out_dir) / f"{rank}.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def test_fsdp_makes_each_transformer_block_a_unit_and_halves_the_parameters(tmp_path):
    """Tiny LXMERT: 2 language + 1 object layers and 2 cross layers of 2 BERT layers each = 7 blocks, + the root."""
    mp.start_processes(_shard_tiny_lxmert, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="forkserver")
    reports = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(WORLD)]
    for report in reports:
        assert report["blocks"] == 7 and report["units"] == 8 and report["names_kept"] and report["all_sharded"]
        assert report["local"] < 0.55 * report["whole"]  # dim 0 of each parameter split in two (odd sizes unevenly)
    assert sum(r["local"] for r in reports) == reports[0]["whole"]


def _refused(rank: int, cfg, run_dir: str, port: int, out_dir: str) -> None:
    _as_torchrun_starts_it(rank, port)
    try:
        run(cfg, Path(run_dir))
    except VlbenchError as e:
        (Path(out_dir) / f"{rank}.txt").write_text(str(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_fsdp_refuses_a_model_that_changes_parameters_in_its_forward(make_cfg, tmp_path):
    """ALBEF's momentum encoders move (and its temperature is clamped) inside the forward: under FSDP the forward
    sees gathered copies, so these updates would be lost. One line on every process, before the first step."""
    cfg = make_cfg("model=albef", "task=pretrain", *SMALL_FORMATS, "trainer.batch_size=8", "trainer.fsdp=true")
    args = (cfg, str(tmp_path / "run"), free_port(), str(tmp_path))
    mp.start_processes(_refused, args=args, nprocs=WORLD, start_method="forkserver")
    for rank in range(WORLD):
        assert (tmp_path / f"{rank}.txt").read_text() == (
            "trainer.fsdp=true: model=albef changes parameters inside its forward (model.temp, "
            "model.momentum_model.visual_encoder.cls_token, model.momentum_model.visual_encoder.pos_embed and 138 "
            "more: momentum encoders or clamped temperatures), which FSDP's gathered copies would lose; train it with "
            "trainer.fsdp=false (DDP)"
        )
    assert not train_losses(tmp_path / "run") and not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("launcher", ["fork", pytest.param("torchrun", marks=pytest.mark.slow)])
def test_the_cli_in_two_processes_writes_one_record_equal_to_one_process(make_cfg, tmp_path, cache_dir, launcher):
    """The user's path: `torchrun --nproc_per_node=2 -m vlbench.cli …` (slow: three processes import everything;
    by default the CLI runs forked with torchrun's environment). Both processes agree on one run directory; rank 0
    alone writes it. LXMERT on VQA with the shared head leaves the pre-training heads unused, so DDP looks for
    unused parameters — and leaves their gradients empty (no weight decay), as one process does."""
    setting = ["model=lxmert", "task=vqa", "task.head_dropout=0", "trainer.batch_size=8", "trainer.max_steps=3"]
    one = run(make_cfg(*setting), tmp_path / "one")  # also prepares the data before the processes start
    overrides = [
        *SMALL_WORLD,
        "trainer.eval_batch_size=64",
        "trainer.progress=false",
        "trainer.log_every=1",
        f"data.cache_dir={cache_dir}",
        f"results_dir={tmp_path}/runs",
        *setting,
    ]  # fmt: skip  (make_cfg's, as on the command line)
    stdout = cli_in_two_processes(overrides, tmp_path, cache_dir, launcher)
    run_dirs = [p.parent for p in (tmp_path / "runs").rglob("config.yaml") if p.parent.name != ".hydra"]
    assert len(run_dirs) == 1 and stdout.count("run record:") == (launcher == "torchrun")
    two = run_dirs[0]
    result = json.loads((two / "result.json").read_text())
    assert result["num_devices"] == 2 and result["metrics"] == pytest.approx(one["metrics"], rel=1e-4)
    assert not (two / "failed.json").exists()
    assert yaml.safe_load((two / ".hydra" / "overrides.yaml").read_text()) == overrides  # rank 0's alone
    assert_same_checkpoints(tmp_path / "one", two)
    assert_same_losses(tmp_path / "one", two)


def _diverge(rank: int, port: int, out_dir: str) -> None:
    _as_torchrun_starts_it(rank, port)
    processes = init_from_env()
    try:
        torch.manual_seed(0)
        net = torch.nn.Linear(3, 2)
        processes.check_replicas_agree(net)  # the same everywhere: passes
        with torch.no_grad():
            net.bias[0] += rank * 1e-6
        try:
            processes.check_replicas_agree(net)
        except VlbenchError as e:
            (Path(out_dir) / f"{rank}.txt").write_text(str(e))
    finally:
        dist.destroy_process_group()


def test_replicas_that_diverge_are_caught_at_a_checkpoint(tmp_path):
    """The runner checks every parameter and buffer (momentum encoders, queues) equal across processes before
    writing a checkpoint; one bias off by 1e-6 on one process stops every process."""
    mp.start_processes(_diverge, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="forkserver")
    for rank in range(WORLD):
        assert (tmp_path / f"{rank}.txt").read_text() == "the 2 processes' models diverged (1 tensors: bias)"


def _batch_norm_half(rank: int, port: int, out_dir: str) -> None:
    """Rank r trains its half of one batch through a wrapped BatchNorm stack; saves outputs, gradients, buffers."""
    _as_torchrun_starts_it(rank, port)
    processes = init_from_env()
    try:
        net = _batch_norm_stack()
        wrapped = processes.wrap(net, torch.device("cpu"), False)
        x = _batch_norm_input()[rank * 3 : (rank + 1) * 3]
        out = wrapped(x)
        (out * _batch_norm_weights()[rank * 3 : (rank + 1) * 3]).sum().div(6).mul(WORLD).backward()
        grads = {name: p.grad for name, p in net.named_parameters()}
        torch.save({"out": out.detach(), "grads": grads, "state": net.state_dict()}, Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def _batch_norm_stack() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(2))
    net.append(torch.nn.BatchNorm1d(4, momentum=None))
    return net


def _batch_norm_input() -> torch.Tensor:
    return torch.randn(6, 2, 5, 5, generator=torch.Generator().manual_seed(1)) * 3 + 1


def _batch_norm_weights() -> torch.Tensor:
    return torch.randn(6, 4, 9, generator=torch.Generator().manual_seed(2))


def test_batch_norm_in_two_cpu_processes_normalises_over_the_global_batch(tmp_path):
    """On CPU (gloo; SyncBatchNorm runs on GPUs only) the wrapped model's BatchNorms take their statistics from the
    global batch: two processes with 3 examples each give one process's outputs on all 6, the same gradients (DDP's
    average, the loss being each process's share) and the same running statistics; the state keys stay."""
    mp.start_processes(_batch_norm_half, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="forkserver")
    one = _batch_norm_stack()
    out = one(_batch_norm_input())
    (out * _batch_norm_weights()).sum().div(6).backward()
    halves = [torch.load(tmp_path / f"{rank}.pt", weights_only=True) for rank in range(WORLD)]
    torch.testing.assert_close(torch.cat([h["out"] for h in halves]), out.detach(), rtol=1e-5, atol=1e-5)
    for half in halves:
        assert half["state"].keys() == one.state_dict().keys()
        for name, p in one.named_parameters():
            torch.testing.assert_close(half["grads"][name], p.grad, rtol=1e-5, atol=1e-5)
        for name, value in one.state_dict().items():
            torch.testing.assert_close(half["state"][name], value, rtol=1e-5, atol=1e-5)


def _wrap_batch_norm_subclass(rank: int, port: int, out_dir: str) -> None:
    from timm.layers import BatchNormAct2d

    _as_torchrun_starts_it(rank, port)
    processes = init_from_env()
    try:
        processes.wrap(torch.nn.Sequential(BatchNormAct2d(3)), torch.device("cpu"), False)
    except VlbenchError as e:
        (Path(out_dir) / f"{rank}.txt").write_text(str(e))
    finally:
        dist.destroy_process_group()


def test_batch_norm_variants_are_refused_on_cpu(tmp_path):
    """A BatchNorm subclass with behaviour of its own (timm's BatchNormAct2d) is not silently replaced."""
    args = (free_port(), str(tmp_path))
    mp.start_processes(_wrap_batch_norm_subclass, args=args, nprocs=WORLD, start_method="forkserver")
    expected = (
        "this model has BatchNorm layers of type BatchNormAct2d: training it in several processes on cpu supports "
        "plain BatchNorm1d/2d/3d only (on CUDA, SyncBatchNorm takes any)"
    )
    assert [(tmp_path / f"{rank}.txt").read_text() for rank in range(WORLD)] == [expected] * WORLD  # every process


@pytest.mark.parametrize("parallel", ["trainer.fsdp=false", "trainer.fsdp=true model.channels_last=false"])
def test_pixelbert_in_two_processes_equals_one(make_cfg, tmp_path, parallel):
    """Pixel-BERT's BatchNorms (CNN and pixel tokens) over the global batch: 2 CPU processes train as one — every
    logged loss and gradient norm of 3 steps, the running statistics after the first, the evaluation. (Weights are
    not compared to 1e-5: Adam's first steps move each weight by about ±lr, and elements of the CNN whose gradient is
    rounding noise (~1e-9) take either sign, so a few weights differ by up to 2 lr; with per-process BatchNorm
    statistics the first loss already differs by ~1e-2.) At BERT's init_std 0.02, not the tiny preset's 0.088: the
    wider initialisation amplifies float rounding itself — one process with 1 thread vs 2 differs by 1.6e-5 in step
    1's gradient norm and 5e-4 in step 2's (0.02: bitwise equal) — which would hide a data-parallel error that small."""
    setting = ("model=pixelbert", "model.init_std=0.02", "task=vqa", "task.head_dropout=0", "trainer.batch_size=8")
    setting = (*setting, *parallel.split(), *SMALL_FORMATS)
    for steps in (1, 3):
        cfg = make_cfg(*setting, f"trainer.max_steps={steps}")
        one = run(cfg, tmp_path / f"one{steps}")
        run_in_two_processes(cfg, tmp_path / f"two{steps}")
        assert_same_losses(tmp_path / f"one{steps}", tmp_path / f"two{steps}")
        two = json.loads((tmp_path / f"two{steps}" / "result.json").read_text())
        assert two["num_devices"] == 2 and two["metrics"] == pytest.approx(one["metrics"], rel=1e-4)
    a = load_file(tmp_path / "one1" / "checkpoints" / "last.safetensors")
    b = load_file(tmp_path / "two1" / "checkpoints" / "last.safetensors")
    running = [key for key in a if key.endswith(("running_mean", "running_var"))]
    assert len(running) == 2 * 11  # 10 in the CNN, 1 on the pixel tokens
    for key in running:  # float32 sums over ~8,000 values per channel in another order (~2e-5 relative), passed on
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4)  # through the layers; per-process: ~1e-1


def test_fsdp_refuses_channels_last_parameters_in_one_line():
    """FSDP2 cannot shard a strided (channels-last) convolution weight: named, with the setting that fixes it."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3)).to(memory_format=torch.channels_last)
    with pytest.raises(VlbenchError) as error:
        Processes().shard(net, torch.device("cpu"), [])
    assert str(error.value) == (
        "trainer.fsdp=true: FSDP shards contiguous parameters only, and 0.weight and 1 more is stored channels-last; "
        "set model.channels_last=false"
    )


def test_each_process_takes_its_contiguous_part_of_every_global_batch():
    one = list(EpochShuffleSampler(23, seed=5, epoch=2, start=4))
    parts = [
        list(EpochShuffleSampler(23, seed=5, epoch=2, start=4, batch_size=6, rank=r, world_size=3)) for r in range(3)
    ]
    assert all(len(p) == 3 * 2 == len(EpochShuffleSampler(23, 5, 2, 4, 6, r, 3)) for r, p in enumerate(parts))
    for batch in range(3):  # 19 examples from position 4: 3 whole global batches of 6, the 19th dropped
        assert sum((p[batch * 2 : batch * 2 + 2] for p in parts), []) == one[batch * 6 : batch * 6 + 6]


def test_the_global_batch_must_divide_over_the_processes():
    assert Processes(rank=1, world_size=4).local_batch_size(32) == 8
    with pytest.raises(VlbenchError, match=r"trainer.batch_size=30 is the global batch: .* over the 4 processes"):
        Processes(rank=1, world_size=4).local_batch_size(30)


def test_evaluation_shards_cover_every_example_once():
    """Contiguous shards in rank order: concatenated, they are the split (uneven sizes at the tail, no padding)."""
    for size in range(8):
        for world_size in range(1, 4):
            bounds = [shard_bounds(size, rank, world_size) for rank in range(world_size)]
            assert [i for start, end in bounds for i in range(start, end)] == list(range(size))
            assert max(end - start for start, end in bounds) - min(end - start for start, end in bounds) <= 1


class _Indices(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 7

    def __getitem__(self, i: int) -> int:
        return i

    def collate(self, items: list[int]) -> dict[str, torch.Tensor]:
        return {"index": torch.tensor(items)}


class _EchoTask(Task):
    def __init__(self):
        self.data = _Indices()

    def dataset(self, split: str) -> torch.utils.data.Dataset:
        return self.data

    def predict(self, outputs: torch.Tensor, batch, split: str) -> list[dict]:
        return [{"index": i} for i in outputs.long().tolist()]


def test_each_process_predicts_its_shard_and_rank_0_returns_the_split_in_order():
    """Task.predict_split with 3 processes over 7 examples (shards of 2, 2 and 3, batches of 2), the gather faked."""
    task, shards = _EchoTask(), {}

    def context(rank: int) -> EvalContext:
        def gather(part: list) -> list[list] | None:
            shards[rank] = part
            return [shards[r] for r in range(3)] if rank == 0 else None

        return EvalContext(torch.device("cpu"), batch_size=2, rank=rank, world_size=3, gather=gather)

    def net(batch):
        return batch["index"].float()

    contexts = {rank: context(rank) for rank in (2, 1, 0)}  # rank 0 last: the others' parts are there
    results = {rank: task.predict_split(net, "val", ctx) for rank, ctx in contexts.items()}
    assert results[1] == results[2] == [] and [p["index"] for p in results[0]] == list(range(7))
    assert [[p["index"] for p in shards[r]] for r in range(3)] == [[0, 1], [2, 3], [4, 5, 6]]
    ctx = contexts[2]
    assert ctx.shard(task.data) is ctx.shard(task.data) and ctx.loader(ctx.shard(task.data)) is ctx.loader(
        ctx.shard(task.data)
    )


def test_sharded_evaluation_in_two_processes_equals_one(make_cfg, tmp_path):
    """Each process predicts its contiguous shard of the validation and test splits (21 and 27 questions: shards of
    unequal size, several batches of 4 each), rank 0 gathers them: the same prediction files, validation log and
    metrics as one process, with validation during training (eval_every) and the best checkpoint reloaded."""
    setting = [
        "model=textonly", "task=vqa", "task.head_dropout=0", "data.images.val=7", "data.images.test=9",
        "trainer.batch_size=8", "trainer.max_steps=4", "trainer.eval_every=1", "trainer.eval_batch_size=4",
    ]  # fmt: skip
    one = run(make_cfg(*setting), tmp_path / "one")
    run_in_two_processes(make_cfg(*setting), tmp_path / "two")
    two = json.loads((tmp_path / "two" / "result.json").read_text())
    assert two["num_devices"] == 2 and two["checkpoint"] == one["checkpoint"]
    assert two["metrics"] == pytest.approx(one["metrics"], rel=1e-4)
    assert two["val_metrics"] == pytest.approx(one["val_metrics"], rel=1e-4)
    for split, size in (("val", 21), ("test", 27)):
        predictions = json.loads((tmp_path / "two" / f"predictions_{split}.json").read_text())
        assert len(predictions) == size and len({p["question_id"] for p in predictions}) == size
        assert predictions == json.loads((tmp_path / "one" / f"predictions_{split}.json").read_text())

    def validations(run_dir: Path) -> dict[int, dict[str, float]]:
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return {e["step"]: {k: v for k, v in e.items() if k.startswith("val/")} for e in lines if "val/accuracy" in e}

    logged_one, logged_two = validations(tmp_path / "one"), validations(tmp_path / "two")
    assert logged_two.keys() == logged_one.keys() and len(logged_one) >= 4  # steps 1-3 and the final validation
    for step, values in logged_one.items():
        assert logged_two[step] == pytest.approx(values, rel=1e-4), step


def test_a_submitit_job_of_two_tasks_is_one_process_group_equal_to_one_process(make_cfg, tmp_path, cache_dir):
    """hydra/launcher=slurm with tasks_per_node=2 (one process per GPU, as srun starts them), here through its twin,
    submitit's local executor: the tasks join one group from the variables submitit exports and train as one process
    does (textonly without dropout: the global batch split over the two)."""
    from tests.test_cli import vlbench

    setting = ["model=textonly", "task.head_dropout=0", "trainer.batch_size=8", "trainer.max_steps=3"]
    one = run(make_cfg(*setting), tmp_path / "one")
    proc = vlbench(
        "-m",
        "hydra/launcher=local_submitit",
        "hydra.launcher.tasks_per_node=2",
        f"hydra.sweep.dir={tmp_path}/sweep",
        *SMALL_WORLD,
        "trainer.eval_batch_size=64",
        "trainer.progress=false",
        "trainer.log_every=1",
        *setting,
        cwd=tmp_path,
        cache=cache_dir,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = (tmp_path / "sweep").rglob("result.json")
    two = json.loads(result.read_text())
    assert two["num_devices"] == 2 and two["metrics"] == pytest.approx(one["metrics"], rel=1e-4)
    assert_same_losses(tmp_path / "one", result.parent)
    assert_same_checkpoints(tmp_path / "one", result.parent)
