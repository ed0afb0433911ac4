"""`vlbench-bench`: speed of our models against the machine's limit and their reference implementations (not tests).

vlbench-bench models [--models albef,lxmert,pixelbert,unimo3] [--scales tiny,base] [--task vqa] [overrides ...]
    Every model × scale: training/eval/loader samples/s, FLOPs per sample, utilisation of the measured matmul rate,
    peak memory, SDPA vs eager attention; a table, JSON and a history line (see ``vlbench.bench_models``).

vlbench-bench lxmert [--scale tiny|base] [--batch-size 8] [--steps 4] [--warmup 1] [--threads N] [--device cpu]
                     [--profile]
    Training-step throughput of our LXMERT vs transformers' ``LxmertForPreTraining`` with the same config, weights,
    corrupted inputs and loss (the five pre-training objectives summed), in one process, alternating rounds so that
    a busy machine slows both alike. ``--profile``: one more step of each under the profiler, split into matrix
    products, the optimizer update and the rest, and the ratio that removing all of ours' rest would give.

vlbench-bench retrieval [--run DIR] [--images 1000] [--captions-per-image 5] [--k 128]
    ALBEF retrieval on a synthetic test set: time and R@1 of ITC only, ITC top-k re-ranked by ITM, and ITM over all
    pairs (the two ITM modes share one encoding pass of every image and caption); the speed-up of top-k over all
    pairs. ``--run`` takes the weights of a finished ALBEF run (e.g. ``task=retrieval head=native``).

vlbench-bench pixelbert [--scale tiny|base] [--batch-size 8] [--steps 4] [--warmup 1] [--image-size PX] [--threads N]
                        [--compare sampling|channels_last]
    Pixel-BERT pre-training steps/s (MLM + ITM, forward, backward, AdamW) with random pixel sampling on (the scale's
    ``model.pixel_sample``) and off (every pixel), same weights and batch, in one process, alternating rounds.
    ``--image-size 800``: the paper's short side, where its 100 of ~600 pixels shorten the sequence most.
    ``--compare channels_last``: the CNN (and its input) in channels-last vs contiguous memory order instead
    (``model.channels_last``), both with the scale's pixel sampling.

vlbench-bench unread [--models albef,lxmert,pixelbert,unimo3] [--scale tiny|base] [--task vqa] [--rounds 6]
                     [--steps 20] [--threads N] [overrides ...]
    Each model's training step with the token states no head reads skipped (``trainer.skip_unread_states``, the
    default) vs computed, same weights and batches, in one process, alternating rounds; the two evaluation-mode
    losses beside (see ``vlbench.bench_unread``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from vlbench.bench_models import add_parser as add_models_parser
from vlbench.bench_models import restart_with_threads, use_threads
from vlbench.bench_unread import add_unread_parser
from vlbench.host_memory import keep_freed_memory
from vlbench.models.base import ModelContext

BERT_VOCAB = 30522  # bert-base-uncased, LXMERT's tokenizer


def _lxmert_pair(scale: str, device: torch.device, all_states: bool = False):
    """Our LXMERT at a scale's config (composed as the app does) and transformers' with the same weights; ours
    skips the states its losses do not read as a run does (``trainer.skip_unread_states``) unless ``all_states``."""
    from hydra import compose, initialize_config_module
    from transformers import LxmertConfig, LxmertForPreTraining

    import vlbench.cli  # noqa: F401  (registers schemas and resolvers, as the app does)
    from vlbench.models.lxmert import LXMERT, to_transformers_state_dict

    with initialize_config_module(config_module="vlbench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=lxmert", f"scale={scale}"]).model
    ctx = ModelContext(
        vocab_size=BERT_VOCAB, pad_token_id=0, cls_token_id=101, sep_token_id=102, mask_token_id=103, image_size=0
    )
    torch.manual_seed(0)
    ours = LXMERT(cfg, ctx)
    ours.skip_unread_states = not all_states
    reference = LxmertForPreTraining(
        LxmertConfig(
            vocab_size=BERT_VOCAB,
            hidden_size=cfg.text.hidden_size,
            num_attention_heads=cfg.text.num_heads,
            intermediate_size=cfg.text.intermediate_size,
            hidden_dropout_prob=cfg.text.dropout,
            attention_probs_dropout_prob=cfg.text.dropout,
            max_position_embeddings=cfg.text.max_position_embeddings,
            l_layers=cfg.l_layers,
            r_layers=cfg.r_layers,
            x_layers=cfg.x_layers,
            visual_feat_dim=cfg.visual_feature_dim,
            visual_pos_dim=cfg.visual_pos_dim,
            num_object_labels=cfg.num_object_labels,
            num_attr_labels=cfg.num_attr_labels,
            num_qa_labels=cfg.num_qa_labels,
        )
    )
    reference.load_state_dict(to_transformers_state_dict(ours.state_dict()), strict=True)
    return ours.to(device).train(), reference.to(device).train(), cfg


def _random_batch(cfg, batch_size: int, length: int, regions: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A pre-training batch of LXMERT's shape: 36 labelled regions, every pair a question with answers."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, BERT_VOCAB, (batch_size, length), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "region_features": torch.rand(batch_size, regions, cfg.visual_feature_dim, generator=g),
        "region_boxes": torch.rand(batch_size, regions, 4, generator=g),
        "region_mask": torch.ones(batch_size, regions, dtype=torch.bool),
        "region_object_ids": torch.randint(cfg.num_object_labels, (batch_size, regions), generator=g),
        "region_object_conf": torch.rand(batch_size, regions, generator=g),
        "region_attr_ids": torch.randint(cfg.num_attr_labels, (batch_size, regions), generator=g),
        "region_attr_conf": torch.rand(batch_size, regions, generator=g),
        "image_ids": torch.arange(batch_size),
        "qa_targets": (torch.rand(batch_size, cfg.num_qa_labels, generator=g) > 0.999).float(),
        "qa_mask": torch.ones(batch_size, dtype=torch.bool),
    }
    batch["qa_targets"][:, 0] = 1.0  # every question has an answer
    return {k: v.to(device) for k, v in batch.items()}


def _time_rounds(steps: dict[str, Callable[[], float]], rounds: int, device: torch.device) -> dict[str, float]:
    """Seconds per step of each contender, alternating one step each per round."""
    total = dict.fromkeys(steps, 0.0)
    for _ in range(rounds):
        for name, step in steps.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            total[name] += time.perf_counter() - start
    return {name: seconds / rounds for name, seconds in total.items()}


GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"})


def profile_breakdown(step: Callable[[], float], optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Seconds of one training step by kind, from the profiler's self CPU time of each op: the matrix products
    (``GEMM_OPS``), the optimizer's update, and the rest. The GEMMs and the optimizer are the same work in two
    implementations of one model; only "rest" is left to win."""
    from torch.profiler import ProfilerActivity, profile, record_function

    original_step = optimizer.step

    def labelled_step(*a, **k):
        with record_function("vlbench::optimizer"):
            return original_step(*a, **k)

    optimizer.step = labelled_step
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
    finally:
        optimizer.step = original_step
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6
    gemm = sum(e.self_cpu_time_total for e in events if e.key in GEMM_OPS) / 1e6
    optim = next((e.cpu_time_total for e in events if e.key == "vlbench::optimizer"), 0.0) / 1e6
    return {"total": total, "gemm": gemm, "optimizer": optim, "rest": total - gemm - optim}


