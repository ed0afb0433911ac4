"""The `vlbench` and `vlbench-data` entry points as a user runs them: help, config printing, bad input."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SMALL_WORLD
from vlbench.schema import TrainerConfig

VLBENCH = [sys.executable, "-m", "vlbench.cli"]
TRAINER_KEYS = ", ".join(sorted(f.name for f in dataclasses.fields(TrainerConfig)))  # listed in a bad key's message


def vlbench(*args: str, cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLBENCH_CACHE": str(cache), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([*VLBENCH, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("vlbench: error:")]


def test_help_and_cfg_job(tmp_path, cache_dir):
    proc = vlbench("--help", cwd=tmp_path, cache=cache_dir)
    assert proc.returncode == 0 and "model: albef, lxmert, majority, pixelbert, textonly, unimo3" in proc.stdout
    assert "task: gqa, nlvr2, nlvr2_ta, pretrain, retrieval, vqa" in proc.stdout
    assert "experiment: albef_nlvr2, albef_nlvr2_ta, albef_pretrain" in proc.stdout
    proc = vlbench("--cfg", "job", "trainer.max_steps=50", "scale=tiny", "seed=3", cwd=tmp_path, cache=cache_dir)
    assert proc.returncode == 0
    assert "max_steps: 50" in proc.stdout and "seed: 3" in proc.stdout


@pytest.mark.parametrize(
    ("override", "line"),
    [
        ("trainer.max_stepz=5", f"unknown config key 'trainer.max_stepz' (known keys of trainer: {TRAINER_KEYS})"),
        (
            "trainer.max_steps=many",
            "Error merging override trainer.max_steps=many: Value 'many' of type 'str' could not be converted to "
            "Integer",
        ),
        ("model=alberf", "model=alberf: no such option in config group 'model' (available: albef, lxmert, majority, "),
        ("seed=[1", "seed=[1: cannot parse this override (no viable alternative at input '[1'"),
        ("+trainer.max_stepz=5", f"unknown config key 'trainer.max_stepz' (known keys of trainer: {TRAINER_KEYS})"),
        ("+model.typo=3", "unknown config key 'model.typo' (known keys of model: alpha, "),
        ("+nosuchkey=1", "unknown config key 'nosuchkey' (known keys at the top level: data, deterministic, "),
    ],
)
def test_bad_overrides_fail_at_start(tmp_path, cache_dir, override, line):
    """Composition errors and keys added with `+` that no schema declares: one line, exit 2, nothing written."""
    proc = vlbench(override, f"results_dir={tmp_path}/runs", cwd=tmp_path, cache=cache_dir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith(f"vlbench: error: {line}"), proc.stderr
    assert proc.stdout == "" and not (tmp_path / "runs").exists()


def test_unknown_key_in_a_sweep_fails_before_any_job_runs(tmp_path, cache_dir):
    """A `+` key in a sweep's common overrides is checked before the sweep directory exists; one added by a swept
    value, as its first job starts (before the job runs)."""
    common = vlbench(
        "-m", "seed=0,1", "+trainer.nosuch=1", f"hydra.sweep.dir={tmp_path}/sweep", cwd=tmp_path, cache=cache_dir
    )
    swept = vlbench("-m", "+trainer.nosuch=1,2", f"hydra.sweep.dir={tmp_path}/swept", cwd=tmp_path, cache=cache_dir)
    for proc in (common, swept):
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert error_lines(proc) == [error_lines(common)[0]]
        assert error_lines(proc)[0].startswith("vlbench: error: unknown config key 'trainer.nosuch' (known keys of ")
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "sweep").exists()
    assert not list(tmp_path.rglob("metrics.jsonl")) and not list(tmp_path.rglob("failed.json"))


def bad_data_run(tmp_path: Path, cache: Path, root: Path) -> subprocess.CompletedProcess:
    return vlbench(
        "model=textonly",
        f"data.root={root}",
        "trainer.max_steps=2",
        "trainer.progress=false",
        f"results_dir={tmp_path}/runs",
        *SMALL_WORLD,
        cwd=tmp_path,
        cache=cache,
    )


def corrupt_copy(small_world: Path, tmp_path: Path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(small_world, root)
    return root


def assert_one_line_error(proc, tmp_path, *fragments):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = error_lines(proc)
    assert len(lines) == 1, proc.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[0]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("result.json"))


def test_missing_data_root(tmp_path, cache_dir):
    proc = bad_data_run(tmp_path, cache_dir, tmp_path / "nowhere")
    assert_one_line_error(proc, tmp_path, f"data.root={tmp_path / 'nowhere'}", "directory not found")


def test_corrupt_questions_file(tmp_path, cache_dir, small_world):
    root = corrupt_copy(small_world, tmp_path)
    path = root / "v2_OpenEnded_mscoco_train2014_questions.json"
    path.write_text(path.read_text()[:500])
    proc = bad_data_run(tmp_path, cache_dir, root)
    assert_one_line_error(proc, tmp_path, str(path), "not valid JSON")


def test_question_whose_image_is_missing(tmp_path, cache_dir, small_world):
    root = corrupt_copy(small_world, tmp_path)
    questions = json.loads((root / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())["questions"]
    image = root / "images" / "val2014" / f"COCO_val2014_{questions[0]['image_id']:012d}.png"
    image.unlink()
    proc = bad_data_run(tmp_path, cache_dir, root)
    assert_one_line_error(proc, tmp_path, f"question {questions[0]['question_id']}", str(image), "does not exist")


def test_vlbench_data_synth_and_inspect(tmp_path):
    out = tmp_path / "world"
    cmd = [sys.executable, "-m", "vlbench.data.cli"]
    proc = subprocess.run(
        [*cmd, "synth", "--out", str(out), "--train", "10", "--val", "2", "--test", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(out / "vqav2")]
    assert (out / "vqav2" / "v2_mscoco_train2014_annotations.json").exists()
    assert (out / "vqav2" / "tokenizer.json").exists()
    proc = subprocess.run(
        [*cmd, "inspect", str(out / "vqav2"), "--subtype", "train2014"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "train2014: 50 questions on 10 images" in proc.stdout
    proc = subprocess.run([*cmd, "synth", "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    # another format goes next to the first, sizes given apply to it (NLVR2: sentences × 4 pairs)
    proc = subprocess.run(
        [*cmd, "synth", "--format", "nlvr2", "--out", str(out), "--train", "3", "--val", "1", "--test", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert len((out / "nlvr2" / "train.json").read_text().splitlines()) == 12
    assert sorted(p.name for p in out.iterdir()) == ["nlvr2", "vqav2"]


def test_multirun_sweep_writes_one_record_per_job(tmp_path, cache_dir):
    proc = vlbench(
        "-m",
        "model=majority",
        "seed=0,1",
        "trainer.max_steps=1",
        "trainer.progress=false",
        f"hydra.sweep.dir={tmp_path}/sweep",
        *SMALL_WORLD,
        cwd=tmp_path,
        cache=cache_dir,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = sorted(tmp_path.glob("sweep/**/result.json"))
    assert len(results) == 2
    assert sorted(json.loads(p.read_text())["seed"] for p in results) == [0, 1]


def test_wandb_logger_runs_offline(tmp_path, cache_dir):
    proc = vlbench(
        "model=majority",
        "logger=wandb",
        "trainer.max_steps=1",
        "trainer.progress=false",
        f"results_dir={tmp_path}/runs",
        "run_id=w",
        *SMALL_WORLD,
        cwd=tmp_path,
        cache=cache_dir,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "runs" / "majority" / "vqa" / "w"
    assert (run_dir / "result.json").exists() and (run_dir / "metrics.jsonl").read_text()
    assert list((run_dir / "wandb").glob("offline-run-*"))
