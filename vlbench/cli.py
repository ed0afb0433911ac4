"""`vlbench`: the Hydra app. `vlbench model=albef task=vqa`, `vlbench -m model=albef,textonly seed=0,1,2`."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from vlbench.errors import VlbenchError
from vlbench.schema import register_schemas

log = logging.getLogger("vlbench")


def _run_dir(resume: str | None, run_id: str | None, parent: str, default_name: str) -> str:
    """hydra.run.dir: the run being resumed, else <results_dir>/<model>/<task>/<run_id or scale-seed-time>."""
    if resume:
        return str(resume)
    return f"{parent}/{run_id or default_name}"


OmegaConf.register_new_resolver("vlbench_run_dir", _run_dir, replace=True)
register_schemas()


@hydra.main(config_path="pkg://vlbench.conf", config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> float | None:
    from vlbench.results import RunRecord
    from vlbench.runner import format_summary, run

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        result = run(cfg, run_dir)
    except Exception as e:
        record = RunRecord(run_dir)
        if not record.result_path.exists():  # "already finished" must not mark a finished run as failed
            record.write_failure(cfg, e)
        if hydra_cfg.mode == RunMode.MULTIRUN:  # Hydra runs the other jobs, then reports the failures
            log.error("job %s failed: %s", hydra_cfg.job.num, e)
            raise
        if not isinstance(e, VlbenchError):
            raise
        print(f"vlbench: error: {e}", file=sys.stderr)
        sys.exit(2)
    if "metrics" not in result:
        return None
    print(format_summary(result))
    if result["breakdown"].get("answer_type"):
        print("per answer type: " + ", ".join(f"{k} {v:.2f}" for k, v in result["breakdown"]["answer_type"].items()))
    print(f"run record: {run_dir}")
    return result["metrics"].get(result["main_metric"])


def main() -> None:
    app()


if __name__ == "__main__":
    main()