def _adamw(params, impl: str) -> torch.optim.Optimizer:
    """The same AdamW for every model of a comparison: by default the kernel the runner trains with
    (``trainer.optimizer_impl=auto``: fused), so a step costs here what it costs in a run."""
    from omegaconf import OmegaConf

    from vlbench.runner import adamw_kernel

    return torch.optim.AdamW(params, lr=1e-5, **adamw_kernel(OmegaConf.create({"optimizer_impl": impl})))


def bench_lxmert(args: argparse.Namespace) -> dict[str, float]:
    """Our LXMERT vs transformers': samples/s of a full training step (forward, backward, AdamW) on the same data."""
    device = torch.device(args.device)
    use_threads(args.threads)
    ours, reference, cfg = _lxmert_pair(args.scale, device, getattr(args, "all_states", False))
    batch = _random_batch(cfg, args.batch_size, args.text_length, args.regions, device)
    torch.manual_seed(1)
    inputs = ours.corrupt(batch, step=0)  # one corruption, fed to both: the same inputs and labels
    reference_kwargs = {
        "input_ids": inputs.input_ids,
        "attention_mask": inputs.attention_mask,
        "visual_feats": inputs.region_features,
        "visual_pos": inputs.region_boxes,
        "labels": inputs.mlm_labels,
        "obj_labels": {
            "obj": (inputs.object_ids, inputs.object_conf),
            "attr": (inputs.attr_ids, inputs.attr_conf),
            "feat": (inputs.target_features, inputs.masked_regions.float()),
        },
        "matched_label": inputs.matched,
        "ans": inputs.qa_answers,
    }
    with torch.no_grad():  # the two compute the same loss (without dropout's randomness)
        ours.eval(), reference.eval()
        same = (float(sum(ours.losses_from(inputs).values())), float(reference(**reference_kwargs).loss))
        ours.train(), reference.train()
    optimizers = {
        "ours": _adamw(ours.parameters(), args.optimizer),
        "transformers": _adamw(reference.parameters(), args.optimizer),
    }
    losses = {}

    def train_step(name: str, compute: Callable[[], torch.Tensor]) -> Callable[[], float]:
        def step() -> float:
            optimizers[name].zero_grad(set_to_none=True)
            loss = compute()
            loss.backward()
            optimizers[name].step()
            losses.setdefault(name, loss.item())
            return loss.item()

        return step

    steps = {
        "ours": train_step("ours", lambda: sum(ours.losses_from(inputs).values())),
        "transformers": train_step("transformers", lambda: reference(**reference_kwargs).loss),
    }
    if args.warmup:
        _time_rounds(steps, args.warmup, device)
    seconds = _time_rounds(steps, args.steps, device)
    rates = {name: args.batch_size / s for name, s in seconds.items()}
    print(
        f"LXMERT {args.scale} training step, batch {args.batch_size} × ({args.text_length} tokens, {args.regions} "
        f"regions), {args.steps} steps after {args.warmup} warm-up, {torch.get_num_threads()} threads, {device}, "
        f"AdamW {args.optimizer}"
    )
    print(f"loss in eval mode: ours {same[0]:.6f}, transformers {same[1]:.6f}")
    print(
        f"first training-step loss (dropout differs): ours {losses['ours']:.4f}, "
        f"transformers {losses['transformers']:.4f}"
    )
    for name, rate in rates.items():
        print(f"{name:>13}: {rate:8.2f} samples/s  ({seconds[name] * 1000:.0f} ms/step)")
    print(f"ratio ours / transformers: {rates['ours'] / rates['transformers']:.2f}×")
    if args.profile:
        parts = {name: profile_breakdown(steps[name], optimizers[name]) for name in steps}
        print("one profiled step, self CPU seconds:   total    GEMM  optimizer   rest")
        for name, part in parts.items():
            print(
                f"{name:>13}: {'':22}{part['total']:7.3f} {part['gemm']:7.3f} {part['optimizer']:9.3f} "
                f"{part['rest']:7.3f}"
            )
        ours, theirs = parts["ours"], parts["transformers"]
        print(
            "bound on the ratio if ours spent nothing outside its GEMMs and optimizer update: "
            f"{theirs['total'] / (ours['gemm'] + ours['optimizer']):.2f}×"
        )
    return rates


