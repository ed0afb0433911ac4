"""Preemption: a signal mid-training writes a resumable checkpoint and exits 75; a killed run resumes exactly.

Runs are real processes started from a forkserver (forking pytest itself can deadlock): the CLI's ``main()`` or
the runner, with every step slowed by a sleep (numbers unchanged) so that a signal lands mid-training.
"""

import json
import multiprocessing
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file

from tests.conftest import FAST, SMALL_WORLD
from tests.test_distributed import _as_torchrun_starts_it, free_port
from vlbench.errors import VlbenchError
from vlbench.runner import PREEMPTED_EXIT_STATUS, run

FORK = multiprocessing.get_context("forkserver")  # a clean process: forking pytest itself (threads) can deadlock


def _slow_steps(seconds: float) -> None:
    import vlbench.runner as runner

    original = runner.gradient_norm

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return original(*args, **kwargs)

    runner.gradient_norm = slow


def _cli(argv: list[str], slow_s: float, stdout: str | None = None) -> None:
    from vlbench.cli import main

    if stdout:  # a forkserver child does not write to the test's stdout: the test reads this file
        sys.stdout = open(stdout, "w", buffering=1)  # noqa: SIM115 (lives as long as the process)
    _slow_steps(slow_s)
    sys.argv = ["vlbench", *argv]
    main()


def _runner(cfg, run_dir: str) -> None:
    _slow_steps(0.2)
    run(cfg, Path(run_dir))


def logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.endswith("}")]
    return [e["step"] for e in lines if "train/loss" in e]


def join_or_kill(process, timeout: float) -> None:
    """Join; a process still alive after ``timeout`` is killed and the test fails (instead of leaving it running)."""
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()
        raise AssertionError(f"the run did not end within {timeout} s")


