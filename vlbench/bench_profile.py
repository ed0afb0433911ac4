"""Where a training step's time goes, by kind of work: the `--profile` part of `vlbench-bench models`.

MFU says how far a step is from the device's peak, not why. One more profiled run of the same step splits it: the
device's busy time (on CUDA: the kernels' own time, summed; on the CPU: the ops' self time) against the step's wall
time — a step whose kernels fill only part of its wall time waits on the host (Python, kernel launches, host
synchronisations), one whose kernels fill it is bound by the kernels themselves — and that busy time by kind (matrix
products, attention, convolutions, normalisation, the optimizer, the rest: element-wise work and copies), with the
ops that cost most, the number of kernel launches and of host synchronisations per step.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable

import torch

# aten op (the profiler's key) → kind of work; an op not named here is "other" (element-wise, copies, reductions)
OP_KINDS = {
    "gemm": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_scaled_mm", "aten::addmv"),
    "attention": ("scaled_dot_product", "flash_attention", "efficient_attention", "cudnn_attention"),
    "convolution": ("convolution", "cudnn_convolution", "mkldnn_convolution", "conv2d", "conv_depthwise"),
    "normalisation": ("layer_norm", "batch_norm", "group_norm"),
    "optimizer": ("_fused_adam", "_foreach_", "adamw"),
}
# CUDA kernel name → kind of work (cuBLAS/CUTLASS GEMMs, flash/memory-efficient attention, cuDNN convolutions, ...)
# (checked in this order: cuDNN's attention kernels carry "sm90" and "cudnn" in their names too)
KERNEL_KINDS = {
    "attention": ("flash", "fmha", "attention", "attn", "sdpa"),
    "optimizer": ("adam", "multi_tensor_apply"),
    "normalisation": ("layer_norm", "layernorm", "batch_norm", "batchnorm", "welford", "gammabeta", "norm_"),
    "convolution": ("conv", "implicit_", "dgrad", "wgrad", "cudnn"),
    "gemm": ("gemm", "nvjet", "cutlass", "xmma", "cublas", "sm90_", "sm80_", "ampere_", "hopper"),
}
# host waits on the device: an explicit synchronisation, or reading a device value (.item(), boolean indexing)
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense")
KERNEL_NAME_CHARS = 90  # C++ template names run to thousands of characters; the head names the kernel
LAUNCH_EVENTS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def kind_of(op: str, table: dict[str, tuple[str, ...]] = OP_KINDS) -> str:
    name = op.lower()
    return next((kind for kind, parts in table.items() if any(p.lower() in name for p in parts)), "other")


def device_busy(prof, steps: int) -> dict[str, float] | None:
    """Milliseconds a step per CUDA kernel name (memory copies and sets included), from the profiler's device-side
    events; None where this torch lists none (then the ops' self device time stands in)."""
    from torch.autograd import DeviceType

    per_kernel: dict[str, float] = {}
    for event in prof.events():
        if event.device_type == DeviceType.CUDA:
            name = event.name[:KERNEL_NAME_CHARS]
            per_kernel[name] = per_kernel.get(name, 0.0) + event.time_range.elapsed_us() / steps / 1e3
    return per_kernel or None


def profile_step(step: Callable[[], object], device: torch.device, steps: int = 2, top: int = 10) -> dict:
    """``steps`` training steps under ``torch.profiler``: per step, the wall and busy milliseconds, busy ms by kind,
    the ``top`` ops by busy time, kernel launches and host synchronisations."""
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    if on_cuda:
        torch.cuda.synchronize(device)
    else:  # kineto's tracer logs a failed GPU query on every CPU-only profile: noise under the table
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Warning: Profiler clears events")  # one cycle: nothing is lost
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                step()
            if on_cuda:
                torch.cuda.synchronize(device)
            wall = time.perf_counter() - start
    return summarise_profile(prof.key_averages(), device_busy(prof, steps) if on_cuda else None, steps, wall, top)


def summarise_profile(averages, kernels: dict[str, float] | None, steps: int, wall_s: float, top: int = 10) -> dict:
    """The figures ``profile_step`` reports, from the profiler's per-op averages and (on CUDA) ``device_busy``'s
    per-kernel milliseconds; the device is CUDA when ``kernels`` is given."""
    on_cuda = kernels is not None

    def busy_us(event) -> float:
        return event.self_device_time_total if on_cuda else event.self_cpu_time_total

    # the ops (aten::…) by the device time of the kernels they launched: which op a costly kernel serves
    kernel_names = kernels or {}
    per_op = {
        e.key: busy_us(e) / steps / 1e3
        for e in averages
        if busy_us(e) > 0 and e.key[:KERNEL_NAME_CHARS] not in kernel_names
    }
    if kernels:
        per_item, table, measure = kernels, KERNEL_KINDS, "CUDA kernels' own time"
    else:
        per_item, table = per_op, OP_KINDS
        measure = "ops' self device time" if on_cuda else "ops' self CPU time"
    by_kind: dict[str, float] = {}
    for name, ms in per_item.items():
        by_kind[kind_of(name, table)] = by_kind.get(kind_of(name, table), 0.0) + ms
    busy = sum(per_item.values())
    counts = {e.key: e.count for e in averages}
    wall_ms = wall_s / steps * 1e3
    return {
        "device_busy_measure": measure,
        "wall_ms": wall_ms,
        "busy_ms": busy,
        "busy_share": busy / wall_ms,
        "kinds_ms": dict(sorted(by_kind.items(), key=lambda kv: -kv[1])),
        "top_ops_ms": dict(sorted(per_op.items(), key=lambda kv: -kv[1])[:top]),
        "top_kernels_ms": dict(sorted(kernels.items(), key=lambda kv: -kv[1])[:top]) if kernels else None,
        "kernel_launches": sum(counts.get(name, 0) for name in LAUNCH_EVENTS) / steps if on_cuda else None,
        # on the CPU a value read is no wait: counted on CUDA only
        "host_syncs": sum(counts.get(name, 0) for name in SYNC_EVENTS) / steps if on_cuda else None,
    }


def format_profile(model: str, scale: str, profile: dict) -> str:
    """A few lines per model under the bench table."""
    if "error" in profile:
        return f"{model} {scale}: profile failed: {profile['error']}"
    waits = (
        ""
        if profile["host_syncs"] is None
        else f", {profile['kernel_launches']:.0f} kernel launches, {profile['host_syncs']:.0f} host syncs a step"
    )
    lines = [
        f"{model} {scale}: {profile['wall_ms']:.1f} ms a step, busy {profile['busy_ms']:.1f} ms "
        f"({profile['busy_share']:.0%}; {profile['device_busy_measure']}){waits}",
        "  by kind: " + ", ".join(f"{k} {ms:.1f} ms" for k, ms in profile["kinds_ms"].items()),
        "  top ops (ms): " + ", ".join(f"{op} {ms:.1f}" for op, ms in profile["top_ops_ms"].items()),
    ]
    if profile.get("top_kernels_ms"):
        lines.append("  top kernels (ms): " + "; ".join(f"{k} {ms:.1f}" for k, ms in profile["top_kernels_ms"].items()))
    return "\n".join(lines)
