"""Configuration hashes: which runs computed the same thing.

Why a module of its own: reuse (skip a finished run), ``init_from=pretrained`` and the leaderboard all compare runs by
their resolved config minus the keys that change no result; the leaderboard reads records without importing torch.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

# Keys that do not change what a run computes (where it is written, how it is shown, when it stops to resume).
NON_SEMANTIC_KEYS = (
    "results_dir",
    "run_id",
    "resume",
    "reuse_finished",
    "reuse_root",
    "trainer.progress",
    "trainer.stop_at_step",
    "trainer.checkpoint_every",  # when to save a resumable checkpoint: saving reads state, changes none
    "trainer.max_bad_steps",
    "trainer.activation_checkpointing",  # memory savers: the same numbers (a run may resume with or without them)
    "trainer.fsdp",
    "trainer.compile",  # speed only: the same numbers up to float rounding (compiled or not, channels-last or not)
    "trainer.compile_scope",
    "model.channels_last",
    "trainer.optimizer_impl",  # AdamW's kernel (fused, foreach, loop): the same update up to float rounding
    "trainer.keep_freed_memory",  # how malloc keeps freed memory: the same numbers, bit for bit
    "trainer.skip_unread_states",  # token states no head reads left uncomputed: the same numbers up to float rounding
    "trainer.log_every",  # how often losses are logged: logging reads them, changes none
    "trainer.num_workers",  # loader processes: the same batches in the same order (tests/test_runner.py)
    "data.cache_dir",  # where the synthetic world and region features are cached: the same files wherever they lie
    "trainer.floor",  # scores a baseline beside the run: changes none of the run's numbers
    "logger",
)


# Keys added to a model's config after records were written, with the value every earlier run computed with: at that
# value a key is left out of the hash, so the records written before it keep matching new runs (reuse, init_from,
# the leaderboard's rows); any other value is a new configuration.
KEYS_ADDED_LATER = {
    "model.init_std": 0.02,  # Pixel-BERT: its transformer's init std, BERT's 0.02 before the key existed
    "model.qa_start_epochs": 0.0,  # LXMERT (2653a28): QA from an epoch; 0 = from qa_start_step, as before
}

# Keys that only one head on some tasks reads, with (those tasks, that head): out of every other run's hash, so a
# change of their default leaves the records of runs that never read them matching (ALBEF's shared-head records
# were written when nlvr_merge defaulted to linear; b56afe1 made replicate the default of its native NLVR2 head).
KEYS_READ_BY_ONE_HEAD = {
    "model.nlvr_merge": (("nlvr2", "nlvr2_ta"), "native"),
}


# Overrides that are their own leaderboard columns (model, task, ..., and numerics: device kind and precision) or do
# not change results; the rest name a run's setting.
_NON_SETTING_OVERRIDES = {"model", "task", "seed", "scale", "head", "data", "init_from"}
_NUMERICS_OVERRIDES = {"trainer.device", "trainer.precision"}
# Experiments that set only how a grid runs (reuse, resume, init_from=pretrained: the init column), not what a run
# computes (tests/test_experiments.py checks it); any other experiment (a paper's configuration) is part of a setting.
PROTOCOL_EXPERIMENTS = {"suite"}


def is_setting_override(override: str) -> bool:
    """Whether a command-line override (``key=value``) is part of a run's setting: ``trainer.device=cpu`` is not —
    the ``numerics`` column says where and in what precision a run computed, and ``auto`` on a CPU is the same."""
    key, _, value = override.partition("=")
    key = key.lstrip("+~")
    if key == "experiment":
        return value not in PROTOCOL_EXPERIMENTS
    excluded = _NON_SETTING_OVERRIDES | _NUMERICS_OVERRIDES
    return not (key in excluded or key in NON_SEMANTIC_KEYS or key.startswith("logger"))


def device_kind(device: str | None) -> str | None:
    """``cpu`` or ``cuda`` from a device name or a record's description (``cpu (x86_64, 2 threads)``, ``NVIDIA
    H200``, ``cuda:0``); None when unknown."""
    if not device or device == "auto":
        return None
    return "cpu" if str(device).startswith("cpu") else "cuda"


def effective_precision(precision: str, device_type: str) -> str:
    """What ``trainer.precision`` computes in on a device: ``auto`` is bf16 autocast on CUDA and fp32 on the CPU."""
    if precision != "auto":
        return precision
    return "bf16" if device_type == "cuda" else "fp32"


def numerics_label(precision: str, device_type: str) -> str:
    """``cpu fp32``, ``cuda bf16``, …: the leaderboard never pools runs that computed in different arithmetic."""
    return f"{device_type} {effective_precision(precision, device_type)}"


def semantic_config(cfg: DictConfig, device_type: str | None = None) -> dict:
    """The resolved config minus the keys that do not change results. With ``device_type`` (``cpu``/``cuda``: where the
    run computes) ``trainer.device`` and ``trainer.precision`` become what they resolve to there, so ``auto`` on a GPU
    (bf16) and on a CPU (fp32) differ and ``auto`` and ``cpu`` on a CPU agree; without it they stay as written."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for dotted in NON_SEMANTIC_KEYS:
        _pop(container, dotted)
    _drop_unbuilt_stem_width(container.get("model"))
    _drop_keys_at_their_former_value(container)
    _drop_keys_no_head_reads(container)
    _drop_finetune_lr_without_init(container)
    trainer = container.get("trainer")
    if device_type is not None and isinstance(trainer, dict):
        trainer["device"] = device_type
        trainer["precision"] = effective_precision(trainer.get("precision", "auto"), device_type)
    return container


