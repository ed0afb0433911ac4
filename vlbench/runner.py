"""The one training loop for every model × task: build, train, evaluate, predict, record.

Read top to bottom: set-up (seed, data, task, model, head, optimizer), optional resume, the step loop (evaluation
every ``trainer.eval_every`` steps, best checkpoint by the task's main metric), then the final evaluation of the
chosen checkpoint on the test split, the predictions in the task's official format, and result.json written last.

Under ``torchrun --nproc_per_node=N`` (``vlbench/distributed.py``) every process runs this loop on its 1/N of each
global batch (``trainer.batch_size`` is the global batch) with DistributedDataParallel, or with FSDP2 shards
(``trainer.fsdp``; rank 0 then evaluates and saves an unsharded replica). Evaluation is sharded: each process predicts
a contiguous shard of the split, rank 0 gathers the predictions in the split's order (every example counted once) and
scores them; tasks that predict from the whole split at once (retrieval, pre-training, NLVR2 text assignment) and FSDP
runs evaluate on rank 0 alone while the other processes wait. Only rank 0 writes the run directory.
Each step's random draws are functions of (seed, step) — per-example draws the same on every process, the rest
(dropout) per process — so exact resume needs no saved RNG and N processes draw what one process draws.

Guards: a step whose loss or gradient norm is not finite makes no update (the step, its data and the lr schedule
still advance; counted in result.json as ``skipped_steps``); ``trainer.max_bad_steps`` such steps in a row stop the
run with an error, the last checkpoint being the last good one. SIGTERM, SIGUSR1 or SIGUSR2 finish the current step,
write the ``last`` checkpoint and return ``preempted``; the CLI then exits with ``PREEMPTED_EXIT_STATUS`` and the
same command with ``resume=<run dir>`` (or ``resume=auto``) continues exactly.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import signal
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from vlbench.config_hash import (
    config_differences,
    config_hash,
    effective_precision,
    numerics_label,
    semantic_config,
    setting_hash,
)
from vlbench.data.sources import dataset_json_files, resolve_data_root
from vlbench.data.text import load_tokenizer
from vlbench.distributed import (
    copy_gathered_state,
    full_optimizer_state,
    init_from_env,
    parameters_updated_in_forward,
    sharded_optimizer_state,
    unsharded_replica,
    unused_parameters,
)
from vlbench.errors import VlbenchError
from vlbench.floor import clears_floor, floor_margin
from vlbench.host_memory import keep_freed_memory
from vlbench.init_from import describe_report, load_init_weights, load_matching_head, resolve_init_source
from vlbench.loggers import NullLogger, build_logger, drop_entries_after
from vlbench.models.base import ModelContext, VisionLanguageModel
from vlbench.models.layers import checkpoint_transformer_blocks, compile_transformer_blocks, transformer_blocks
from vlbench.registry import MODELS, TASKS
from vlbench.results import (
    RunRecord,
    atomic_write_json,
    device_description,
    file_fingerprints,
    git_sha,
    package_versions,
    setting_overrides,
)
from vlbench.reuse import PRETRAINED, find_same_run, resolve_init_from
from vlbench.tasks.base import EvalContext, EvalResult, Task, dataset_files, to_device

# EX_TEMPFAIL (sysexits.h): the run stopped on a signal after writing a resumable checkpoint; run it again with resume=
PREEMPTED_EXIT_STATUS = 75
# SIGUSR2 is submitit's (hydra/launcher=slurm): its own handler, which requeues the job, runs after the checkpoint
PREEMPTION_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")


class TaskModel(nn.Module):
    """A model plus the head a task uses on it; the unit that is optimised and checkpointed.

    ``forward`` is the task's (``Task.forward``): most tasks run the head over the joint encoding, NLVR2 encodes two
    images, pre-training returns the model's own objectives. ``step`` is the optimiser step the batch belongs to
    (schedules inside objectives, e.g. ALBEF's distillation weight, depend on it).
    """

    def __init__(self, model: VisionLanguageModel, head: nn.Module, task: Task):
        super().__init__()
        self.model = model
        self.head = head
        self.task = task  # not a module: holds no parameters
        self.step = 0

    def forward(self, batch: dict[str, torch.Tensor], step: int | None = None):
        """``step`` (default ``self.step``) is passed by the training loop: a compiled forward (``trainer.compile``)
        takes an argument as a dynamic input, where it would recompile for every new value of an int attribute."""
        return self.task.forward(self.model, self.head, batch, self.step if step is None else step)


class EpochShuffleSampler(Sampler[int]):
    """A fresh permutation per epoch from (seed, epoch), starting at any position: exact data order on resume.

    With ``world_size`` processes, each global batch of ``batch_size`` consecutive indices is split into contiguous
    parts, rank r taking the r-th: the processes together see exactly the global batches of one process (an
    incomplete last global batch is dropped, as one process's loader drops it)."""

    def __init__(
        self,
        size: int,
        seed: int,
        epoch: int = 0,
        start: int = 0,
        batch_size: int = 1,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.size, self.seed, self.epoch, self.start = size, seed, epoch, start
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)[self.start :]
        if self.world_size > 1:
            whole = len(order) // self.batch_size * self.batch_size
            order = order[:whole].view(-1, self.world_size, self.batch_size // self.world_size)[:, self.rank]
        return iter(order.flatten().tolist())

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.size - self.start
        return (self.size - self.start) // self.batch_size * (self.batch_size // self.world_size)


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A seed for one step's draws: stream 0 is shared by every process (per-example draws of the global batch),
    stream 1 + rank is one process's own (dropout)."""
    return int(np.random.SeedSequence([seed % 2**63, step, stream]).generate_state(1, np.uint64)[0] >> 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[2] or 0],
        "python_version": random.getstate()[0],
        "numpy": [np_state[0], np_state[1].tolist(), np_state[2], np_state[3], np_state[4]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((state["python_version"], tuple(python[:-1]), python[-1] or None))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """trainer.device; a CUDA device is this process's GPU (cuda:LOCAL_RANK under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise VlbenchError("trainer.device=cuda: no CUDA device is available (use trainer.device=auto or cpu)")
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        if local_rank >= torch.cuda.device_count():
            raise VlbenchError(f"trainer.device={name}: process LOCAL_RANK={local_rank} has no GPU of its own")
        device = torch.device("cuda", local_rank)
    return device


def autocast_context(device: torch.device, precision: str):
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


# ``fallback_random``: compiled dropout draws eager's random numbers, so compiling changes the speed of a run, not
# its losses
COMPILE_OPTIONS = {"fallback_random": True}


def compile_for_training(module: nn.Module, scope: str) -> nn.Module:
    """``trainer.compile``: the module to train with. ``blocks``: ``module`` itself, each of its transformer blocks
    compiled for training (``compile_transformer_blocks``); ``forward``: torch.compile of the whole forward, default
    mode, sharing ``module``'s parameters (save ``module``: its state-dict keys have no ``_orig_mod.`` prefix)."""
    torch._dynamo.reset()  # an earlier job of a sweep in this process: its graphs would count against our limits
    if scope == "blocks":
        compile_transformer_blocks(module, options=COMPILE_OPTIONS)
        return module
    return torch.compile(module, options=COMPILE_OPTIONS)


def build_optimizer(net: nn.Module, cfg: DictConfig) -> torch.optim.Optimizer | None:
    """AdamW; no weight decay for biases, norms, position/[CLS] embeddings and the temperature (BERT/ALBEF custom)."""
    decay, no_decay, head_decay, head_no_decay = [], [], [], []
    for name, p in net.named_parameters():
        if not p.requires_grad:
            continue
        skip_decay = p.ndim < 2 or any(k in name for k in ("pos_embed", "cls_token", "position_embeddings"))
        is_head = name.startswith("head.")
        ((head_no_decay if is_head else no_decay) if skip_decay else (head_decay if is_head else decay)).append(p)
    if not (decay or no_decay or head_decay or head_no_decay):
        return None  # e.g. the majority baseline: nothing to optimise
    head_lr = cfg.lr * cfg.head_lr_multiplier
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay, "lr": cfg.lr},
        {"params": no_decay, "weight_decay": 0.0, "lr": cfg.lr},
        {"params": head_decay, "weight_decay": cfg.weight_decay, "lr": head_lr},
        {"params": head_no_decay, "weight_decay": 0.0, "lr": head_lr},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=tuple(cfg.betas), **adamw_kernel(cfg))


def adamw_kernel(cfg: DictConfig) -> dict[str, bool]:
    """AdamW's implementation switch from ``trainer.optimizer_impl`` (the per-tensor loop is torch's CPU default)."""
    impl = cfg.get("optimizer_impl", "auto")
    if impl == "auto":
        impl = "foreach" if cfg.get("fsdp", False) else "fused"
    choices = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}
    if impl not in choices:
        raise VlbenchError(f"trainer.optimizer_impl: expected auto, fused, foreach or loop, got {impl!r}")
    return choices[impl]


def lr_multiplier(step: int, cfg: DictConfig) -> float:
    """Linear warm-up, then cosine or linear decay to ``min_lr_ratio`` of the peak (or constant)."""
    total = max(1, cfg.max_steps)
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else int(cfg.warmup_ratio * total)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if cfg.schedule == "linear":
        decay = 1.0 - progress
    elif cfg.schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise VlbenchError(f"trainer.schedule={cfg.schedule!r}: expected cosine, linear or constant")
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def eval_context(cfg: DictConfig, device: torch.device) -> EvalContext:
    return EvalContext(
        device=device,
        batch_size=cfg.trainer.eval_batch_size,
        num_workers=cfg.trainer.num_workers,
        progress=cfg.trainer.progress,
        autocast=lambda: autocast_context(device, cfg.trainer.precision),
    )


@torch.no_grad()
def predict_split(net: TaskModel, task: Task, split: str, ctx: EvalContext) -> list[dict]:
    was_training = net.training
    net.eval()
    try:
        return task.predict_split(net, split, ctx)
    finally:
        net.train(was_training)


def count_flops_per_sample(net: TaskModel, batch: dict[str, torch.Tensor]) -> int | None:
    """Forward FLOPs per sample, counted by ``torch.utils.flop_counter`` on one small batch (matmul-type ops); the
    RNG is left as it was (pre-training's evaluation forward draws masks)."""
    from torch.utils.flop_counter import FlopCounterMode

    small = {k: v[:2] for k, v in batch.items()}
    was_training = net.training
    net.eval()
    devices = [batch["input_ids"].device] if batch["input_ids"].is_cuda else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices), FlopCounterMode(display=False) as counter:
            net(small)
        return int(counter.get_total_flops() // small["input_ids"].shape[0])
    except Exception:  # counting is informative only; never fail a run for it
        return None
    finally:
        net.train(was_training)


def require_no_updates_in_forward(net: nn.Module, training_forward, model_name: str) -> None:
    """FSDP runs each forward on gathered copies of the parameters: a model that changes parameters in its forward
    (ALBEF's momentum encoders, a clamped temperature) would lose those changes, so it is refused, not trained wrong."""
    updated = parameters_updated_in_forward(net, training_forward)
    if updated:
        shown = ", ".join(updated[:3]) + (f" and {len(updated) - 3} more" if len(updated) > 3 else "")
        raise VlbenchError(
            f"trainer.fsdp=true: model={model_name} changes parameters inside its forward ({shown}: momentum "
            "encoders or clamped temperatures), which FSDP's gathered copies would lose; train it with "
            "trainer.fsdp=false (DDP)"
        )


def optimizer_over_shards(
    net: nn.Module, cfg: DictConfig, state: dict, scheduler_state: dict
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW and the schedule again over FSDP's sharded parameters (the same groups, in the same order), in the state
    ``state`` (a full optimizer state dict: a resumed run's) and ``scheduler_state`` describe."""
    optimizer = build_optimizer(net, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, cfg))  # sets step 0's lr,
    optimizer.load_state_dict(sharded_optimizer_state(state, optimizer))  # which the saved param groups' lr replaces
    scheduler.load_state_dict(scheduler_state)
    return optimizer, scheduler


def gradient_norm(net: nn.Module, clip: float) -> float:
    """The total gradient norm (the NaN guard reads it), clipping to ``clip`` when > 0."""
    params = [p for p in net.parameters() if p.grad is not None]
    if clip > 0:
        return float(nn.utils.clip_grad_norm_(params, clip))
    return float(nn.utils.get_total_norm([p.grad for p in params])) if params else 0.0


class PreemptionSignals:
    """While training, SIGTERM / SIGUSR1 / SIGUSR2 only note the signal: the loop finishes its step, writes the
    ``last`` checkpoint and stops. ``hand_on`` then runs the handler that was there before ours (submitit's, which
    requeues the job), if any. Handlers can only be set from the main thread; elsewhere signals keep their effect."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> PreemptionSignals:
        if threading.current_thread() is threading.main_thread():
            for name in PREEMPTION_SIGNALS:
                signum = getattr(signal, name, None)  # SIGUSR1/2 do not exist on Windows
                if signum is not None:
                    self._previous[signum] = signal.signal(signum, self._note)
        return self

    def _note(self, signum: int, frame) -> None:
        if self.received is None:
            self.received = signum

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():  # None: a handler not set from Python, not restorable
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received is not None else "a signal to another process"

    def hand_on(self) -> None:
        previous = self._previous.get(self.received)
        if callable(previous):
            previous(self.received, None)


def format_summary(result: dict) -> str:
    """A small results table for the end of a run."""
    rows = [
        ("model", result["model"]),
        ("task", result["task"]),
        ("scale", result["scale"]),
        ("seed", str(result["seed"])),
        ("split", result["split"]),
        ("checkpoint", result["checkpoint"]),
        ("init from", result.get("init_from") or "scratch"),
    ]
    rows += [(name, f"{value:.2f}") for name, value in result["metrics"].items()]
    if result.get("val_metrics"):
        main = result["main_metric"]
        rows.append((f"val {main}", f"{result['val_metrics'][main]:.2f}"))
    floor = result.get("floor")
    if floor:
        rows.append(("floor", f"{floor['value']:.2f} ({floor['name']})"))
    rows += [
        ("params", f"{result['params']:,}"),
        ("train samples", f"{result['train_samples']:,}"),
        ("wall time", f"{result['wall_s']:.1f} s"),
    ]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    table = "\n".join([line] + [f"{k.ljust(width)} | {v}" for k, v in rows] + [line])
    value = result["metrics"].get(floor["metric"]) if floor else None
    if value is not None and not clears_floor(value, floor):
        table += (
            f"\nwarning: {floor['split']} {floor['metric']} {value:.2f} does not clear the floor {floor['value']:.2f} "
            f"({floor['name'].split(':')[0]}) by more than {floor_margin(floor):.2f} (two standard errors over "
            f"{floor['examples']:,} examples): the model may have learned nothing beyond it — train longer, check the "
            "learning rate, or start from a pre-training run (init_from=pretrained)"
        )
    return table


def run(cfg: DictConfig, run_dir: Path) -> dict:
    """Train and evaluate one configuration into ``run_dir``; returns the result record (on rank 0; the other
    processes of a torchrun job return a small dict and write nothing)."""
    import vlbench.models  # noqa: F401  (registers model families)
    import vlbench.tasks  # noqa: F401  (registers tasks)

    started = time.time()
    tcfg = cfg.trainer
    procs = init_from_env()
    main = procs.is_main
    record = RunRecord(run_dir)
    if record.result_path.exists() and not cfg.reuse_finished:
        raise VlbenchError(f"{record.result_path}: this run already finished; choose another run directory")
    if tcfg.test_checkpoint not in ("best", "last"):
        raise VlbenchError(f"trainer.test_checkpoint={tcfg.test_checkpoint!r}: expected best or last")
    if tcfg.compile_scope not in ("blocks", "forward"):
        raise VlbenchError(f"trainer.compile_scope={tcfg.compile_scope!r}: expected blocks or forward")
    if tcfg.max_bad_steps < 1:
        raise VlbenchError(f"trainer.max_bad_steps={tcfg.max_bad_steps}: expected at least 1")
    local_batch_size = procs.local_batch_size(tcfg.batch_size)
    resume_state = None
    if cfg.resume and procs.is_main:  # a kill between the renames of a checkpoint save: put the newest pair back
        record.recover_resumable_checkpoint("last")
    procs.barrier()
    # resume=auto (requeued jobs): continue this run directory when it holds a checkpoint, else start it; a run that
    # finished there is not resumed (it would be evaluated again and its record rewritten) but reused or refused below
    unfinished_checkpoint = record.has_checkpoint("last") and not record.result_path.exists()
    if cfg.resume and cfg.resume != "auto" and record.result_path.exists():  # would evaluate again, rewrite its record
        raise VlbenchError(f"resume={cfg.resume}: this run already finished ({record.result_path}); nothing to resume")
    if cfg.resume and (cfg.resume != "auto" or unfinished_checkpoint):
        saved = record.saved_config()
        if saved is None or not record.has_checkpoint("last"):
            raise VlbenchError(f"resume={cfg.resume}: no config.yaml and checkpoints/last.* there to resume from")
        resume_state = record.load_trainer_state("last")
        weights_step = record.checkpoint_step("last")
        if weights_step is not None and weights_step != resume_state["step"]:
            raise VlbenchError(
                f"resume={cfg.resume}: checkpoints/last.safetensors is of step {weights_step} but last.state.pt of "
                f"step {resume_state['step']} (killed between the two renames): cannot continue exactly"
            )

    if tcfg.keep_freed_memory:
        keep_freed_memory()
    seed_everything(cfg.seed)
    device = pick_device(tcfg.device, procs.local_rank)
    model_cls = MODELS.get(cfg.model.name)
    task_cls = TASKS.get(cfg.task.name)
    with procs.main_first():  # rank 0 may write shared files (the synthetic world, region features) that others read
        dataset_files(cfg.data, task_cls.data_format)  # the data config must provide this task's format: fail now
        data_root = resolve_data_root(cfg.data, task_cls.data_format)
        tokenizer = load_tokenizer(cfg.data.tokenizer, data_root)
        task: Task = task_cls(cfg.task, cfg.data, data_root, tokenizer, model_cls.visual_input)
        task.configure_for_model(model_cls)
        if model_cls.visual_input == "regions" and task.visual is not None:
            expected = OmegaConf.select(cfg, "model.visual_feature_dim", default=None)
            task.visual.require_feature_dim(expected, "model.visual_feature_dim")
        train_set = task.dataset("train")
        eval_split, test_split = tcfg.eval_split, tcfg.test_split
        task.dataset(eval_split)
        task.dataset(test_split)  # read every split before training: bad input fails now, not after an hour
    # what a model that learned nothing scores on the test split (data only: no RNG drawn), for the record and the
    # end-of-run warning; computed now so that a problem with it shows before training, not after
    floor = task.floor(test_split) if main and tcfg.floor and cfg.model.name != "majority" else {}
    micro_batches_per_epoch = len(train_set) // tcfg.batch_size
    if micro_batches_per_epoch == 0:
        raise VlbenchError(
            f"trainer.batch_size={tcfg.batch_size}: larger than the training split ({len(train_set)} examples)"
        )
    steps_per_epoch = max(1, micro_batches_per_epoch // tcfg.grad_accum_steps)
    if tcfg.epochs > 0:  # a budget in epochs (the papers' unit) becomes steps here, recorded in config.yaml
        tcfg.max_steps = math.ceil(tcfg.epochs * steps_per_epoch)
    if resume_state is not None and cfg.init_from == PRETRAINED:  # continue from the source it started from, even
        cfg.init_from = record.saved_config().init_from  # if a newer pre-training finished or that one was deleted
    else:
        cfg.init_from = resolve_init_from(cfg, device.type)  # `pretrained` → that run's dir, recorded in config.yaml
    if cfg.init_from and tcfg.finetune_lr is not None:  # recorded as lr in config.yaml: the lr this run used
        if main:
            tqdm.write(
                f"init_from: fine-tuning at trainer.finetune_lr={tcfg.finetune_lr:g} (trainer.lr={tcfg.lr:g} is "
                "for runs from scratch)"
            )
        tcfg.lr, tcfg.finetune_lr = tcfg.finetune_lr, None
    if cfg.reuse_finished and resume_state is None:
        same = find_same_run(Path(cfg.reuse_root), cfg, device.type, also=record.dir)
        if same is not None:
            if main:
                tqdm.write(f"reuse_finished: {same} already ran this configuration; not running it again")
                if same.resolve() != record.dir.resolve():
                    atomic_write_json(record.dir / "reused.json", {"run_dir": str(same)})
            return json.loads((same / "result.json").read_text(encoding="utf-8"))
        if record.result_path.exists():
            raise VlbenchError(f"{record.result_path}: a run with another config finished here; choose another dir")
    if resume_state is not None:  # compared after the epoch budget became steps, as the saved config has it
        diffs = config_differences(
            semantic_config(record.saved_config(), device.type), semantic_config(cfg, device.type)
        )
        if diffs:
            raise VlbenchError(f"resume={cfg.resume}: the config differs from the saved run: {'; '.join(diffs)}")
        saved_numerics, numerics = resume_state.get("numerics"), numerics_label(tcfg.precision, device.type)
        if saved_numerics is not None and saved_numerics != numerics:  # e.g. a GPU job requeued onto a CPU node
            raise VlbenchError(
                f"resume={cfg.resume}: the run trained in {saved_numerics}, this process would continue in {numerics}"
                " (trainer.device/precision): resume it on the same kind of device"
            )
    # again: preparing data may have drawn from the RNG (a first extraction of region features, on rank 0 only); the
    # initial weights must not depend on it
    seed_everything(cfg.seed)
    # per-example randomness in training (masks, negatives): reseeded from (seed, step) each step, on every process.
    # Drawn on the CPU whatever the device (a few numbers per example, copied over): the draws, hence a run, do not
    # depend on which device trains it, so a GPU run can be checked against a CPU one (tests/test_gpu.py)
    sample_generator = torch.Generator()
    ctx = ModelContext.for_tokenizer(
        tokenizer,
        cfg.data.image_size,
        num_groups=task.num_groups,
        steps_per_epoch=steps_per_epoch,
        sample_generator=sample_generator,
    )
    model: VisionLanguageModel = model_cls(cfg.model, ctx)
    model.skip_unread_states = tcfg.skip_unread_states
    init_report, init_source = None, None
    if cfg.init_from and resume_state is None:  # a resumed run reloads its own weights below
        init_source = resolve_init_source(cfg.init_from)
        init_report = load_init_weights(model, init_source, cfg.model)
    # after init_from: a native head may start from the model's weights (ALBEF's answer decoder copies the fusion)
    if cfg.head == "native":
        head = model.native_head(task.head_kind, task.num_outputs, **task.native_head_inputs())
        if head is None:
            raise VlbenchError(
                f"head=native: model {cfg.model.name} has no native head for task {task.name}; use head=shared"
            )
    elif cfg.head == "shared":
        head = task.build_shared_head(model.hidden_size)
    else:
        raise VlbenchError(f"head={cfg.head!r}: expected shared or native")
    if init_source is not None:
        load_matching_head(head, init_source, init_report)
        if main:
            tqdm.write(describe_report(init_report))
    net = TaskModel(model, head, task).to(device)
    if tcfg.activation_checkpointing:  # after the head: a native head's blocks (ALBEF's decoder) are checkpointed too
        checkpoint_transformer_blocks(net)
    ectx = eval_context(cfg, device)

    if main:
        record.save_config(cfg)

    optimizer = build_optimizer(net, tcfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, tcfg)) if optimizer else None
    if procs.distributed and optimizer is None:  # e.g. majority: its counts would stay per process
        raise VlbenchError(f"model={cfg.model.name} has nothing to train in parallel: run it without torchrun")
    params = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)

    step, best_value, best_step = 0, -math.inf, None
    skipped_steps, bad_in_a_row, validation_due = 0, 0, False
    if resume_state is not None:
        record.load_weights("last", net)
        if optimizer:
            optimizer.load_state_dict(resume_state["optimizer"])
            scheduler.load_state_dict(resume_state["scheduler"])
        step, best_value, best_step = resume_state["step"], resume_state["best_value"], resume_state["best_step"]
        skipped_steps = resume_state.get("skipped_steps", 0)
        bad_in_a_row = resume_state.get("bad_in_a_row", 0)
        validation_due = resume_state.get("validation_due", False)  # stopped by a signal before evaluating
        init_report = resume_state.get("init_from")
        set_rng_state(resume_state["rng"])
        if main:  # steps logged after the checkpoint will run again: the log keeps one entry per step
            drop_entries_after(record.dir / "metrics.jsonl", step)
    elif main:  # a start from step 0 in a used directory (resume=auto, killed before its first checkpoint)
        (record.dir / "metrics.jsonl").unlink(missing_ok=True)

    data_fingerprint, data_file_hashes = file_fingerprints(dataset_json_files(data_root))
    logger = build_logger(cfg.logger, record.dir, cfg) if main else NullLogger()
    manifest = {
        "git_sha": git_sha(),
        "config_hash": config_hash(cfg, device.type),
        "versions": package_versions(),
        "device": device_description(device),
        "num_devices": procs.world_size,
        "data_parallel": ("fsdp" if tcfg.fsdp else "ddp") if procs.distributed else None,
        "activation_checkpointing": tcfg.activation_checkpointing,
        "data_root": str(data_root),
        "data_fingerprint": data_fingerprint,
        "data_files": data_file_hashes,
        "task": task.describe(),
        "params": params,
        "trainable_params": trainable,
        "visual_input": model_cls.visual_input,
        "head": cfg.head,
        "image_size": cfg.data.image_size,
        "augmentation": cfg.data.augmentation,
        "batch_size": tcfg.batch_size * tcfg.grad_accum_steps,  # global: over processes and accumulated micro-batches
        "per_device_batch_size": local_batch_size,
        "precision": effective_precision(tcfg.precision, device.type),  # what auto resolved to here
        "compile": tcfg.compile,
        "compile_scope": tcfg.compile_scope if tcfg.compile else None,
        "init_from": init_report,
    }

    # the launches before this one, up to their last checkpoint (work after it was lost and is redone here)
    earlier_wall_s = resume_state.get("wall_s", 0.0) if resume_state is not None else 0.0

    def trainer_state() -> dict:
        return {
            "step": step,
            "best_value": best_value,
            "best_step": best_step,
            "init_from": init_report,  # the weights this run started from, kept across resumes
            "rng": rng_state(),
            "optimizer": host_optimizer_state if sharded else optimizer.state_dict() if optimizer else {},
            "scheduler": scheduler.state_dict() if scheduler else {},
            "skipped_steps": skipped_steps,
            "bad_in_a_row": bad_in_a_row,
            "validation_due": validation_due,
            "wall_s": earlier_wall_s + time.time() - started,  # a resumed run's wall time covers every launch
            "numerics": numerics_label(tcfg.precision, device.type),  # a resume elsewhere must compute the same way
        }

    last_saved_step = step if resume_state is not None else None
    # what rank 0 evaluates and saves: `net`, or under FSDP an unsharded replica refreshed from the shards
    sharded = procs.distributed and tcfg.fsdp
    host, host_optimizer_state = net, None
    # every process predicts its shard of an evaluated split, rank 0 gathers and scores; otherwise (FSDP: rank 0 alone
    # holds an unsharded replica; a task that needs the whole split) rank 0 evaluates alone and the others wait
    shard_eval = procs.distributed and task.shardable_evaluation and not sharded
    if shard_eval:
        ectx.rank, ectx.world_size, ectx.gather = procs.rank, procs.world_size, procs.gather_objects

    def refresh_host() -> None:
        """Under FSDP, called by every process: rank 0's replica and the optimizer state gathered from the shards."""
        nonlocal host_optimizer_state
        if sharded:
            copy_gathered_state(net, host)  # None on the other processes
            gathered = full_optimizer_state(optimizer)
            host_optimizer_state = gathered if main else None

    def save_last() -> None:
        """Called by every process: the replicas are checked equal, then rank 0 writes."""
        nonlocal last_saved_step
        procs.check_replicas_agree(net)
        refresh_host()
        if main:
            record.save_resumable_checkpoint("last", host, trainer_state())
        last_saved_step = step

    def evaluate(split: str) -> tuple[list[dict], EvalResult | None]:
        """Rank 0's predictions and scores; under ``shard_eval`` the other processes (which predict their shards with
        the eager ``net``, ``host`` without FSDP) get ([], None)."""
        predictions = predict_split(host, task, split, ectx)
        return predictions, task.evaluate(split, predictions) if main else None

    def validate() -> tuple[list[dict], EvalResult | None]:
        nonlocal best_value, best_step
        predictions, result = evaluate(eval_split)
        if main and result is not None:
            logger.log({f"{eval_split}/{k}": v for k, v in result.metrics.items()}, step)
            tqdm.write(f"step {step}: {eval_split} {result.main_metric} = {result.main_value:.2f}")
            if best_step is None or result.better_than(best_value):
                best_value, best_step = result.main_value, step
                record.save_checkpoint("best", host)
        if shard_eval:  # every process follows rank 0's best checkpoint (the final evaluation reloads it everywhere)
            chosen = procs.broadcast(-1.0 if best_step is None else float(best_step))
            best_step = None if chosen < 0 else int(chosen)
        return predictions, result

    def validate_while_training() -> None:
        nonlocal validation_due
        refresh_host()
        if main or shard_eval:  # every process its shard; or the whole split on rank 0 while the others wait
            validate()
        procs.barrier()
        validation_due = False

    # ----- training --------------------------------------------------------------------------------------------
    micro_index = step * tcfg.grad_accum_steps
    epoch, position = divmod(micro_index, micro_batches_per_epoch)

    def batches():
        """This process's part of each global micro-batch, in the order of one process (EpochShuffleSampler). One
        loader for the whole run: its workers, and the images they have decoded and cached, outlive an epoch."""
        nonlocal epoch, position
        sampler = EpochShuffleSampler(
            len(train_set), cfg.seed, batch_size=tcfg.batch_size, rank=procs.rank, world_size=procs.world_size
        )
        loader = DataLoader(
            train_set,
            batch_size=local_batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=train_set.collate,
            num_workers=tcfg.num_workers,
            persistent_workers=tcfg.num_workers > 0,
            pin_memory=device.type == "cuda",
            # its own generator: creating an iterator must not draw from the global RNG (exact resume)
            generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch),
        )
        while True:
            sampler.epoch, sampler.start = epoch, position * tcfg.batch_size  # read as each pass over the loader starts
            for batch in loader:
                position += 1
                yield batch
            epoch, position = epoch + 1, 0

    net.train()
    stream = batches()
    first = next(stream)
    stream = itertools.chain([first], stream)
    probe = to_device(first, device)
    flops_per_sample = count_flops_per_sample(net, probe) or 0
    train_net = net
    if sharded:  # FSDP: rank 0 keeps an unsharded replica; the optimizer moves onto the shards (with a resumed state)
        sample_generator.manual_seed(step_seed(cfg.seed, step))
        require_no_updates_in_forward(net, lambda: net(probe), cfg.model.name)
        loaded = full_optimizer_state(optimizer)  # a resumed run's state, moved onto the shards below
        host, host_optimizer_state = (unsharded_replica(net), loaded) if main else (None, None)
        procs.shard(net, device, transformer_blocks(net))
        optimizer, scheduler = optimizer_over_shards(net, tcfg, loaded, scheduler.state_dict())
    elif procs.distributed:  # DDP searches for unused parameters every step only when one step leaves some unused
        sample_generator.manual_seed(step_seed(cfg.seed, step))
        unused = unused_parameters(net, lambda: task.loss(net(probe), probe))
        train_net = procs.wrap(net, device, find_unused_parameters=procs.any(bool(unused)))
    if tcfg.compile:  # after the probes above (eager); checkpoints and evaluation use the eager forward
        train_net = compile_for_training(train_net, tcfg.compile_scope)
    if validation_due:
        validate_while_training()
    stop_at = tcfg.stop_at_step if 0 < tcfg.stop_at_step < tcfg.max_steps else tcfg.max_steps
    preempted = False
    train_started = time.time()
    start_step = step
    progress = tqdm(
        total=tcfg.max_steps,
        initial=step,
        desc=f"{cfg.model.name}/{task.name}",
        disable=not (tcfg.progress and main),
    )
    with PreemptionSignals() as signals:
        while step < stop_at:
            net.step = step
            sample_generator.manual_seed(step_seed(cfg.seed, step))  # the global batch's draws, alike everywhere
            torch.manual_seed(step_seed(cfg.seed, step, 1 + procs.rank))  # this process's own (dropout)
            loss_sum = 0.0
            terms: dict[str, float] = {}
            for micro in range(tcfg.grad_accum_steps):
                net.model.first_micro_batch = micro == 0
                batch = to_device(next(stream), device)
                # DDP averages gradients over processes once per step, on the last micro-batch's backward
                accumulate = procs.distributed and not sharded and micro < tcfg.grad_accum_steps - 1
                with train_net.no_sync() if accumulate else nullcontext():
                    with autocast_context(device, tcfg.precision):
                        outputs = train_net(batch, step)
                        loss = task.loss(outputs, batch) / tcfg.grad_accum_steps
                    if loss.requires_grad:
                        loss.backward()
                for name, value in task.loss_terms(outputs).items():
                    terms[name] = terms.get(name, 0.0) + value / tcfg.grad_accum_steps
                loss_sum += loss.item()
            # each process's loss is its share: the mean over processes is the global batch's loss
            loss_sum, *term_values = procs.mean([loss_sum, *terms.values()])
            terms = dict(zip(terms, term_values, strict=True))
            grad_norm = gradient_norm(net, tcfg.clip_grad_norm) if optimizer else None
            finite = math.isfinite(loss_sum) and (grad_norm is None or math.isfinite(grad_norm))
            if finite:
                bad_in_a_row = 0
                if optimizer:
                    optimizer.step()
            else:  # no update; the step, its data and the lr schedule move on
                skipped_steps, bad_in_a_row = skipped_steps + 1, bad_in_a_row + 1
                if main:
                    tqdm.write(
                        f"step {step + 1}: loss {loss_sum}, gradient norm {grad_norm}: not finite, update skipped "
                        f"({bad_in_a_row} in a row, {skipped_steps} in all)"
                    )
            if optimizer:
                optimizer.zero_grad(set_to_none=True)
                scheduler.step()
            step += 1
            progress.update(1)
            if bad_in_a_row >= tcfg.max_bad_steps:
                logger.close()
                kept = f"checkpoints/last.* (step {last_saved_step})" if last_saved_step is not None else "none"
                raise VlbenchError(
                    f"step {step}: {bad_in_a_row} steps in a row with a non-finite loss or gradient norm "
                    f"(trainer.max_bad_steps={tcfg.max_bad_steps}); last good checkpoint: {kept}; lower trainer.lr "
                    "or check the data"
                )
            if not finite:
                logger.log({"train/skipped_steps": skipped_steps}, step)
            elif step % tcfg.log_every == 0 or step == stop_at:
                entry = {"train/loss": loss_sum, "train/epoch": epoch, **{f"train/{k}": v for k, v in terms.items()}}
                if optimizer:
                    entry["train/lr"] = scheduler.get_last_lr()[0]
                    entry["train/grad_norm"] = grad_norm
                logger.log(entry, step)
                progress.set_postfix(loss=f"{loss_sum:.3f}")
            validation_due = tcfg.eval_every > 0 and step % tcfg.eval_every == 0 and step < tcfg.max_steps
            preempted = procs.any(signals.received is not None)
            if preempted:  # checkpoint now, evaluate after resuming (validation_due is saved)
                save_last()
                if main:
                    tqdm.write(
                        f"{signals.name}: stopped after step {step}/{tcfg.max_steps} with a checkpoint; continue "
                        f"with resume={record.dir}"
                    )
                break
            if validation_due:
                validate_while_training()
            periodic = tcfg.checkpoint_every > 0 and step % tcfg.checkpoint_every == 0 and bad_in_a_row == 0
            if periodic or step == stop_at:
                save_last()
    progress.close()
    train_seconds = time.time() - train_started

    if preempted or step < tcfg.max_steps:  # stopped early on a signal or on request: resumable, not finished
        logger.close()
        procs.barrier()
        if preempted:
            signals.hand_on()
            return {"stopped_at_step": step, "run_dir": str(record.dir), "preempted": signals.name}
        if main:
            tqdm.write(f"stopped at step {step}/{tcfg.max_steps}; continue with resume={record.dir}")
        return {"stopped_at_step": step, "run_dir": str(record.dir)}
    if not main and not shard_eval:  # rank 0 evaluates and writes the record alone
        return {"rank": procs.rank, "run_dir": str(record.dir), "steps": step}

    # ----- final evaluation (under shard_eval every process predicts its shards; rank 0 alone scores and writes) -----
    val_predictions, val_result = validate()
    if main:
        record.save_resumable_checkpoint("last", host, trainer_state())
    checkpoint = "last"
    if tcfg.test_checkpoint == "best" and best_step is not None:
        checkpoint = f"best (step {best_step}, {eval_split} {task.cfg.main_metric} {best_value:.2f})"
        if best_step != step:  # otherwise the last weights are the best ones, already evaluated
            record.load_weights("best", host)
            val_predictions, val_result = evaluate(eval_split)
    test_predictions, test_result = evaluate(test_split)  # before any prediction file: a failure leaves none
    if not main:
        return {"rank": procs.rank, "run_dir": str(record.dir), "steps": step}
    task.write_predictions(val_predictions, record.dir / f"predictions_{eval_split}")
    predictions_path = task.write_predictions(test_predictions, record.dir / f"predictions_{test_split}")
    for split, split_result in ((eval_split, val_result), (test_split, test_result)):
        if split_result is not None and split_result.per_example:  # for the leaderboard's paired test
            record.write_example_scores(split, split_result.per_example)
    logger.log({f"{test_split}/{k}": v for k, v in (test_result.metrics if test_result else {}).items()}, step)
    logger.close()

    steps_run = step - start_step
    samples_per_second = steps_run * tcfg.batch_size * tcfg.grad_accum_steps / max(train_seconds, 1e-9)
    wall = earlier_wall_s + time.time() - started
    manifest.update(
        {
            "wall_s": round(wall, 2),
            "train_s": round(train_seconds, 2),
            "train_samples_per_s": round(samples_per_second, 2),
            "flops_per_sample_forward": flops_per_sample,
            "skipped_steps": skipped_steps,
        }
    )
    record.write_manifest(manifest)
    result = {
        "model": cfg.model.name,
        "task": task.name,
        "scale": cfg.scale.name,
        "seed": cfg.seed,
        "head": cfg.head,
        "data": cfg.data.name,
        "init_from": init_report["run_dir"] or init_report["path"] if init_report else None,
        "split": test_split,
        "checkpoint": checkpoint,
        "main_metric": task.cfg.main_metric,
        "metrics": test_result.metrics if test_result else {},
        "breakdown": test_result.breakdown if test_result else {},
        "val_metrics": val_result.metrics if val_result else {},
        "floor": floor or None,  # what a model that learned nothing scores on the same split (answer prior, chance)
        "predictions": predictions_path.name,
        "params": params,
        "trainable_params": trainable,
        "train_samples": step * tcfg.batch_size * tcfg.grad_accum_steps,
        "steps": step,
        "skipped_steps": skipped_steps,
        "wall_s": round(wall, 2),
        "config_hash": manifest["config_hash"],
        "setting_hash": setting_hash(cfg, device.type),
        "setting_overrides": setting_overrides(),
        "flops_per_sample_forward": flops_per_sample,
        "device": manifest["device"],
        "precision": manifest["precision"],
        "num_devices": procs.world_size,
        "git_sha": manifest["git_sha"],
    }
    record.write_result(result)  # last: its presence means the run finished
    return result
