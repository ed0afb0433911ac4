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


def assert_same_checkpoints(one: Path, two: Path) -> None:
    a = load_file(one / "checkpoints" / "last.safetensors")
    b = load_file(two / "checkpoints" / "last.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        if a[key].is_floating_point():
            worst = (a[key].double() - b[key].double()).abs().max().item()
            assert worst <= TOLERANCE, f"{key}: differs by {worst:.2e}"
        else:  # queue pointers, queued image ids
            assert torch.equal(a[key], b[key]), key


def train_losses(run_dir: Path) -> dict[int, dict[str, float]]:
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: {k: v for k, v in e.items() if k.startswith("train/")} for e in lines if "train/loss" in e}


def assert_same_losses(one: Path, two: Path) -> None:
    a, b = train_losses(one), train_losses(two)
    assert a.keys() == b.keys() and a
    for step in a:
        assert a[step].keys() == b[step].keys()
        for name, value in a[step].items():
            assert b[step][name] == pytest.approx(value, rel=TOLERANCE, abs=TOLERANCE), (step, name)


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


def _wrap_batch_norm(rank: int, port: int, out_dir: str) -> None:
    _as_torchrun_starts_it(rank, port)
    processes = init_from_env()
    try:
        processes.wrap(torch.nn.Sequential(torch.nn.BatchNorm1d(3)), torch.device("cpu"), False)
    except VlbenchError as e:
        (Path(out_dir) / f"{rank}.txt").write_text(str(e))
    finally:
        dist.destroy_process_group()


def test_batch_norm_models_need_cuda_to_train_in_several_processes(tmp_path):
    """Per-process BatchNorm statistics would make the replicas differ; SyncBatchNorm exists on GPUs only."""
    mp.start_processes(_wrap_batch_norm, args=(free_port(), str(tmp_path)), nprocs=WORLD, start_method="forkserver")
    message = (tmp_path / "0.txt").read_text()
    assert message == "this model has BatchNorm layers: training it in several processes needs CUDA (SyncBatchNorm)"


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
