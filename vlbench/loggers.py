"""Metric loggers: JSONL in the run directory (default), wandb (offline unless asked), or none."""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vlbench.errors import VlbenchError


class NullLogger:
    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlLogger(NullLogger):
    """One JSON object per line: {"step": ..., "<split>/<metric>": ...}; appended, so a resumed run continues it."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115  (kept open for the run)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            self.file.write(json.dumps({"step": step, **metrics}) + "\n")
            self.file.flush()

    def close(self) -> None:
        self.file.close()


class WandbLogger(JsonlLogger):
    """wandb in offline mode by default (sync later with `wandb sync`); the JSONL file is written too."""

    def __init__(self, path: Path, cfg: DictConfig, logger_cfg: DictConfig):
        super().__init__(path)
        try:
            import wandb
        except ImportError as e:
            raise VlbenchError("logger=wandb: the wandb package is not installed (pip install wandb)") from e
        self.run = wandb.init(
            project=logger_cfg.wandb_project,
            mode=logger_cfg.wandb_mode,
            dir=str(path.parent),
            config=OmegaConf.to_container(cfg, resolve=True),
            reinit=True,
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        super().log(metrics, step)
        if metrics:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        super().close()
        self.run.finish()


def drop_entries_after(path: Path, step: int) -> None:
    """Keep only the entries of steps up to ``step`` (a resumed run logs the steps after its checkpoint again)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)

    def keep(line: str) -> bool:
        try:
            return json.loads(line).get("step", 0) <= step
        except json.JSONDecodeError:  # a line cut short by a killed process
            return False

    kept = [line for line in lines if keep(line)]
    if len(kept) != len(lines):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        tmp.replace(path)


def build_logger(logger_cfg: DictConfig, run_dir: Path, cfg: DictConfig) -> NullLogger:
    path = run_dir / "metrics.jsonl"
    if logger_cfg.name == "none":
        return NullLogger()
    if logger_cfg.name == "jsonl":
        return JsonlLogger(path)
    if logger_cfg.name == "wandb":
        return WandbLogger(path, cfg, logger_cfg)
    raise VlbenchError(f"logger.name={logger_cfg.name!r}: expected none, jsonl or wandb")