def _pop(container: dict, dotted: str, only_if=lambda value: True) -> None:
    """Remove ``dotted`` (``trainer.lr``) from a nested dict where it is there and ``only_if(its value)``."""
    *parents, leaf = dotted.split(".")
    node = container
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
    if isinstance(node, dict) and leaf in node and only_if(node[leaf]):
        node.pop(leaf)


def _drop_unbuilt_stem_width(model: dict | None) -> None:
    """Pixel-BERT's tiny preset said ``cnn_kwargs.stem_width: 32`` until c30dc9c, which timm's ResNet ignores without a
    deep stem (a build with it is now refused): such a run computed what one without the key computes, so records
    written before keep their hash — they are reused and initialise fine-tunes as before."""
    kwargs = (model or {}).get("cnn_kwargs")
    if isinstance(kwargs, dict) and "stem_width" in kwargs and "deep" not in str(kwargs.get("stem_type", "")):
        kwargs.pop("stem_width")


def _drop_keys_at_their_former_value(container: dict) -> None:
    """``KEYS_ADDED_LATER`` at the value runs computed with before the key existed: out of the hash."""
    for dotted, former in KEYS_ADDED_LATER.items():
        _pop(container, dotted, only_if=lambda value, former=former: value == former)


def _drop_keys_no_head_reads(container: dict) -> None:
    """``KEYS_READ_BY_ONE_HEAD`` out of the hash of a run whose task and head do not read them."""
    task = container.get("task")
    task_name = task.get("name") if isinstance(task, dict) else None
    for dotted, (tasks, head) in KEYS_READ_BY_ONE_HEAD.items():
        if not (task_name in tasks and container.get("head") == head):
            _pop(container, dotted)


def _drop_finetune_lr_without_init(container: dict) -> None:
    """``trainer.finetune_lr`` is read only by a run with ``init_from`` (which records it as its ``lr``): out of the
    hash of a run from scratch, so a preset that gains one (LXMERT tiny, 5a6af3b) leaves its pre-training records
    matching."""
    trainer = container.get("trainer")
    if not container.get("init_from") and isinstance(trainer, dict):
        trainer.pop("finetune_lr", None)


def config_hash(cfg: DictConfig, device_type: str | None = None) -> str:
    """Which runs computed the same thing: pass the run's ``device_type`` (see ``semantic_config``)."""
    return hashlib.sha256(json.dumps(semantic_config(cfg, device_type), sort_keys=True).encode()).hexdigest()[:12]


def setting_hash(cfg: DictConfig, device_type: str | None = None) -> str:
    """The config hash without the seed and the init source: every seed of one setting shares it (a fine-tuning seed
    usually starts from its own pre-training seed's run)."""
    reduced = {k: v for k, v in semantic_config(cfg, device_type).items() if k not in ("seed", "init_from")}
    return hashlib.sha256(json.dumps(reduced, sort_keys=True).encode()).hexdigest()[:12]


def record_hashes(run_dir: Path, record: dict) -> tuple[str | None, str | None]:
    """(config hash, setting hash) of a recorded run under today's results-neutral keys: recomputed from the run's
    saved config.yaml, so a record written before a key was declared neutral still matches a new run of the same
    configuration; the record's own hashes when it saved no config. The device it ran on is the record's."""
    return _hashes(_saved_config(run_dir), record)


def record_numerics(run_dir: Path, record: dict) -> str:
    """A recorded run's ``numerics_label``: its device and the precision it resolved (records written before the
    precision was recorded resolve their saved ``trainer.precision`` on their device); ``""`` when unknown."""
    return _numerics(run_dir, record, None)


def record_identity(run_dir: Path, record: dict) -> tuple[str | None, str | None, str]:
    """(config hash, setting hash, numerics) of a recorded run, its config.yaml read once (the leaderboard's row)."""
    cfg = _saved_config(run_dir)
    return (*_hashes(cfg, record), _numerics(run_dir, record, cfg))


def _hashes(cfg: DictConfig | None, record: dict) -> tuple[str | None, str | None]:
    if cfg is not None:
        kind = device_kind(record.get("device"))
        return config_hash(cfg, kind), setting_hash(cfg, kind)
    return record.get("config_hash"), record.get("setting_hash") or record.get("config_hash")


def _numerics(run_dir: Path, record: dict, cfg: DictConfig | None) -> str:
    kind = device_kind(record.get("device"))
    if kind is None:
        return ""
    precision = record.get("precision")
    if precision is None:
        cfg = cfg if cfg is not None else _saved_config(run_dir)
        precision = OmegaConf.select(cfg, "trainer.precision", default="auto") if cfg is not None else "auto"
    return numerics_label(precision, kind)


def _saved_config(run_dir: Path) -> DictConfig | None:
    saved = Path(run_dir) / "config.yaml"
    if saved.exists():
        try:
            return OmegaConf.load(saved)
        except (OSError, YAMLError, OmegaConfBaseException):  # unreadable: the caller falls back to the record
            return None
    return None


def config_differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(a) | set(b))
    out = []
    for k in keys:
        name = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += config_differences(a[k], b[k], name + ".")
        elif a.get(k) != b.get(k):
            out.append(f"{name}: {a.get(k)!r} → {b.get(k)!r}")
    return out