def wait_for_step(process, run_dir: Path, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while max(logged_steps(run_dir), default=0) < step:
        assert process.is_alive(), f"the run ended before step {step} (exit {process.exitcode})"
        assert time.time() < deadline, f"no step {step} logged in {timeout} s"
        time.sleep(0.05)


def newest_saved_step(checkpoints: Path) -> int:
    """The step resume will continue from. A kill between a save's renames leaves no ``last.state.pt`` for a moment
    (the pair is then ``last-previous.*``, which resume puts back): read every whole state file, not one name."""
    steps = []
    for path in checkpoints.glob("*last*.state.pt*"):
        try:
            steps.append(torch.load(path, weights_only=True)["step"])
        except Exception:  # a temporary file cut by the kill is no checkpoint
            continue
    assert steps, f"no readable trainer state in {checkpoints}: {sorted(p.name for p in checkpoints.iterdir())}"
    return max(steps)


def test_sigterm_checkpoints_exits_75_and_the_same_command_resumes(tmp_path, cache_dir):
    argv = [
        "model=textonly", "trainer.max_steps=20", "run_id=r", f"results_dir={tmp_path}/runs",
        f"data.cache_dir={cache_dir}", *SMALL_WORLD, *FAST[1:],
    ]  # fmt: skip
    run_dir = tmp_path / "runs" / "textonly" / "vqa" / "r"
    stdout = tmp_path / "stdout.txt"
    process = FORK.Process(target=_cli, args=(argv, 0.2, str(stdout)))
    process.start()
    wait_for_step(process, run_dir, 3)
    os.kill(process.pid, signal.SIGTERM)
    join_or_kill(process, 60)
    assert process.exitcode == PREEMPTED_EXIT_STATUS == 75
    state = torch.load(run_dir / "checkpoints" / "last.state.pt", weights_only=True)
    stopped = state["step"]
    assert 3 <= stopped < 20 and logged_steps(run_dir) == list(range(1, stopped + 1))
    assert load_file(run_dir / "checkpoints" / "last.safetensors")  # loads
    assert not (run_dir / "result.json").exists() and not (run_dir / "failed.json").exists()
    out = stdout.read_text()
    assert f"SIGTERM: stopped after step {stopped}/20 with a checkpoint; continue with resume={run_dir}" in out

    process = FORK.Process(target=_cli, args=([*argv, f"resume={run_dir}"], 0.0))
    process.start()
    join_or_kill(process, 120)
    assert process.exitcode == 0
    result = json.loads((run_dir / "result.json").read_text())
    assert result["steps"] == 20 and logged_steps(run_dir) == list(range(1, 21))


def test_sigkill_then_resume_equals_an_uninterrupted_run(make_cfg, tmp_path):
    """Checkpoints every step; SIGKILL lands anywhere (even mid-write: the previous pair stays whole)."""
    overrides = ("model=albef", "trainer.max_steps=12", "trainer.checkpoint_every=1", "trainer.test_checkpoint=last")
    straight = run(make_cfg(*overrides), tmp_path / "straight")
    process = FORK.Process(target=_runner, args=(make_cfg(*overrides), str(tmp_path / "killed")))
    process.start()
    wait_for_step(process, tmp_path / "killed", 3)
    os.kill(process.pid, signal.SIGKILL)
    join_or_kill(process, 30)
    killed_at = newest_saved_step(tmp_path / "killed" / "checkpoints")
    assert 2 <= killed_at < 12
    resumed = run(make_cfg(*overrides, f"resume={tmp_path / 'killed'}"), tmp_path / "killed")
    assert resumed["steps"] == 12 and resumed["metrics"] == straight["metrics"]
    a = load_file(tmp_path / "straight" / "checkpoints" / "last.safetensors")
    b = load_file(tmp_path / "killed" / "checkpoints" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def curve(run_dir: Path) -> list[tuple[int, float]]:
        lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(e["step"], e["train/loss"]) for e in lines if "train/loss" in e]

    assert curve(tmp_path / "killed") == curve(tmp_path / "straight") and len(curve(tmp_path / "straight")) == 12


def _process_of_two(rank: int, cfg, run_dir: str, port: int) -> None:
    _as_torchrun_starts_it(rank, port)
    _slow_steps(0.2)
    try:
        result = run(cfg, Path(run_dir))
        (Path(run_dir) / f"returned-{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def test_a_signal_to_one_of_two_processes_stops_both_at_the_same_step(make_cfg, tmp_path):
    """torchrun forwards SIGTERM to every process, but one alone may get it (kill <pid>): they agree every step."""
    cfg = make_cfg("model=textonly", "trainer.max_steps=40")
    context = mp.start_processes(
        _process_of_two, args=(cfg, str(tmp_path), free_port()), nprocs=2, join=False, start_method="forkserver"
    )
    wait_for_step(context.processes[0], tmp_path, 2)
    os.kill(context.pids()[1], signal.SIGTERM)
    deadline = time.time() + 300
    while not context.join(10):
        if time.time() > deadline:  # a rank stuck in a collective: fail, do not hang CI
            for process in context.processes:
                process.kill()
            raise AssertionError("the two processes did not stop within 300 s of the signal")
    returned = [json.loads((tmp_path / f"returned-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["preempted"] for r in returned] == ["a signal to another process", "SIGTERM"]
    stopped = returned[0]["stopped_at_step"]
    assert returned[1]["stopped_at_step"] == stopped < 40
    assert torch.load(tmp_path / "checkpoints" / "last.state.pt", weights_only=True)["step"] == stopped


def test_resume_auto_starts_a_new_run_and_continues_a_stopped_one(make_cfg, tmp_path):
    """What a requeued SLURM job does: the same command again, in the same run directory."""
    overrides = ("model=textonly", "trainer.max_steps=4", "resume=auto")
    stopped = run(make_cfg(*overrides, "trainer.stop_at_step=2"), tmp_path / "r")
    assert stopped["stopped_at_step"] == 2
    finished = run(make_cfg(*overrides), tmp_path / "r")
    assert finished["steps"] == 4 and logged_steps(tmp_path / "r") == [1, 2, 3, 4]


def test_resume_auto_without_a_checkpoint_starts_the_log_over(make_cfg, tmp_path):
    """A job killed before its first checkpoint and launched again starts from step 0: its log must not keep the
    killed attempt's steps (they would appear twice)."""
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 9.0}\n{"step": 2, "train/loss": 8.0}\n{"st')
    run(make_cfg("model=textonly", "trainer.max_steps=3", "resume=auto"), run_dir)
    assert logged_steps(run_dir) == [1, 2, 3]
    assert all(
        e["train/loss"] not in (9.0, 8.0)
        for e in map(json.loads, (run_dir / "metrics.jsonl").open())
        if "train/loss" in e
    )


def test_a_relaunched_grid_neither_resumes_nor_rewrites_a_finished_run(make_cfg, tmp_path):
    """The grid (+experiment=suite: resume=auto, reuse_finished=true) re-launched over its own run directories: a
    finished run keeps its record as it was (it used to be resumed at its last step: evaluated again, its record
    rewritten with the wall time of that evaluation alone); a stopped one continues, its wall time covering both
    launches."""
    overrides = (
        "model=textonly",
        "trainer.max_steps=4",
        "resume=auto",
        "reuse_finished=true",
        f"reuse_root={tmp_path}",
    )
    run(make_cfg(*overrides, "trainer.stop_at_step=2"), tmp_path / "r")
    first_launch = torch.load(tmp_path / "r" / "checkpoints" / "last.state.pt", weights_only=True)["wall_s"]
    finished = run(make_cfg(*overrides), tmp_path / "r")
    assert finished["wall_s"] > first_launch > 0
    record = (tmp_path / "r" / "result.json").read_bytes()
    log = (tmp_path / "r" / "metrics.jsonl").read_bytes()
    assert run(make_cfg(*overrides), tmp_path / "r") == finished
    with pytest.raises(VlbenchError, match=r"resume=.*: this run already finished .*; nothing to resume"):
        run(make_cfg(*overrides[:-3], f"resume={tmp_path / 'r'}", *overrides[-2:]), tmp_path / "r")
    assert (tmp_path / "r" / "result.json").read_bytes() == record and (
        tmp_path / "r" / "metrics.jsonl"
    ).read_bytes() == log


def test_a_kill_between_the_renames_of_a_save_recovers_the_newest_whole_pair(tmp_path):
    """Replays ``save_resumable_checkpoint``'s file operations stopped after each one: recovery always finds a
    whole pair (weights and trainer state of one step), the new one as soon as both its files are complete."""
    import shutil

    from vlbench.results import RunRecord

    model = torch.nn.Linear(2, 2)
    record = RunRecord(tmp_path / "saved")
    record.save_resumable_checkpoint("last", model, {"step": 1})
    names = record._resumable_names("last")
    (weights, state), (tmp_weights, tmp_state), (old_weights, old_state) = names
    record.save_resumable_checkpoint("last", model, {"step": 2})  # last = step 2, previous = step 1
    # the save's steps, from a checkpoint of step 1 and a new pair of step 2 fully written
    start = {weights: 1, state: 1, tmp_weights: 2, tmp_state: 2}
    renames = [(weights, old_weights), (state, old_state), (tmp_state, state), (tmp_weights, weights)]
    sources = {1: (old_weights, old_state), 2: (weights, state)}
    for done in range(len(renames) + 1):
        case = RunRecord(tmp_path / f"killed-after-{done}")
        case.checkpoints.mkdir(parents=True)
        for path, step in start.items():
            source = sources[step][0 if ".safetensors" in path.name else 1]
            shutil.copy(source, case.checkpoints / path.name)
        for old, new in renames[:done]:
            (case.checkpoints / old.name).replace(case.checkpoints / new.name)
        case.recover_resumable_checkpoint("last")
        assert case.checkpoint_step("last") == 2, done
        assert torch.load(case.checkpoints / "last.state.pt", weights_only=True)["step"] == 2, done
    cut = RunRecord(tmp_path / "cut-new-pair")  # killed while writing the new weights: the old pair stays
    cut.checkpoints.mkdir(parents=True)
    shutil.copy(old_weights, cut.checkpoints / weights.name)
    shutil.copy(old_state, cut.checkpoints / state.name)
    (cut.checkpoints / tmp_weights.name).write_bytes(weights.read_bytes()[:50])
    cut.recover_resumable_checkpoint("last")
    assert cut.checkpoint_step("last") == 1
    assert torch.load(cut.checkpoints / "last.state.pt", weights_only=True)["step"] == 1
