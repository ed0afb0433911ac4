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
import yaml
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_model

from vlbench.config_hash import device_kind, effective_precision, is_setting_override
from vlbench.errors import VlbenchError
from vlbench.safe_load import load_safetensors_into, read_safetensors_metadata, read_torch_file

# What resume reads from a checkpoint's trainer state (``init_from`` is optional: runs from scratch have none).
TRAINER_STATE_KEYS = ("step", "best_value", "best_step", "rng", "optimizer", "scheduler")


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


def setting_overrides() -> list[str]:
    """The command-line overrides of this Hydra job that define its setting (e.g. ``model.cross_layer=false``),
    sorted; empty outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return sorted(o for o in HydraConfig.get().overrides.task if is_setting_override(o))


def git_sha(repo: Path | None = None) -> str | None:
    """HEAD's commit, with ``-dirty`` appended (``git describe --dirty``'s mark) when tracked files outside
    ``results/`` differ from it: a copy of a checkout with edits on top (a GPU machine's copy of a working tree, say)
    would otherwise record a commit whose code it did not run. ``results/`` is left out because runs write there."""
    cwd = repo or Path(__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=10, cwd=cwd)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return None
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ":/", ":(top,exclude)results")
    except (OSError, subprocess.SubprocessError):
        return None
    dirty = changed.returncode == 0 and changed.stdout.strip() != ""
    return head.stdout.strip() + ("-dirty" if dirty else "")


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


def file_fingerprints(paths: list[Path]) -> tuple[str, dict[str, str]]:
    """(sha256 over the files' names and bytes — the dataset's question/annotation files —, {file name: sha256 of that
    file}), in one read: when two runs' data fingerprints differ, the per-file hashes say which file did."""
    h = hashlib.sha256()
    per_file = {}
    for p in sorted(paths):
        h.update(p.name.encode())
        one = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
                one.update(chunk)
        per_file[p.name] = one.hexdigest()[:16]
    return h.hexdigest()[:16], per_file


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
        if not path.exists():
            return None
        try:
            return OmegaConf.load(path)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise VlbenchError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from e

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
                              ("head", "head"), ("data", "data.name"), ("seed", "seed"),
                              ("init_from", "init_from"))  # the leaderboard row: fine-tuned or from scratch
        }  # fmt: skip
        device = str(OmegaConf.select(cfg, "trainer.device", default="auto"))
        kind = device_kind(device) or ("cuda" if torch.cuda.is_available() else "cpu")  # where it would have run
        precision = effective_precision(str(OmegaConf.select(cfg, "trainer.precision", default="auto")), kind)
        record.update({"error": message, "setting_overrides": setting_overrides(), "git_sha": git_sha(),
                       "device": kind, "precision": precision})  # fmt: skip
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
        """Strictly: a truncated file or another model's checkpoint fails in one line naming the file."""
        path = self.checkpoints / f"{name}.safetensors"
        load_safetensors_into(model, path, str(path))

    def load_trainer_state(self, name: str) -> dict:
        """Read as data only (``weights_only=True``): a state file swapped for a pickle with code is refused."""
        path = self.checkpoints / f"{name}.state.pt"
        if not path.is_file():
            raise VlbenchError(f"{path}: no trainer state beside {name}.safetensors (a copy without it?)")
        state = read_torch_file(path, str(path))
        missing = [k for k in TRAINER_STATE_KEYS if not isinstance(state, dict) or k not in state]
        if missing:
            raise VlbenchError(f"{path}: not a vlbench trainer state (lacks {', '.join(missing)})")
        return state

    def save_resumable_checkpoint(self, name: str, model: torch.nn.Module, trainer_state: dict) -> None:
        """Weights and trainer state written in full to temporary files, then swapped in: the current pair is renamed
        ``<name>-previous.*`` first, then the new pair takes its names. Two renames are not one atomic step, so a
        process killed in between (SIGKILL, a node failure) can leave the pair split across these names; every file
        carries its step (the weights in their metadata) and ``recover_resumable_checkpoint`` puts back the newest
        whole pair."""
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        (weights, state), (tmp_weights, tmp_state), (old_weights, old_state) = self._resumable_names(name)
        try:
            save_model(model, str(tmp_weights), metadata={"step": str(trainer_state["step"])})
            torch.save(trainer_state, tmp_state)
            for current, previous in ((weights, old_weights), (state, old_state)):
                if current.exists():
                    os.replace(current, previous)
            os.replace(tmp_state, state)
            os.replace(tmp_weights, weights)
        finally:
            for tmp in (tmp_weights, tmp_state):
                tmp.unlink(missing_ok=True)

    def _resumable_names(self, name: str) -> list[tuple[Path, Path]]:
        """(weights, state) paths: the checkpoint itself, the new pair being written, the pair it replaces."""
        weights, state = self.checkpoints / f"{name}.safetensors", self.checkpoints / f"{name}.state.pt"
        return [
            (weights, state),
            (weights.with_name(f".{weights.name}.tmp"), state.with_name(f".{state.name}.tmp")),
            (self.checkpoints / f"{name}-previous.safetensors", self.checkpoints / f"{name}-previous.state.pt"),
        ]

    def recover_resumable_checkpoint(self, name: str) -> None:
        """After a kill during ``save_resumable_checkpoint``: make ``<name>.*`` the newest pair of weights and trainer
        state of one step found among the checkpoint's, the new pair's and the previous pair's files (cut files are
        skipped). Nothing to do when ``<name>.*`` is already such a pair."""
        names = self._resumable_names(name)
        weights_steps, state_steps = {}, {}
        for weights, state in names:
            try:
                if weights.exists():
                    step = read_safetensors_metadata(weights, str(weights)).get("step")
                    if step is not None:
                        weights_steps[weights] = int(step)
                if state.exists():
                    state_steps[state] = int(read_torch_file(state, str(state))["step"])
            except (VlbenchError, KeyError, TypeError, ValueError):  # a file cut mid-write: not a candidate
                continue
        pairs = [(step, w, s) for w, step in weights_steps.items() for s, other in state_steps.items() if other == step]
        if not pairs:
            return
        target_weights, target_state = names[0]
        step, weights, state = max(pairs, key=lambda p: (p[0], (p[1], p[2]) == (target_weights, target_state)))
        if (weights, state) == (target_weights, target_state):
            return
        os.replace(weights, target_weights)
        os.replace(state, target_state)

    def checkpoint_step(self, name: str) -> int | None:
        """The step a resumable checkpoint's weights were saved at (None for weights saved without one)."""
        path = self.checkpoints / f"{name}.safetensors"
        step = read_safetensors_metadata(path, str(path)).get("step")  # a cut file fails here, in one line
        return int(step) if step is not None else None
