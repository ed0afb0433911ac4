"""A run's record: resolved config, manifest, metrics, predictions, checkpoints and — last, atomically — result.json.

A run directory without ``result.json`` did not finish; the leaderboard reads only result.json files.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_model, save_model

# Keys that do not change what a run computes (where it is written, how it is shown, when it stops to resume).
NON_SEMANTIC_KEYS = (
    "results_dir",
    "run_id",
    "resume",
    "reuse_finished",
    "reuse_root",
    "trainer.progress",
    "trainer.stop_at_step",
    "logger",
)


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write via a temp file in the same directory, then rename: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_json(path: Path, obj: object) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")

    _atomic_write(path, write)


def semantic_config(cfg: DictConfig) -> dict:
    """The resolved config minus the keys that do not change results."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for dotted in NON_SEMANTIC_KEYS:
        node = container
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return container


def config_hash(cfg: DictConfig) -> str:
    return hashlib.sha256(json.dumps(semantic_config(cfg), sort_keys=True).encode()).hexdigest()[:12]


def setting_hash(cfg: DictConfig) -> str:
    """The config hash without the seed and the init source: every seed of one setting shares it (a fine-tuning seed
    usually starts from its own pre-training seed's run)."""
    reduced = {k: v for k, v in semantic_config(cfg).items() if k not in ("seed", "init_from")}
    return hashlib.sha256(json.dumps(reduced, sort_keys=True).encode()).hexdigest()[:12]


# Overrides that are their own leaderboard columns or do not change results; the rest name a run's setting.
_NON_SETTING_OVERRIDES = {"model", "task", "seed", "scale", "head", "data", "init_from", "experiment"}


def setting_overrides() -> list[str]:
    """The command-line overrides of this Hydra job that define its setting (e.g. ``model.cross_layer=false``),
    sorted; empty outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    out = []
    for override in HydraConfig.get().overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in _NON_SETTING_OVERRIDES or key in NON_SEMANTIC_KEYS or key.startswith("logger"):
            continue
        out.append(override)
    return sorted(out)


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


def git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for pkg in ("vlbench", "torch", "torchvision", "timm", "transformers", "tokenizers", "hydra-core", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return versions


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def file_fingerprint(paths: list[Path]) -> str:
    """sha256 over the given files' bytes (the dataset's question/annotation files)."""
    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


class RunRecord:
    """Owns the files of one run directory."""

    def __init__(self, run_dir: Path):
        self.dir = Path(run_dir)
        self.checkpoints = self.dir / "checkpoints"
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def result_path(self) -> Path:
        return self.dir / "result.json"

    def save_config(self, cfg: DictConfig) -> None:
        _atomic_write(self.dir / "config.yaml", lambda tmp: OmegaConf.save(cfg, tmp, resolve=True))

    def saved_config(self) -> DictConfig | None:
        path = self.dir / "config.yaml"
        return OmegaConf.load(path) if path.exists() else None

    def write_manifest(self, manifest: dict) -> None:
        atomic_write_json(self.dir / "manifest.json", manifest)

    def write_result(self, result: dict) -> None:
        atomic_write_json(self.result_path, result)

    def write_example_scores(self, split: str, scores: dict[str, float]) -> None:
        atomic_write_json(self.dir / f"scores_{split}.json", scores)

    def write_failure(self, cfg: DictConfig, error: BaseException) -> None:
        """``failed.json``: what the leaderboard shows for a run that raised (one line of error, the setting)."""
        message = f"{type(error).__name__}: {error}".splitlines()[0][:500]
        record = {
            key: OmegaConf.select(cfg, path, default=None)
            for key, path in (("model", "model.name"), ("task", "task.name"), ("scale", "scale.name"),
                              ("head", "head"), ("data", "data.name"), ("seed", "seed"))
        }  # fmt: skip
        record.update({"error": message, "setting_overrides": setting_overrides(), "git_sha": git_sha()})
        atomic_write_json(self.dir / "failed.json", record)

    def save_checkpoint(self, name: str, model: torch.nn.Module, trainer_state: dict | None = None) -> None:
        """Weights as safetensors (tied weights de-duplicated); trainer state (optimizer, RNG, step) beside them,
        readable with ``torch.load(weights_only=True)``."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        _atomic_write(self.checkpoints / f"{name}.safetensors", lambda tmp: save_model(model, tmp))
        if trainer_state is not None:
            _atomic_write(self.checkpoints / f"{name}.state.pt", lambda tmp: torch.save(trainer_state, tmp))

    def has_checkpoint(self, name: str) -> bool:
        return (self.checkpoints / f"{name}.safetensors").exists()

    def load_weights(self, name: str, model: torch.nn.Module) -> None:
        missing, unexpected = load_model(model, self.checkpoints / f"{name}.safetensors", strict=True)
        assert not missing and not unexpected

    def load_trainer_state(self, name: str) -> dict:
        return torch.load(self.checkpoints / f"{name}.state.pt", weights_only=True)
