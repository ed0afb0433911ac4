"""`vlbench-bench models`: every model × scale measured against the machine's own limit, in one command.

For each model × scale (on one task and head, default VQA with each model's default head), in a fresh process so
that peak memory is the model's own: training-step samples/s (forward + loss + backward + gradient clipping + AdamW,
as the runner does; the median of ``--steps`` timed steps after ``--warmup``, on batches loaded beforehand),
evaluation samples/s (forward without gradients), peak memory (CPU: the process's maximum resident set; CUDA: maximum
allocated), parameter count, FLOPs per training sample (counted by ``torch.utils.flop_counter`` over one training
step: matmuls, convolutions and attention — element-wise ops are not counted), the achieved FLOP/s, and
**utilisation = achieved FLOP/s ÷ the machine's dense matmul FLOP/s in the same dtype**, measured by this command with
a large GEMM at the same thread count. On CUDA, MFU against the device's nominal peak where we know it. Beside the
training rate, the data loader's samples/s with the default worker count (``trainer.num_workers``), and the training
step with every attention layer eager (softmax(QKᵀ/√d)V in explicit matmuls) instead of SDPA — SDPA's gain. With
``--compile``, the training step compiled as ``trainer.compile=true`` compiles it (torch.compile, default mode, of
each transformer block or of the whole forward: ``trainer.compile_scope``): its steady-state samples/s, the ratio to
eager, and the compilation time (reported apart: the extra time of the compiled warm-up steps over as many steady
ones, recompilation for new text lengths included).
LXMERT also gets its reference row: transformers' ``LxmertForPreTraining`` vs ours (``vlbench-bench lxmert``).
``--profile``: two more training steps under the profiler, split by kind of work (``vlbench.bench_profile``).

Output: a table, a JSON file (``--json``), and one line per run appended to a history file (``--history``) with the
git sha and device, so that speed regressions show over time. Positional arguments are Hydra overrides applied to
every model (e.g. ``trainer.batch_size=8 data.image_size=256``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

# bf16 dense peak per device (FLOP/s), from the vendors' data sheets: MFU is reported where the device is known
NOMINAL_BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "4090": 165e12}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """The machine's dense matmul rate: the fastest of ``repeats`` (size × size) @ (size × size) products — the rate
    this machine can reach, so that utilisation is not flattered by a product slowed by another process."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up (thread pools, kernels)
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)


def use_threads(count: int) -> None:
    """``count`` torch CPU threads here and in the processes this bench starts (0: torch's default).

    ``torch.set_num_threads(n)`` with n > 1 in a running process — even with the count it already has — leaves torch's
    CPU flash-attention kernel ~2.7× slower at tiny shapes (64 × 4 heads × 17 tokens, forward + backward: 1.14 →
    3.08 ms at 2 threads; GEMMs unaffected), while a process started with ``OMP_NUM_THREADS=n`` runs it at full speed,
    as every run of the runner does. So the count goes into the environment (spawned model benches start with it) and
    is set here only when it differs; ``main`` restarts the console command with it (``restart_with_threads``).
    """
    if not count:
        return
    os.environ["OMP_NUM_THREADS"] = str(count)
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


def restart_with_threads(count: int) -> None:
    """Start the console command again with ``OMP_NUM_THREADS=count`` when this process runs another count (see
    ``use_threads``); once only."""
    if not count or torch.get_num_threads() == count or os.environ.get("VLBENCH_BENCH_RESTARTED"):
        return
    os.environ.update(OMP_NUM_THREADS=str(count), VLBENCH_BENCH_RESTARTED="1")
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "vlbench.bench", *sys.argv[1:]])


