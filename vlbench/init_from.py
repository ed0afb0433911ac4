"""``init_from=<run dir | .safetensors file>``: start a run from another run's model weights (pre-train → fine-tune).

Why strict: a fine-tuning number is only comparable if we know the encoder really came from the pre-training run. Every
tensor of the model must be found in the source with the same shape, and every model tensor of the source must be
used; otherwise the run stops before training and names the keys (and the model-config differences that explain
them). The task head is not part of the model: it starts fresh — unless the source run's head is the same head
(identical tensor names and shapes, e.g. ALBEF's two-image head from text assignment to NLVR2), then it is loaded too.
The report says which.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from vlbench.config_hash import config_differences
from vlbench.errors import VlbenchError
from vlbench.safe_load import key_problems, read_safetensors

MODEL_PREFIX = "model."  # TaskModel's model sub-module
HEAD_PREFIX = "head."  # TaskModel's task head


@dataclass
class InitSource:
    """Where the initial weights come from, as recorded in the run's manifest."""

    weights: Path
    run_dir: Path | None  # the source run, when init_from named one (its config explains mismatches)
    checkpoint: str  # best | last | file
    sha256: str
    tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)  # filled on first read

    def describe(self) -> dict:
        return {
            "path": str(self.weights),
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "checkpoint": self.checkpoint,
            "sha256": self.sha256,
        }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def resolve_init_source(value: str) -> InitSource:
    """A finished run directory (its best checkpoint, else its last) or a ``.safetensors`` file of a run."""
    path = Path(value).expanduser()
    if path.is_file():
        if path.suffix != ".safetensors":
            raise VlbenchError(f"init_from={value}: expected a run directory or a .safetensors checkpoint")
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
        return InitSource(path, run_dir, "file", _sha256(path))
    if not path.is_dir():
        raise VlbenchError(f"init_from={value}: no such run directory or checkpoint file")
    if not (path / "result.json").exists():
        raise VlbenchError(
            f"init_from={value}: the run has not finished (no result.json); "
            "name one of its checkpoints/*.safetensors to start from it anyway"
        )
    for name in ("best", "last"):
        weights = path / "checkpoints" / f"{name}.safetensors"
        if weights.exists():
            return InitSource(weights, path, name, _sha256(weights))
    raise VlbenchError(f"init_from={value}: no checkpoints/best.safetensors or last.safetensors in that run")


def _model_config_hint(source: InitSource, model_cfg: DictConfig) -> str:
    if source.run_dir is None or not (source.run_dir / "config.yaml").exists():
        return ""
    saved = OmegaConf.load(source.run_dir / "config.yaml")
    ours = OmegaConf.to_container(model_cfg, resolve=True)
    theirs = OmegaConf.to_container(saved.get("model", {}), resolve=True)
    if theirs.get("name") != ours.get("name"):  # another family: every field differs, the family says it all
        return f" (the source run is model={theirs.get('name')}, this run model={ours.get('name')})"
    diffs = config_differences(theirs, ours, "model.")
    return f" (model config differs from the source run: {'; '.join(diffs)})" if diffs else ""


def _read(source: InitSource) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, read once per source (the model and the head both take from them)."""
    if source.tensors is None:  # safetensors only: a checkpoint named here is data, never a pickle that runs code
        source.tensors = read_safetensors(source.weights, f"init_from={source.weights}")
    return source.tensors


def _compare(module: nn.Module, theirs: dict[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, wrong shape) keys of ``theirs`` against ``module``'s state dict.

    safetensors stores tied tensors once: a key missing from the file is fine when it shares storage with a key that
    is there (e.g. the MLM decoder tied to the word embeddings)."""
    ours = module.state_dict()
    storage_of = {k: (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)) for k, t in ours.items()}
    present = {storage_of[k] for k in theirs if k in storage_of}
    missing = [k for k in ours if k not in theirs and storage_of[k] not in present]
    unexpected = [k for k in theirs if k not in ours]
    wrong_shape = [
        f"{k} {tuple(theirs[k].shape)} vs {tuple(ours[k].shape)}"
        for k in theirs
        if k in ours and theirs[k].shape != ours[k].shape
    ]
    return missing, unexpected, wrong_shape


def _copy_into(module: nn.Module, theirs: dict[str, torch.Tensor]) -> None:
    ours = module.state_dict()
    with torch.no_grad():
        for k, tensor in theirs.items():
            ours[k].copy_(tensor)


def load_init_weights(model: nn.Module, source: InitSource, model_cfg: DictConfig) -> dict:
    """Copy the source's ``model.*`` tensors into ``model`` strictly; returns the report stored in the manifest."""
    saved = _read(source)
    theirs = {k[len(MODEL_PREFIX) :]: v for k, v in saved.items() if k.startswith(MODEL_PREFIX)}
    adapt = getattr(model, "adapt_checkpoint", None)
    if adapt is not None:  # e.g. ViT position embeddings resampled to this run's image size
        theirs = adapt(theirs)
    missing, unexpected, wrong_shape = _compare(model, theirs)
    problems = key_problems(missing, unexpected, wrong_shape)
    if problems:
        hint = _model_config_hint(source, model_cfg)
        raise VlbenchError(f"init_from={source.weights}: {'; '.join(problems)}{hint}")
    _copy_into(model, theirs)
    return {
        **source.describe(),
        "model_tensors_loaded": len(theirs),
        "source_head_tensors": sum(1 for k in saved if k.startswith(HEAD_PREFIX)),
        "head": "initialised fresh",
    }


def load_matching_head(head: nn.Module, source: InitSource, report: dict) -> None:
    """Load the source's head when it is the same head (same tensor names and shapes); record the outcome."""
    theirs = {k[len(HEAD_PREFIX) :]: v for k, v in _read(source).items() if k.startswith(HEAD_PREFIX)}
    if theirs and not any(_compare(head, theirs)):
        _copy_into(head, theirs)
        report["head"] = "loaded from the source run (same head)"


def describe_report(report: dict) -> str:
    """One line for the console."""
    return (
        f"init_from: {report['model_tensors_loaded']} model tensors from {report['path']} "
        f"({report['checkpoint']}, sha256 {report['sha256']}); task head {report['head']}"
    )