def bench_retrieval(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Seconds and recalls of the three scoring modes on one set of images × captions, one model, one process."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    import vlbench.cli  # noqa: F401  (registers schemas and resolvers, as the app does)
    import vlbench.models  # noqa: F401
    import vlbench.tasks  # noqa: F401
    from vlbench.data.sources import resolve_data_root
    from vlbench.data.text import load_tokenizer
    from vlbench.init_from import load_init_weights, resolve_init_source
    from vlbench.registry import MODELS, TASKS
    from vlbench.tasks.base import EvalContext
    from vlbench.tasks.retrieval import cache_unimodal_tokens, score_retrieval
    from vlbench.tasks.retrieval_eval import retrieval_recalls

    use_threads(args.threads)
    sizes = f"data.karpathy_images={{train:{args.images},restval:0,val:10,test:{args.images}}}"
    overrides = [
        "model=albef",
        "task=retrieval",
        "head=native",
        sizes,
        f"data.captions_per_image={args.captions_per_image}",
    ]
    with initialize_config_module(config_module="vlbench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    if args.run:  # the run's model and image size, our test set
        saved = OmegaConf.load(f"{args.run}/config.yaml")
        cfg.model, cfg.data.image_size = saved.model, saved.data.image_size
    root = resolve_data_root(cfg.data, "karpathy")
    tokenizer = load_tokenizer(cfg.data.tokenizer, root)
    task = TASKS.get("retrieval")(cfg.task, cfg.data, root, tokenizer, "pixels")
    ctx_model = ModelContext.for_tokenizer(tokenizer, cfg.data.image_size)
    torch.manual_seed(0)
    model = MODELS.get("albef")(cfg.model, ctx_model).eval().to(args.device)
    model.skip_unread_states = cfg.trainer.skip_unread_states  # ITM fuses as a run's evaluation does
    if args.run:
        load_init_weights(model, resolve_init_source(args.run), cfg.model)
    else:
        print("no --run: a randomly initialised ALBEF (times are meaningful, recalls are chance)")
    eval_set, visual, text = task.eval_inputs("test")
    n_images = len(eval_set.images)
    ctx = EvalContext(device=torch.device(args.device), batch_size=args.batch_size, progress=True)
    results: dict[str, dict[str, float]] = {}

    def timed(name: str, scoring: str, match_fn=None, extra: float = 0.0) -> None:
        start = time.perf_counter()
        unused = model.inputs_replaced_by_tokens if match_fn is not None else ()
        i2t, t2i = score_retrieval(model, match_fn, visual, text, ctx, scoring, args.k, n_images, unused)
        seconds = time.perf_counter() - start + extra
        recalls = retrieval_recalls(i2t, eval_set.txt2img, sims_t2i=t2i)
        results[name] = {"seconds": seconds, "i2t_r1": recalls["tr_r1"], "t2i_r1": recalls["ir_r1"]}

    with torch.no_grad():
        timed("itc", "itc")
        start = time.perf_counter()
        cache_unimodal_tokens(model, visual, text, ctx)
        encode = time.perf_counter() - start
        timed(f"itc→itm top-{args.k}", "itc_itm", model.match_scores_from_tokens, encode)
        timed("itm all pairs", "itm", model.match_scores_from_tokens, encode)
    print(f"ALBEF retrieval, {n_images} images × {len(eval_set.texts)} captions, {torch.get_num_threads()} threads")
    for name, r in results.items():
        print(f"{name:>18}: {r['seconds']:8.1f} s   R@1 image→text {r['i2t_r1']:6.2f}   text→image {r['t2i_r1']:6.2f}")
    top_k, all_pairs = results[f"itc→itm top-{args.k}"], results["itm all pairs"]
    print(f"speed-up of top-{args.k} over all pairs: {all_pairs['seconds'] / top_k['seconds']:.1f}×")
    return results


def bench_pixelbert(args: argparse.Namespace) -> dict[str, float]:
    """Pixel-BERT pre-training steps/s with and without random pixel sampling (what the paper's sampling saves), or
    (``--compare channels_last``) with the CNN in channels-last vs contiguous memory order (``model.channels_last``)."""
    from hydra import compose, initialize_config_module

    import vlbench.cli  # noqa: F401  (registers schemas and resolvers, as the app does)
    from vlbench.models.pixelbert import PixelBERT

    device = torch.device(args.device)
    use_threads(args.threads)
    with initialize_config_module(config_module="vlbench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=pixelbert", f"scale={args.scale}"])
    sample = args.sample or cfg.model.pixel_sample
    if args.compare == "sampling" and sample is None:
        raise SystemExit(f"model.pixel_sample is null at scale={args.scale}: give --sample N to compare N pixels")
    size = args.image_size or cfg.data.image_size
    ctx = ModelContext(
        vocab_size=BERT_VOCAB, pad_token_id=0, cls_token_id=101, sep_token_id=102, mask_token_id=103, image_size=size
    )
    if args.compare == "sampling":
        variants = {"sampled": {"pixel_sample": sample}, "all pixels": {"pixel_sample": None}}
    else:
        variants = {"channels_last": {"channels_last": True}, "contiguous": {"channels_last": False}}
    models = {}
    for name, changes in variants.items():
        variant = cfg.model.copy()
        variant.merge_with(changes)
        torch.manual_seed(0)
        models[name] = PixelBERT(variant, ctx)
    first = next(iter(models.values()))
    for model in models.values():
        model.load_state_dict(first.state_dict())  # the same weights
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, BERT_VOCAB, (args.batch_size, args.text_length), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "pixel_values": torch.randn(args.batch_size, 3, size, size, generator=g),
        "image_ids": torch.arange(args.batch_size),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    models = {name: model.to(device).train() for name, model in models.items()}
    optimizers = {name: _adamw(m.parameters(), args.optimizer) for name, m in models.items()}
    with torch.no_grad():
        pixels = first.pixel_embeddings(batch["pixel_values"][:1]).shape[1]

    def train_step(name: str) -> Callable[[], float]:
        def step() -> float:
            optimizers[name].zero_grad(set_to_none=True)
            loss = sum(models[name].pretrain_losses(batch, step=0).values())
            loss.backward()
            optimizers[name].step()
            return loss.item()

        return step

    steps = {name: train_step(name) for name in models}
    if args.warmup:
        _time_rounds(steps, args.warmup, device)
    seconds = _time_rounds(steps, args.steps, device)
    rates = {name: 1.0 / s for name, s in seconds.items()}
    print(
        f"Pixel-BERT {args.scale} pre-training step (MLM + ITM), batch {args.batch_size} × ({args.text_length} tokens, "
        f"{size} px → {pixels} pixels), {args.steps} steps after {args.warmup} warm-up, "
        f"{torch.get_num_threads()} threads, {device}, AdamW {args.optimizer}"
    )
    if args.compare == "sampling":
        kept = {"sampled": f"{sample} pixels", "all pixels": f"{pixels} pixels"}
        for name, rate in rates.items():
            print(f"{name:>10}: {rate:8.2f} steps/s  ({seconds[name] * 1000:.0f} ms/step, {kept[name]})")
        print(f"speed-up of pixel sampling: {rates['sampled'] / rates['all pixels']:.2f}×")
    else:
        for name, rate in rates.items():
            print(f"{name:>13}: {rate:8.2f} steps/s  ({seconds[name] * 1000:.0f} ms/step, CNN {cfg.model.cnn})")
        print(f"speed-up of channels-last: {rates['channels_last'] / rates['contiguous']:.2f}×")
    return rates


def add_lxmert_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The `lxmert` subcommand's options; `vlbench-bench models` parses its reference run with them too."""
    parser.add_argument("--scale", choices=["tiny", "base"], default="base")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per model first")
    parser.add_argument("--text-length", type=int, default=20, help="tokens per sentence (the reference pads to 20)")
    parser.add_argument("--regions", type=int, default=36)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", action="store_true", help="then one profiled step each: GEMM / optimizer / rest")
    parser.add_argument(
        "--all-states", action="store_true",
        help="ours computes every token state (trainer.skip_unread_states=false), as transformers' does",
    )  # fmt: skip
    parser.add_argument(
        "--optimizer", choices=["auto", "fused", "foreach", "loop"], default="auto",
        help="AdamW's kernel for both models (auto: the runner's, fused; loop: torch's CPU default)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vlbench-bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--malloc-defaults", action="store_true",
        help="glibc's malloc thresholds as they are, not those runs use (trainer.keep_freed_memory, default true)",
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("lxmert", help="training-step samples/s: our LXMERT vs transformers' LxmertForPreTraining")
    add_lxmert_arguments(p).set_defaults(func=bench_lxmert)
    r = sub.add_parser("retrieval", help="ALBEF retrieval: time and R@1 of ITC, ITC→ITM top-k and all-pairs ITM")
    r.add_argument("--run", default=None, help="a finished ALBEF run directory whose weights to use")
    r.add_argument("--images", type=int, default=1000)
    r.add_argument("--captions-per-image", type=int, default=5)
    r.add_argument("--k", type=int, default=128, help="ITC candidates re-ranked by ITM (ALBEF: 128 Flickr, 256 COCO)")
    r.add_argument("--batch-size", type=int, default=512, help="pairs per ITM forward pass")
    r.add_argument("--threads", type=int, default=0)
    r.add_argument("--device", default="cpu")
    r.set_defaults(func=bench_retrieval)
    b = sub.add_parser(
        "pixelbert", help="Pixel-BERT pre-training steps/s: random pixel sampling on vs off, or channels-last vs not"
    )
    b.add_argument("--scale", choices=["tiny", "base"], default="base")
    b.add_argument("--batch-size", type=int, default=8)
    b.add_argument("--steps", type=int, default=4, help="timed steps per setting")
    b.add_argument("--warmup", type=int, default=1, help="untimed steps per setting first")
    b.add_argument("--text-length", type=int, default=20)
    b.add_argument("--image-size", type=int, default=0, help="square images of this size (0: the scale's)")
    b.add_argument("--sample", type=int, default=0, help="pixels kept when sampling (0: the scale's pixel_sample)")
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--optimizer", choices=["auto", "fused", "foreach", "loop"], default="auto", help="AdamW's kernel")
    b.add_argument(
        "--compare",
        choices=["sampling", "channels_last"],
        default="sampling",
        help="random pixel sampling on vs off, or the CNN in channels-last vs contiguous memory order",
    )
    b.set_defaults(func=bench_pixelbert)
    add_models_parser(sub)
    add_unread_parser(sub)
    args = parser.parse_args(argv)
    if argv is None:  # the console command (in-process callers keep their process: use_threads sets the count)
        restart_with_threads(args.threads)
    if args.command == "models":  # each model's process applies its config's setting
        args.overrides += ["trainer.keep_freed_memory=false"] if args.malloc_defaults else []
    elif not args.malloc_defaults:  # time what a run computes at the speed a run has (vlbench/host_memory.py)
        keep_freed_memory()
    args.func(args)


if __name__ == "__main__":
    main()
