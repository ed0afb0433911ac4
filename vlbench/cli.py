"""`vlbench`: the Hydra app. `vlbench model=albef task=vqa`, `vlbench -m model=albef,textonly seed=0,1,2`.

Data-parallel: `torchrun --nproc_per_node=N -m vlbench.cli model=albef …` (one run over N processes; see
``vlbench/distributed.py``). Exit status: 0 finished (or stopped at ``trainer.stop_at_step``), 2 a VlbenchError (bad
input or configuration, one line on stderr), 75 stopped by SIGTERM/SIGUSR1/SIGUSR2 with a resumable checkpoint
(``runner.PREEMPTED_EXIT_STATUS``: run the same command with ``resume=<run dir>`` or ``resume=auto``).

A config that does not compose (an unknown key or option, a value of the wrong type, an override that does not parse)
or that holds a key no schema declares (``+trainer.max_stepz=5``) fails before any run directory exists, with the
same one line and exit status 2.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, OmegaConfBaseException

from vlbench.errors import VlbenchError, exit_with_error
from vlbench.schema import register_schemas

log = logging.getLogger("vlbench")


START_TIME_ENV = "VLBENCH_START_TIME"  # rank 0's start time, shared by every process of a torchrun job


def _run_dir(resume: str | None, run_id: str | None, parent: str, default_name: str) -> str:
    """hydra.run.dir: the run being resumed, else <results_dir>/<model>/<task>/<run_id or scale-seed-time>
    (``resume=auto`` continues that same directory when it has a checkpoint)."""
    if resume and resume != "auto":
        return str(resume)
    return f"{parent}/{run_id or default_name}"


def _start_time(pattern: str) -> str:
    """Hydra's ``now``, but every process of a torchrun job reads rank 0's clock: one run directory for all."""
    return time.strftime(pattern, time.localtime(float(os.environ.get(START_TIME_ENV, time.time()))))


OmegaConf.register_new_resolver("vlbench_run_dir", _run_dir, replace=True)
OmegaConf.register_new_resolver("vlbench_now", _start_time, use_cache=True, replace=True)
register_schemas()


@hydra.main(config_path="pkg://vlbench.conf", config_name="config", version_base="1.3")
def app(cfg: DictConfig) -> float | None:
    from vlbench.distributed import init_from_env
    from vlbench.results import RunRecord
    from vlbench.runner import PREEMPTED_EXIT_STATUS, format_summary, run

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        result = run(cfg, run_dir)
    except Exception as e:
        record = RunRecord(run_dir)
        # "already finished" must not mark a finished run as failed; under torchrun rank 0 alone writes
        if not record.result_path.exists() and init_from_env().is_main:
            record.write_failure(cfg, e)
        if hydra_cfg.mode == RunMode.MULTIRUN:  # Hydra runs the other jobs, then reports the failures
            log.error("job %s failed: %s", hydra_cfg.job.num, e)
            raise
        if not isinstance(e, VlbenchError):
            raise
        exit_with_error(e)
    if result.get("preempted") and hydra_cfg.mode == RunMode.RUN:
        sys.exit(PREEMPTED_EXIT_STATUS)
    if "metrics" not in result:
        return None
    print(format_summary(result))
    if result["breakdown"].get("answer_type"):
        print("per answer type: " + ", ".join(f"{k} {v:.2f}" for k, v in result["breakdown"]["answer_type"].items()))
    print(f"run record: {run_dir}")
    return result["metrics"].get(result["main_metric"])


def _raised_in_the_run(error: BaseException) -> bool:
    """Whether ``error`` came out of the app's body (a run, or a sweep's job) rather than from composing its config."""
    return any(frame.f_code is app.__wrapped__.__code__ for frame, _ in traceback.walk_tb(error.__traceback__))


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else ""


def composition_error_line(error: Exception) -> str:
    """Hydra's or OmegaConf's several-line message as one line that names the key or option and what was expected."""
    if isinstance(error, MissingConfigException) and error.missing_cfg_file and "/" in error.missing_cfg_file:
        group, option = error.missing_cfg_file.rsplit("/", 1)
        if error.options:
            return f"{group}={option}: no such option in config group '{group}' (available: {', '.join(error.options)})"
        return f"{group}={option}: no config group '{group}'"
    if isinstance(error, OverrideParseException):
        return f"{error.override}: cannot parse this override ({' '.join(error.message.split())})"
    cause = error if isinstance(error, OmegaConfBaseException) else error.__cause__
    if isinstance(cause, ConfigAttributeError) and dataclasses.is_dataclass(cause.object_type) and cause.full_key:
        from vlbench.schema import unknown_key_message

        return unknown_key_message(str(cause.full_key), [f.name for f in dataclasses.fields(cause.object_type)])
    if isinstance(cause, OmegaConfBaseException):
        where = f"{cause.full_key}: " if cause.full_key and not isinstance(error, HydraException) else ""
        reason = _first_line(cause.msg or str(cause))
        if cause is error:
            return f"{where}{reason}"
        return f"{_first_line(str(error)).rstrip('.')}: {reason}"
    return " ".join(str(error).split())


def main() -> None:
    """The ``vlbench`` command: Hydra composes the config and runs the app; a config that does not compose is one
    line on stderr and exit status 2 (as a VlbenchError), not Hydra's several-line report."""
    from vlbench.distributed import init_from_env

    processes = init_from_env()  # under torchrun: join the process group before Hydra names the run directory
    if processes.distributed:
        os.environ[START_TIME_ENV] = repr(processes.broadcast(time.time()))
        if not processes.is_main:  # rank 0 alone writes the run directory (Hydra's own files included)
            sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled"]
    # Hydra raises what goes wrong instead of printing it: composition errors reach us (below); the app's body
    # reports its own errors as before (a VlbenchError: one line and exit 2; any other: its traceback)
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        app()
    except (HydraException, OmegaConfBaseException, VlbenchError) as error:
        if _raised_in_the_run(error):  # a sweep's failed job, re-raised by Hydra after the other jobs
            raise
        exit_with_error(error if isinstance(error, VlbenchError) else composition_error_line(error))
    finally:
        if processes.distributed:
            import torch.distributed as dist

            dist.destroy_process_group()


if __name__ == "__main__":
    main()
