"""Finding finished runs: skip a run whose configuration already finished, and ``init_from=pretrained``.

Why: a grid of models × tasks × seeds is re-launched after a failure or an extension; only what is missing should run
(``reuse_finished=true``). And a fine-tuning grid must start each model × seed from *its* pre-training run without
the user pasting run directories: ``init_from=pretrained`` finds the finished ``task=pretrain`` run of the same model
configuration, scale, data and seed under ``reuse_root``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from vlbench.config_hash import (
    config_differences,
    config_hash,
    is_setting_override,
    numerics_label,
    record_hashes,
    record_numerics,
    semantic_config,
)
from vlbench.errors import VlbenchError

PRETRAINED = "pretrained"  # the init_from keyword


def finished_runs(root: Path) -> list[tuple[Path, dict]]:
    """(run dir, result record) of every finished run under ``root``, oldest first (by result.json mtime)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.rglob("result.json"):
        try:
            found.append((path.stat().st_mtime, path.parent, json.loads(path.read_text(encoding="utf-8"))))
        except (OSError, json.JSONDecodeError):
            continue  # a record being written or damaged is not a finished run
    return [(run_dir, record) for _, run_dir, record in sorted(found, key=lambda t: t[0])]


def has_weights(run_dir: Path) -> bool:
    """Whether a run directory holds model weights (archived records under results/reference/ hold none)."""
    return any((Path(run_dir) / "checkpoints" / f"{name}.safetensors").exists() for name in ("best", "last"))


def find_same_run(root: Path, cfg: DictConfig, device_type: str, also: Path | None = None) -> Path | None:
    """The newest finished run with this run's config hash (results-neutral keys excluded) on this kind of device
    (``cpu``/``cuda``: a CPU fp32 record is no answer for a GPU bf16 run) under ``root`` or in the run directory
    ``also`` (a re-launched sweep writes to the same directories, which may lie outside ``root``). A pre-training run
    counts only with its weights: the fine-tuning runs of the grid start from them."""
    wanted = config_hash(cfg, device_type)
    runs = finished_runs(root)
    if also is not None and (Path(also) / "result.json").exists():
        runs += [(Path(also), json.loads((Path(also) / "result.json").read_text(encoding="utf-8")))]
    needs_weights = cfg.task.name == "pretrain"
    same_job = (cfg.model.name, cfg.task.name, cfg.seed)  # read the saved configs of these only
    matches = [
        d
        for d, r in runs
        if (r.get("model"), r.get("task"), r.get("seed")) == same_job
        and record_hashes(d, r)[0] == wanted
        and (has_weights(d) or not needs_weights)
    ]
    return matches[-1] if matches else None


def find_pretrained(root: Path, cfg: DictConfig, device_type: str | None = None) -> Path:
    """The newest finished pre-training run with this run's model config, scale, data and seed — among those, one
    launched with this run's setting overrides (e.g. ``budget=tiny_96k``) first, so that a newer smoke or ablation
    pre-training (``trainer.max_steps=20``) of the same model never silently becomes the grid's starting point; then
    one that computed in this run's arithmetic (``device_type``: where this run computes), so that a GPU grid beside a
    laptop's starts from its own bf16 pre-training, not from a newer CPU one. A named error (with the nearest
    candidate's differences) when there is none."""
    from vlbench.results import setting_overrides

    want_model = semantic_config(cfg)["model"]
    candidates = []
    for run_dir, record in finished_runs(root):
        if record.get("task") != "pretrain" or record.get("model") != cfg.model.name:
            continue
        if (record.get("scale"), record.get("data"), record.get("seed")) != (cfg.scale.name, cfg.data.name, cfg.seed):
            continue
        saved = run_dir / "config.yaml"
        if not saved.exists() or not has_weights(run_dir):
            continue
        model = semantic_config(OmegaConf.load(saved))["model"]  # speed-only keys (channels_last) do not count
        setting = sorted(o for o in record.get("setting_overrides") or [] if is_setting_override(o))
        candidates.append((run_dir, config_differences(model, want_model, "model."), setting, record))
    own = setting_overrides()
    numerics = numerics_label(cfg.trainer.precision, device_type) if device_type else None
    exact = [(run_dir, setting, record_numerics(run_dir, record)) for run_dir, diffs, setting, record in candidates
             if not diffs]  # fmt: skip
    if exact:
        # newest first, and max keeps the first of equals: the newest of the best-ranked
        run_dir, setting, found = max(reversed(exact), key=lambda e: (e[1] == own, numerics in (None, e[2])))
        said = os.environ.get("RANK", "0") == "0"  # named once, not by every process under torchrun
        if setting != own and len({tuple(s) for _, s, _ in exact}) > 1 and said:
            print(
                f"init_from=pretrained: no pre-training run with this run's overrides ({' '.join(own) or 'none'}); "
                f"using the newest of {len(exact)}: {run_dir} ({' '.join(setting) or 'no overrides'})"
            )
        if numerics is not None and found != numerics and said:
            print(
                f"init_from=pretrained: no such pre-training run computed in {numerics}; "
                f"using {run_dir} ({found or 'not recorded'})"
            )
        return run_dir
    where = f"model={cfg.model.name} scale={cfg.scale.name} data={cfg.data.name} seed={cfg.seed}"
    if candidates:
        run_dir, diffs, _, _ = min(candidates, key=lambda c: len(c[1]))
        raise VlbenchError(
            f"init_from=pretrained: no finished pre-training run of {where} with this model config under {root}; "
            f"nearest {run_dir} differs in {'; '.join(diffs[:5])}"
        )
    raise VlbenchError(
        f"init_from=pretrained: no finished task=pretrain run of {where} under {root}; "
        f"run it first (vlbench model={cfg.model.name} task=pretrain seed={cfg.seed} ...)"
    )


def resolve_init_from(cfg: DictConfig, device_type: str | None = None) -> str | None:
    """``cfg.init_from`` with the ``pretrained`` keyword replaced by the run directory it names. A pre-training run
    given the keyword starts from scratch — it *is* the pre-training — so one grid config serves both stages."""
    if cfg.init_from != PRETRAINED:
        return cfg.init_from
    if cfg.task.name == "pretrain":
        return None
    return str(find_pretrained(Path(cfg.reuse_root), cfg, device_type))
