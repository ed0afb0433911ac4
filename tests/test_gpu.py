"""Checks that need CUDA (`make device-check` on a GPU machine; skipped elsewhere, so CI reports them as skipped).

- fp32 training on one GPU follows the CPU: the runner draws its per-example randomness (masks, negatives) on the CPU
  whatever the device and the tiny presets have no dropout, so only the kernels' rounding differs. TF32 is switched
  off for the comparison (cuBLAS and cuDNN), otherwise every matmul rounds to 10 mantissa bits.
- bf16 autocast (the CUDA default, ``trainer.precision=auto``) trains: finite losses, no skipped steps, a first loss
  close to fp32's yet not equal to it (autocast is really on), and a falling loss.
- NCCL: two processes on two GPUs train as one GPU does (skipped on a machine with one GPU: NCCL cannot put two
  ranks on one device). On one GPU the data-parallel check is the comparison with the CPU instead: two gloo processes
  (each half of the global batch, gathered ITC and queues, global-batch negatives) train as the one GPU does.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.test_distributed import (
    _as_torchrun_starts_it,
    assert_same_checkpoints,
    assert_same_losses,
    free_port,
    run_in_two_processes,
    train_losses,
)
from tests.test_tasks_end_to_end import SMALL_FORMATS
from vlbench.runner import run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

# fp32 on the GPU vs the CPU: the same arithmetic in another summation order (~1e-6 per op), through 3 AdamW steps
GPU_CPU_TOLERANCE = 1e-4


def _no_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


@pytest.fixture
def exact_fp32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    _no_tf32()
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _pretraining(make_cfg, model: str, device: str, precision: str = "fp32", steps: int = 3):
    return make_cfg(
        f"model={model}", "task=pretrain", *SMALL_FORMATS, "trainer.batch_size=8", f"trainer.max_steps={steps}",
        f"trainer.device={device}", f"trainer.precision={precision}",
    )  # fmt: skip


@pytest.mark.parametrize("model", ["albef", "lxmert"])
def test_fp32_training_on_one_gpu_follows_the_cpu(make_cfg, tmp_path, exact_fp32, model):
    """ALBEF (ITC with its queue, momentum distillation, ITM hard negatives, MLM) and LXMERT (MLM, masked objects,
    matching, QA) for 3 steps: weights, queues and every logged loss as on the CPU."""
    cpu = run(_pretraining(make_cfg, model, "cpu"), tmp_path / "cpu")
    gpu = run(_pretraining(make_cfg, model, "cuda"), tmp_path / "gpu")
    manifest = json.loads((tmp_path / "gpu" / "manifest.json").read_text())
    assert manifest["device"] == torch.cuda.get_device_name() and manifest["precision"] == "fp32"
    worst = assert_same_checkpoints(tmp_path / "cpu", tmp_path / "gpu", tolerance=GPU_CPU_TOLERANCE)
    print(f"{model}: GPU vs CPU weights differ by at most {worst:.2e}")
    assert_same_losses(tmp_path / "cpu", tmp_path / "gpu", tolerance=GPU_CPU_TOLERANCE)
    assert gpu["metrics"] == pytest.approx(cpu["metrics"], rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("model", ["albef", "lxmert", "unimo3", "pixelbert"])
def test_bf16_autocast_trains_on_the_gpu(make_cfg, tmp_path, exact_fp32, model):
    steps = 30
    run(_pretraining(make_cfg, model, "cuda", "fp32", steps=1), tmp_path / "fp32")
    result = run(_pretraining(make_cfg, model, "cuda", "auto", steps=steps), tmp_path / "bf16")
    assert result["skipped_steps"] == 0
    losses = {step: entry["train/loss"] for step, entry in train_losses(tmp_path / "bf16").items()}
    assert len(losses) == steps and all(math.isfinite(v) for v in losses.values())
    first_fp32 = train_losses(tmp_path / "fp32")[1]["train/loss"]
    assert losses[1] == pytest.approx(first_fp32, rel=0.02) and losses[1] != first_fp32
    ordered = [losses[s] for s in sorted(losses)]
    assert sum(ordered[-5:]) / 5 < sum(ordered[:5]) / 5, ordered


def _nccl_worker(rank: int, cfg, run_dir: str, port: int) -> None:
    _as_torchrun_starts_it(rank, port)
    _no_tf32()
    try:
        run(cfg, Path(run_dir))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL between processes needs 2 GPUs")
@pytest.mark.parametrize("model", ["albef", "lxmert"])
def test_two_gpus_with_nccl_train_as_one_gpu(make_cfg, tmp_path, exact_fp32, model):
    cfg = _pretraining(make_cfg, model, "cuda")
    run(cfg, tmp_path / "one")
    mp.start_processes(_nccl_worker, args=(cfg, str(tmp_path / "two"), free_port()), nprocs=2, start_method="spawn")
    result = json.loads((tmp_path / "two" / "result.json").read_text())
    assert result["num_devices"] == 2
    worst = assert_same_checkpoints(tmp_path / "one", tmp_path / "two", tolerance=GPU_CPU_TOLERANCE)
    print(f"{model}: 2 GPUs (NCCL) vs 1 GPU weights differ by at most {worst:.2e}")
    assert_same_losses(tmp_path / "one", tmp_path / "two", tolerance=GPU_CPU_TOLERANCE)


@pytest.mark.parametrize("model", ["albef", "lxmert"])
def test_two_cpu_processes_over_gloo_train_as_one_gpu(make_cfg, tmp_path, exact_fp32, model):
    """The data-parallel path against the GPU's kernels: the same global batch split over two CPU processes."""
    gpu = run(_pretraining(make_cfg, model, "cuda"), tmp_path / "gpu")
    run_in_two_processes(_pretraining(make_cfg, model, "cpu"), tmp_path / "gloo")
    two = json.loads((tmp_path / "gloo" / "result.json").read_text())
    assert two["num_devices"] == 2 and gpu["num_devices"] == 1
    worst = assert_same_checkpoints(tmp_path / "gpu", tmp_path / "gloo", tolerance=GPU_CPU_TOLERANCE)
    print(f"{model}: 2 CPU processes (gloo) vs 1 GPU weights differ by at most {worst:.2e}")
    assert_same_losses(tmp_path / "gpu", tmp_path / "gloo", tolerance=GPU_CPU_TOLERANCE)
