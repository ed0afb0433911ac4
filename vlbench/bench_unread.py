"""``vlbench-bench unread``: what ``trainer.skip_unread_states`` saves, per model, in one process.

Two task models of each family built alike with the same weights — one whose last fused layer computes [CLS] alone
where the head reads only the pooled output (the default), one computing every token state — step in alternation
on the same batches, so the VM's drift falls on both; the medians and their ratio are printed, with the two
evaluation-mode losses on one batch (the same function: they agree to float rounding).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from vlbench.bench_models import build_for_bench, compose_config, fit_region_features, use_threads

VARIANTS = {"skipped": True, "all states": False}


def _task_models(name: str, args: argparse.Namespace, device: torch.device) -> tuple[dict, list, object]:
    """(variant → (task, net, optimizer)), the training batches, the config; both nets hold the same weights."""
    from torch.utils.data import DataLoader

    from vlbench.runner import EpochShuffleSampler, build_optimizer, seed_everything
    from vlbench.tasks.base import to_device

    built, cfg = {}, None
    for variant, skip in VARIANTS.items():
        overrides = [f"trainer.device={device.type}", f"trainer.skip_unread_states={str(skip).lower()}"]
        cfg = compose_config(name, args.scale, args.task, [*overrides, *args.overrides])
        seed_everything(cfg.seed)
        task, train_set, net = build_for_bench(cfg, device)
        built[variant] = (task, net.train(), build_optimizer(net, cfg.trainer))
    (_, first, _), (_, second, _) = built.values()
    second.load_state_dict(first.state_dict())
    loader = DataLoader(
        train_set,
        batch_size=cfg.trainer.batch_size,
        sampler=EpochShuffleSampler(len(train_set), cfg.seed),
        drop_last=True,
        collate_fn=train_set.collate,
    )
    fit = {"dim": cfg.model.get("visual_feature_dim"), "boxes": cfg.data.datasets[task.data_format].max_regions}
    batches = []
    for batch in loader:
        batches.append(to_device(fit_region_features(batch, **fit), device))
        if len(batches) == 8:
            break
    return built, batches, cfg


def bench_model(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    built, batches, cfg = _task_models(name, args, device)
    losses = {}
    with torch.no_grad():
        for variant, (task, net, _) in built.items():
            net.eval()
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(cfg.seed)  # pre-training's masks and negatives: the same draws for both
                losses[variant] = task.loss(net(batches[0]), batches[0]).item()
            net.train()
    position = dict.fromkeys(built, 0)

    def step(variant: str) -> float:
        task, net, optimizer = built[variant]
        batch = batches[position[variant] % len(batches)]
        position[variant] += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        loss = task.loss(net(batch), batch)
        loss.backward()
        if cfg.trainer.clip_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.trainer.clip_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    seconds = {variant: [] for variant in built}
    for round_index in range(args.warmup + args.rounds):
        for variant in built:  # a round: args.steps steps of each, in alternation
            timed = [step(variant) for _ in range(args.steps)]
            if round_index >= args.warmup:
                seconds[variant] += timed
    ms = {variant: 1000 * statistics.median(values) for variant, values in seconds.items()}
    return {
        "model": name,
        "batch_size": cfg.trainer.batch_size,
        "skipped_ms": ms["skipped"],
        "all_states_ms": ms["all states"],
        "speed_up": ms["all states"] / ms["skipped"],
        "eval_loss_skipped": losses["skipped"],
        "eval_loss_all_states": losses["all states"],
    }


def bench_unread(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    use_threads(args.threads)
    rows = [bench_model(name, args, device) for name in args.models.split(",")]
    print(
        f"trainer.skip_unread_states, {args.scale} {args.task} training step (median of {args.rounds} alternating "
        f"rounds of {args.steps} steps after {args.warmup}), {torch.get_num_threads()} threads, {device}"
    )
    print(f"{'model':<10} {'batch':>5} {'skipped':>10} {'all states':>11} {'speed-up':>9}   eval loss (both)")
    for r in rows:
        print(
            f"{r['model']:<10} {r['batch_size']:>5} {r['skipped_ms']:>8.1f}ms {r['all_states_ms']:>9.1f}ms "
            f"{r['speed_up']:>8.2f}×   {r['eval_loss_skipped']:.6f} / {r['eval_loss_all_states']:.6f}"
        )
    return rows


def add_unread_parser(sub) -> None:
    p = sub.add_parser(
        "unread", help="training step with the token states no head reads skipped vs computed (skip_unread_states)"
    )
    p.add_argument("--models", default="albef,lxmert,pixelbert,unimo3")
    p.add_argument("--scale", choices=["tiny", "base"], default="tiny")
    p.add_argument("--task", default="vqa")
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (each: --steps steps of each variant)")
    p.add_argument("--steps", type=int, default=20, help="steps of one variant per round")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("overrides", nargs="*", help="config overrides for both variants (e.g. trainer.batch_size=32)")
    p.set_defaults(func=bench_unread)