def nominal_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    if device.type != "cuda" or dtype != torch.bfloat16:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in NOMINAL_BF16_PEAK.items() if key in name), None)


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _median_seconds(step: Callable[[], object], count: int, device: torch.device) -> float:
    times = []
    for _ in range(count):
        start = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compose_config(model: str, scale: str, task: str, overrides: list[str]):
    from hydra import compose, initialize_config_module

    import vlbench.cli  # noqa: F401  (registers schemas and resolvers, as the app does)

    with initialize_config_module(config_module="vlbench.conf", version_base="1.3"):
        return compose(config_name="config", overrides=[f"model={model}", f"scale={scale}", f"task={task}", *overrides])


def build_for_bench(cfg, device: torch.device):
    """Task, training set and the task model (model + head) as the runner builds them, without a run directory."""
    import vlbench.models  # noqa: F401
    import vlbench.tasks  # noqa: F401
    from vlbench.data.sources import resolve_data_root
    from vlbench.data.text import load_tokenizer
    from vlbench.models.base import ModelContext
    from vlbench.registry import MODELS, TASKS
    from vlbench.runner import TaskModel

    model_cls, task_cls = MODELS.get(cfg.model.name), TASKS.get(cfg.task.name)
    root = resolve_data_root(cfg.data, task_cls.data_format)
    tokenizer = load_tokenizer(cfg.data.tokenizer, root)
    task = task_cls(cfg.task, cfg.data, root, tokenizer, model_cls.visual_input)
    task.configure_for_model(model_cls)
    train_set = task.dataset("train")
    steps_per_epoch = max(1, len(train_set) // cfg.trainer.batch_size)
    ctx = ModelContext.for_tokenizer(
        tokenizer, cfg.data.image_size, num_groups=task.num_groups, steps_per_epoch=steps_per_epoch
    )
    model = model_cls(cfg.model, ctx)
    model.skip_unread_states = cfg.trainer.skip_unread_states  # as a run does
    if cfg.head == "native":
        head = model.native_head(task.head_kind, task.num_outputs, **task.native_head_inputs())
        if head is None:
            raise SystemExit(f"head=native: {cfg.model.name} has no native head for {task.name}")
    else:
        head = task.build_shared_head(model.hidden_size)
    return task, train_set, TaskModel(model, head, task).to(device)


def fit_region_features(batch: dict, dim: int | None, boxes: int) -> dict:
    """A region batch in the shape a model configured for BUTD features reads: the synthetic world's store holds
    147-d features of 2-5 boxes, a base-scale region model reads 36 × 2048-d. When the sizes differ, the store's
    features are zero-padded to ``dim`` and the boxes to ``boxes`` (masked), so the bench times the model as
    configured, at the standard region count."""
    if not dim or "region_features" not in batch or batch["region_features"].shape[-1] >= dim:
        return batch
    fitted = dict(batch)
    for key, value in batch.items():
        if key.startswith("region_"):
            extra = boxes - value.shape[1]
            pad = (0, 0, 0, extra) if value.ndim == 3 else (0, extra)
            fill = -1 if value.dtype == torch.long else 0
            fitted[key] = torch.nn.functional.pad(value, pad, value=fill) if extra > 0 else value
    for key, value in list(fitted.items()):
        if key.startswith("region_features"):
            fitted[key] = torch.nn.functional.pad(value, (0, dim - value.shape[-1]))
    return fitted


def bench_one(model_name: str, scale: str, args: argparse.Namespace) -> dict:
    """All figures of one model × scale (run in its own process)."""
    from torch.utils.data import DataLoader
    from torch.utils.flop_counter import FlopCounterMode

    from vlbench.bench_profile import profile_step
    from vlbench.host_memory import keep_freed_memory
    from vlbench.models.layers import attention_implementation
    from vlbench.runner import (
        EpochShuffleSampler,
        autocast_context,
        build_optimizer,
        compile_for_training,
        pick_device,
        seed_everything,
    )
    from vlbench.tasks.base import to_device

    use_threads(args.threads)
    cfg = compose_config(model_name, scale, args.task, [f"trainer.device={args.device}", *args.overrides])
    device = pick_device(cfg.trainer.device)
    kept_blocks = keep_freed_memory() if cfg.trainer.keep_freed_memory else 0  # as a run does (vlbench/host_memory.py)
    seed_everything(cfg.seed)
    task, train_set, net = build_for_bench(cfg, device)
    tcfg = cfg.trainer
    batch_size = tcfg.batch_size
    needed = args.warmup + args.steps

    # the loader alone, as the runner builds it with its default workers (persistent when there are any): a first
    # pass (cold: files decoded, worker start-up) and a second over the same examples (steady state: the synthetic
    # world's decoded images are cached in memory, in the same workers)
    loader = DataLoader(
        train_set,
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(train_set), cfg.seed),
        drop_last=True,
        collate_fn=train_set.collate,
        num_workers=tcfg.num_workers,
        persistent_workers=tcfg.num_workers > 0,
        pin_memory=device.type == "cuda",
    )
    load_batches = max(needed, args.loader_batches)

    def load_pass() -> tuple[list, float]:
        start, loaded = time.perf_counter(), []
        for batch in loader:
            loaded.append(batch)
            if len(loaded) == load_batches:
                break
        return loaded, len(loaded) * batch_size / (time.perf_counter() - start)

    _, loader_cold_rate = load_pass()
    batches, loader_rate = load_pass()
    fit = {"dim": cfg.model.get("visual_feature_dim"), "boxes": cfg.data.datasets[task.data_format].max_regions}
    batches = [to_device(fit_region_features(b, **fit), device) for b in batches[:needed]]
    while len(batches) < needed:  # a tiny training split: cycle
        batches.append(batches[len(batches) % max(1, len(batches))])

    optimizer = build_optimizer(net, tcfg)
    position = iter(range(10**9))

    def train_step(forward: torch.nn.Module = net) -> None:
        batch = batches[next(position) % len(batches)]
        with autocast_context(device, tcfg.precision):
            outputs = forward(batch)
            loss = task.loss(outputs, batch)
        if loss.requires_grad:
            loss.backward()
        if optimizer:
            if tcfg.clip_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), tcfg.clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    net.train()
    with FlopCounterMode(display=False) as counter:
        train_step()
    flops_per_step = counter.get_total_flops()
    for _ in range(args.warmup):
        train_step()
    train_seconds = _median_seconds(train_step, args.steps, device)
    profile = None
    if getattr(args, "profile", False):
        try:
            profile = profile_step(train_step, device)
        except Exception as e:  # the profile is a diagnosis: its failure costs no measured figure
            profile = {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
    eager_seconds = None
    if args.eager_steps:
        with attention_implementation("eager", net):
            train_step()  # warm-up of the eager path
            eager_seconds = _median_seconds(train_step, args.eager_steps, device)
    compiled_seconds = compile_seconds = None
    if getattr(args, "compile", False):
        compiled = compile_for_training(net, tcfg.compile_scope)

        def compiled_step() -> None:
            train_step(compiled)

        # the first step compiles; a batch of another text length recompiles once (the length becomes dynamic)
        warmup_seconds = [_median_seconds(compiled_step, 1, device) for _ in range(args.warmup + 1)]
        compiled_seconds = _median_seconds(compiled_step, args.steps, device)
        compile_seconds = sum(warmup_seconds) - len(warmup_seconds) * compiled_seconds

    net.eval()
    eval_batch = batches[0]

    def eval_step() -> None:
        with torch.no_grad(), autocast_context(device, tcfg.precision):
            net(eval_batch)

    eval_step()
    eval_seconds = _median_seconds(eval_step, args.steps, device)

    dtype = torch.bfloat16 if (device.type == "cuda" and tcfg.precision in ("auto", "bf16")) else torch.float32
    achieved = flops_per_step / train_seconds
    return {
        "model": model_name,
        "scale": scale,
        "task": task.name,
        "head": cfg.head,
        "batch_size": batch_size,
        "image_size": cfg.data.image_size,
        "dtype": str(dtype).replace("torch.", ""),
        "params": sum(p.numel() for p in net.parameters()),
        "train_samples_per_s": batch_size / train_seconds,
        "eval_samples_per_s": batch_size / eval_seconds,
        "loader_samples_per_s": loader_rate,
        "loader_cold_samples_per_s": loader_cold_rate,
        "loader_workers": tcfg.num_workers,
        "flops_per_sample": flops_per_step / batch_size,
        "flops_counted_by": "torch.utils.flop_counter (matmul, conv, attention; one training step)",
        "achieved_flops": achieved,
        "eager_attention_samples_per_s": batch_size / eager_seconds if eager_seconds else None,
        "compiled_train_samples_per_s": batch_size / compiled_seconds if compiled_seconds else None,
        "compile_speedup": train_seconds / compiled_seconds if compiled_seconds else None,
        "compile_s": compile_seconds,
        "peak_memory_mb": peak_memory_mb(device),
        "freed_blocks_kept_up_to_mib": kept_blocks >> 20,  # 0: malloc's defaults (trainer.keep_freed_memory)
        "profile": profile,
    }


def _child(model_name: str, scale: str, args: argparse.Namespace, queue, start_method: str | None = None) -> None:
    if start_method:  # loader workers start as the runner's would (a spawned child's default is spawn: re-imports)
        multiprocessing.set_start_method(start_method, force=True)
    try:
        queue.put(bench_one(model_name, scale, args))
    except BaseException as e:  # reported as a failed row, the other models still run
        queue.put({"model": model_name, "scale": scale, "error": f"{type(e).__name__}: {e}".splitlines()[0]})


def run_isolated(model_name: str, scale: str, args: argparse.Namespace) -> dict:
    """``bench_one`` in a fresh process: its peak memory is this model's alone."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(model_name, scale, args, queue, multiprocessing.get_start_method()))
    process.start()
    row = queue.get()
    process.join()
    return row


def format_table(rows: list[dict], matmul_flops: float, peak: float | None) -> str:
    compiled = any(r.get("compiled_train_samples_per_s") for r in rows)
    header = (
        f"{'model':<10}{'scale':<6}{'train/s':>9}{'eval/s':>9}{'loader/s':>10}{'load×':>7}{'GFLOP/sample':>13}"
        f"{'GFLOP/s':>9}{'util':>7}{'eager/s':>9}{'SDPA×':>7}{'MB':>8}{'params':>12}"
        + (f"{'compiled/s':>11}{'comp×':>7}{'compile s':>10}" if compiled else "")
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:<10}{r['scale']:<6}failed: {r['error']}")
            continue
        eager = r["eager_attention_samples_per_s"]
        lines.append(
            f"{r['model']:<10}{r['scale']:<6}{r['train_samples_per_s']:>9.1f}{r['eval_samples_per_s']:>9.1f}"
            f"{r['loader_samples_per_s']:>10.0f}{r['loader_samples_per_s'] / r['train_samples_per_s']:>7.1f}"
            f"{r['flops_per_sample'] / 1e9:>13.3f}{r['achieved_flops'] / 1e9:>9.1f}"
            f"{r['utilisation']:>7.0%}{eager or float('nan'):>9.1f}"
            f"{(r['train_samples_per_s'] / eager) if eager else float('nan'):>7.2f}"
            f"{r['peak_memory_mb']:>8.0f}{r['params']:>12,}"
            + (
                f"{r.get('compiled_train_samples_per_s') or float('nan'):>11.1f}"
                f"{r.get('compile_speedup') or float('nan'):>7.2f}{r.get('compile_s') or float('nan'):>10.1f}"
                if compiled
                else ""
            )
        )
    lines.append(
        "loader/s: steady state (second pass, decoded images cached; the first pass is in the JSON); load× = loader/s "
        "÷ train/s"
    )
    if compiled:
        lines.append("compiled/s: trainer.compile=true's training step; compile s: compilation, apart from the steps")
    lines.append(
        f"util = achieved FLOP/s ÷ this machine's matmul rate ({matmul_flops / 1e9:.1f} GFLOP/s measured now)"
        + (f"; MFU against the nominal {peak / 1e12:.0f} TFLOP/s" if peak else "")
    )
    return "\n".join(lines)


def bench_models(args: argparse.Namespace) -> list[dict]:
    from vlbench.bench_profile import format_profile
    from vlbench.results import device_description, git_sha

    use_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():  # before minutes of building models that cannot move
        raise SystemExit(f"vlbench-bench models --device {args.device}: no CUDA device is available here")
    rows = [run_isolated(m, s, args) for s in args.scales.split(",") for m in args.models.split(",")]
    dtypes = {r.get("dtype", "float32") for r in rows}
    dtype = torch.bfloat16 if "bfloat16" in dtypes else torch.float32
    matmul_flops = measure_matmul_flops(device, dtype, size=args.gemm_size)
    peak = nominal_peak(device, dtype)
    for r in rows:
        if "error" not in r:
            r["utilisation"] = r["achieved_flops"] / matmul_flops
            r["mfu"] = r["achieved_flops"] / peak if peak else None
    reference = None
    if "lxmert" in args.models.split(",") and args.lxmert_reference:
        from vlbench.bench import add_lxmert_arguments, bench_lxmert

        lxmert_options = ["--scale", args.scales.split(",")[-1], "--steps", str(args.steps)]
        lxmert_options += ["--threads", str(args.threads), "--device", args.device]
        reference_args = add_lxmert_arguments(argparse.ArgumentParser()).parse_args(lxmert_options)
        reference = bench_lxmert(reference_args)
    print(f"vlbench-bench models: task {args.task}, {torch.get_num_threads()} threads, {device_description(device)}")
    print(format_table(rows, matmul_flops, peak))
    for r in rows:
        if r.get("profile"):
            print(format_profile(r["model"], r["scale"], r["profile"]))
    record = {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "device": device_description(device),
        "threads": torch.get_num_threads(),
        "matmul_flops": matmul_flops,
        "nominal_peak_flops": peak,
        "overrides": args.overrides,
        "rows": rows,
        "lxmert_vs_transformers": reference,
    }
    save_record(record, args.json, args.history)
    return rows


def save_record(record: dict, json_path: str | None, history_path: str | None) -> None:
    """The latest figures as JSON (overwritten) and one line appended to the history (never overwritten)."""
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    if history_path:
        Path(history_path).parent.mkdir(parents=True, exist_ok=True)
        with open(history_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def add_parser(sub) -> None:
    m = sub.add_parser("models", help="every model × scale: samples/s, FLOPs, utilisation, memory, loader, SDPA gain")
    m.add_argument("overrides", nargs="*", help="Hydra overrides for every model (e.g. trainer.batch_size=8)")
    m.add_argument("--models", default="albef,lxmert,pixelbert,unimo3")
    m.add_argument("--scales", default="tiny", help="comma-separated: tiny,base")
    m.add_argument("--task", default="vqa")
    m.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    m.add_argument("--warmup", type=int, default=2)
    m.add_argument("--eager-steps", type=int, default=3, help="timed steps with eager attention (0: skip)")
    m.add_argument("--compile", action="store_true", help="also time the training step compiled (trainer.compile=true)")
    m.add_argument(
        "--profile", action="store_true", help="then 2 profiled steps: busy vs wall time, time by kind, top ops, syncs"
    )
    m.add_argument("--loader-batches", type=int, default=20, help="batches timed through the data loader alone")
    m.add_argument("--gemm-size", type=int, default=2048, help="side of the square matmul that measures the machine")
    m.add_argument("--no-lxmert-reference", dest="lxmert_reference", action="store_false")
    m.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    m.add_argument("--device", default="cpu")
    m.add_argument("--json", default="results/bench/latest.json")
    m.add_argument("--history", default="results/bench/history.jsonl")
    m.set_defaults(func=bench_models)
