"""vlbench-leaderboard: run records → table (columns, types, spread), bootstrap CI, paired test, failures."""

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import SMALL_WORLD
from tests.test_cli import vlbench
from vlbench.errors import VlbenchError
from vlbench.leaderboard import (
    aggregate,
    bootstrap_ci,
    grouped,
    main,
    paired_bootstrap,
    read_runs,
    to_markdown,
)


def write_result(root, name, **fields):
    record = {
        "model": "albef", "task": "vqa", "scale": "tiny", "seed": 0, "head": "shared", "data": "synthetic",
        "split": "test", "main_metric": "accuracy", "metrics": {"accuracy": 50.0, "accuracy/yes/no": 60.0},
        "params": 1000, "train_samples": 640, "wall_s": 36.0, "flops_per_sample_forward": 12345,
        "git_sha": "abc123", "config_hash": "h1", "setting_hash": "s1", "setting_overrides": [],
    }  # fmt: skip
    record.update(fields)
    (root / name).mkdir(parents=True)
    (root / name / "result.json").write_text(json.dumps(record))


def exact_bootstrap_quantiles(values, q):
    """Every one of the n^n equally likely resamples, enumerated: the bootstrap distribution by hand."""
    means = sorted(np.mean(c) for c in itertools.product(values, repeat=len(values)))
    return np.quantile(means, q, method="inverted_cdf")


def test_bootstrap_ci_matches_the_enumerated_bootstrap():
    values = [70.0, 74.0, 79.0]
    low, high = bootstrap_ci(values, seed=0)
    exact_low, exact_high = exact_bootstrap_quantiles(values, [0.025, 0.975])
    assert low == pytest.approx(exact_low, abs=0.5) and high == pytest.approx(exact_high, abs=0.5)
    assert min(values) <= low < np.mean(values) < high <= max(values)
    assert bootstrap_ci(values, seed=0) == (low, high)  # fixed generator: same table from the same runs
    # with 3 values the 2.5/97.5 % quantiles are the extremes; with 5 (3,125 resamples) they lie strictly inside, so
    # this case tells a percentile bootstrap from (min, max) or a normal-theory interval
    values = [60.0, 70.0, 74.0, 79.0, 90.0]
    for confidence in (0.95, 0.8):
        tail = (1 - confidence) / 2
        exact_low, exact_high = exact_bootstrap_quantiles(values, [tail, 1 - tail])
        low, high = bootstrap_ci(values, confidence=confidence, seed=0)
        assert low == pytest.approx(exact_low, abs=0.4) and high == pytest.approx(exact_high, abs=0.4)
        assert min(values) < low and high < max(values)
    assert bootstrap_ci([5.0, 5.0, 5.0]) == (5.0, 5.0)
    assert all(np.isnan(bootstrap_ci([5.0])))


def test_paired_bootstrap_on_known_cases():
    ids = [str(i) for i in range(200)]
    always, never = {i: 1.0 for i in ids}, {i: 0.0 for i in ids}
    r = paired_bootstrap(always, never)
    assert r["difference"] == 1.0 and r["p_value"] == 0.0 and r["n"] == 200
    assert paired_bootstrap(always, dict(always))["p_value"] == 1.0
    # 3 examples better, 2 worse out of 200: no evidence of a difference
    a = {i: 1.0 for i in ids}
    b = {i: 1.0 if k >= 3 else 0.0 for k, i in enumerate(ids)}
    for i in ids[3:5]:
        a[i] = 0.0
    r = paired_bootstrap(a, b)
    assert r["difference"] == pytest.approx(1 / 200) and r["p_value"] > 0.5
    assert r["ci_low"] < 0 < r["ci_high"]
    # only the examples both runs scored are compared
    assert paired_bootstrap({"x": 1.0, "y": 0.0}, {"y": 1.0, "z": 0.0})["n"] == 1
    with pytest.raises(VlbenchError, match="share no scored example"):
        paired_bootstrap({"x": 1.0}, {"y": 1.0})


def test_aggregate_columns_types_and_spread(tmp_path):
    for seed, acc in enumerate([70.0, 74.0, 79.0]):
        write_result(tmp_path, f"albef-{seed}", seed=seed, metrics={"accuracy": acc, "accuracy/yes/no": acc + 1})
    write_result(tmp_path, "textonly-0", model="textonly", metrics={"accuracy": 51.0}, params=10)
    write_result(tmp_path, "ablation-0", setting_overrides=["model.distill=false"], setting_hash="s2")
    write_result(tmp_path, "albef-no-metric", seed=4, metrics={})  # finished without its main metric: no value
    (tmp_path / "crashed").mkdir()
    (tmp_path / "crashed" / "failed.json").write_text(
        json.dumps({"model": "albef", "task": "vqa", "scale": "tiny", "head": "shared", "data": "synthetic",
                    "seed": 3, "error": "VlbenchError: boom", "setting_overrides": []})
    )  # fmt: skip
    runs = read_runs(tmp_path)
    assert len(runs) == 7 and sorted(runs["status"].unique()) == ["failed", "finished"]
    table = aggregate(runs).set_index(["model", "setting"])
    row = table.loc[("albef", "")]
    assert row["mean"] == pytest.approx(np.mean([70, 74, 79]))
    assert row["std"] == pytest.approx(np.std([70, 74, 79], ddof=1))
    assert row["n_seeds"] == 3 and row["seeds"] == "0,1,2"  # the seeds of the values averaged
    assert row["metric:accuracy/yes/no"] == pytest.approx(np.mean([71, 75, 80]))
    assert row["failed"] == 1 and row["last_error"] == "VlbenchError: boom"
    assert row["ci95_low"] < row["mean"] < row["ci95_high"]
    assert row["device_hours"] == pytest.approx(4 * 36 / 3600)  # every finished run's compute, valued or not
    assert row["params"] == 1000 and row["flops_per_sample"] == 12345 and row["git_sha"] == "abc123"
    assert table.loc[("albef", "model.distill=false"), "n_seeds"] == 1
    single = table.loc[("textonly", "")]
    assert single["mean"] == 51.0 and np.isnan(single["std"]) and np.isnan(single["ci95_low"])
    numeric = ["mean", "std", "ci95_low", "ci95_high", "wall_s_mean", "device_hours"]
    assert all(pd.api.types.is_float_dtype(aggregate(runs)[c]) for c in numeric)


def test_fine_tuned_and_from_scratch_runs_of_one_setting_are_separate_rows(tmp_path):
    """``init_from`` is not one of the setting's overrides: without the init column the same budget's run from scratch
    and its fine-tunes from pre-training would be averaged into one row, seed 0 counted twice."""
    runs = tmp_path / "runs"
    overrides = ["budget=tiny_96k"]
    write_result(runs, "scratch0", seed=0, metrics={"accuracy": 60.0}, setting_overrides=overrides)
    for seed, acc in ((0, 78.0), (1, 78.5)):
        write_result(runs, f"ft{seed}", seed=seed, metrics={"accuracy": acc}, setting_overrides=overrides,
                     init_from=f"results/runs/albef/pretrain/seed{seed}")  # fmt: skip
    (runs / "ft2").mkdir()
    failed = {"model": "albef", "task": "vqa", "scale": "tiny", "head": "shared", "data": "synthetic", "seed": 2,
              "error": "boom", "setting_overrides": overrides, "init_from": "pretrained"}  # fmt: skip
    (runs / "ft2" / "failed.json").write_text(json.dumps(failed))
    table = aggregate(read_runs(runs)).set_index("init")
    assert table.loc["scratch", "mean"] == 60.0 and table.loc["scratch", "n_seeds"] == 1
    assert table.loc["fine-tuned", "mean"] == 78.25 and table.loc["fine-tuned", "seeds"] == "0,1"
    assert table.loc["fine-tuned", "failed"] == 1 and table.loc["scratch", "failed"] == 0  # the failure in its row
    assert "| tiny head=shared budget=tiny_96k fine-tuned |" in to_markdown(aggregate(read_runs(runs)))


def test_runs_in_other_arithmetic_are_other_rows_and_a_seed_counts_once(tmp_path, capsys):
    """A GPU run (``trainer.precision=auto``: bf16) never pools with CPU fp32 runs of the same overrides; a seed
    recorded twice (a re-run in another folder) is one draw, its newest record's value."""
    runs = tmp_path / "runs"
    for seed, acc in ((0, 70.0), (1, 74.0)):
        write_result(runs, f"cpu{seed}", seed=seed, metrics={"accuracy": acc}, device="cpu (x86_64, 2 threads)")
    write_result(runs, "gpu0", seed=0, metrics={"accuracy": 90.0}, device="NVIDIA H200", precision="bf16")
    write_result(runs, "gpu0-fp32", seed=0, metrics={"accuracy": 91.0}, device="NVIDIA H200", precision="fp32")
    write_result(runs, "cpu1-rerun", seed=1, metrics={"accuracy": 76.0}, device="cpu (x86_64, 1 threads)")
    write_result(runs, "cpu2", seed=2, metrics={"accuracy": 73.0}, device="cpu (x86_64, 2 threads)",
                 setting_overrides=["trainer.device=cpu"])  # what auto computes on a CPU: the same row  # fmt: skip
    older = runs / "cpu1" / "result.json"
    os.utime(older, (older.stat().st_mtime - 60, older.stat().st_mtime - 60))
    table = aggregate(read_runs(runs)).set_index("numerics")
    assert sorted(table.index) == ["cpu fp32", "cuda bf16", "cuda fp32"]
    cpu = table.loc["cpu fp32"]
    assert cpu["n_seeds"] == 3 and cpu["seeds"] == "0,1,2" and cpu["mean"] == 73.0  # 70, the re-run's 76, 73
    assert cpu["duplicate_records"] == 1 and table.loc["cuda bf16", "mean"] == 90.0
    assert "| tiny head=shared cuda bf16 |" in to_markdown(aggregate(read_runs(runs)))
    main(["--root", str(runs), "--no-plot"])
    assert "1 older record(s) of a seed already counted were left out" in capsys.readouterr().out


def test_a_paper_experiment_is_its_own_row_and_a_row_of_mixed_configurations_is_named(tmp_path, capsys):
    """`+experiment=albef_vqa` (a paper's lr, epochs, batch) never pools with the plain runs; `+experiment=suite` (how a
    grid runs) does. Runs of one row whose configurations still differ (a default changed between them) are named."""
    runs = tmp_path / "runs"
    write_result(runs, "plain0", seed=0, metrics={"accuracy": 70.0})
    write_result(runs, "suite1", seed=1, metrics={"accuracy": 72.0}, setting_overrides=["+experiment=suite"])
    write_result(runs, "paper0", seed=0, metrics={"accuracy": 90.0}, setting_overrides=["+experiment=albef_vqa"],
                 setting_hash="s2")  # fmt: skip
    table = aggregate(read_runs(runs)).set_index("setting")
    assert sorted(table.index) == ["", "+experiment=albef_vqa"]
    assert table.loc["", "n_seeds"] == 2 and table.loc["+experiment=albef_vqa", "mean"] == 90.0
    main(["--root", str(runs), "--no-plot"])
    assert "different configurations" not in capsys.readouterr().out
    write_result(runs, "plain2", seed=2, metrics={"accuracy": 71.0}, setting_hash="s3")  # another default
    main(["--root", str(runs), "--no-plot"])
    out = capsys.readouterr().out
    assert "note: albef vqa (no overrides): its runs computed 2 different configurations (config_hash s1,s3)" in out


def test_rows_carry_their_floor_and_say_when_they_do_not_clear_it(tmp_path, capsys):
    """A row at the answer prior is named; a row well above it is not; records without a floor leave it empty."""
    runs = tmp_path / "runs"
    prior = {"name": "answer prior", "metric": "accuracy", "value": 51.21, "split": "test", "examples": 3000}
    for seed, (at, above) in enumerate(((52.0, 72.0), (52.5, 73.0))):
        write_result(runs, f"pb{seed}", seed=seed, model="pixelbert", metrics={"accuracy": at}, floor=prior)
        write_result(runs, f"albef{seed}", seed=seed, metrics={"accuracy": above}, floor=prior)
    write_result(runs, "old0", model="lxmert", metrics={"accuracy": 90.0})  # written before runs kept their floor
    table = aggregate(read_runs(runs)).set_index("model")
    assert table.loc["pixelbert", "floor"] == 51.21 and table.loc["pixelbert", "above_floor"] is False  # 52.25 < 53.04
    assert table.loc["albef", "above_floor"] is True
    assert np.isnan(table.loc["lxmert", "floor"]) and pd.isna(table.loc["lxmert", "above_floor"])
    main(["--root", str(runs), "--no-plot"])
    out = capsys.readouterr().out
    assert "note: pixelbert vqa (no overrides): mean 52.25 does not clear the floor 51.21" in out
    assert "note: albef" not in out and "note: lxmert" not in out
    written = pd.read_csv(runs / "leaderboard.csv").set_index("model")
    assert list(written.loc[["albef", "pixelbert"], "above_floor"]) == [True, False]


def test_cli_writes_csv_markdown_png_and_filters(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in range(2):
        write_result(runs, f"a{seed}", seed=seed, metrics={"accuracy": 60.0 + seed})
        write_result(runs, f"g{seed}", seed=seed, task="gqa", metrics={"accuracy": 40.0 + seed})
    out = tmp_path / "board" / "leaderboard.csv"
    main(["--root", str(runs), "--out", str(out), "--task", "vqa"])
    csv = pd.read_csv(out)
    assert list(csv["task"]) == ["vqa"] and csv.loc[0, "mean"] == 60.5 and csv.loc[0, "n_seeds"] == 2
    for column in ("std", "ci95_low", "ci95_high", "params", "flops_per_sample", "train_samples", "wall_s_mean",
                   "device_hours", "git_sha", "config_hash", "failed", "numerics", "duplicate_records"):  # fmt: skip
        assert column in csv.columns
    assert out.with_suffix(".md").read_text().startswith("| model | task |")
    assert out.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    assert "60.50 ± 0.71" in capsys.readouterr().out
    main(["--root", str(runs), "--no-plot"])  # no --out: beside the runs, never over the committed reference table
    assert len(pd.read_csv(runs / "leaderboard.csv")) == 2 and (runs / "leaderboard.md").is_file()


def test_grouped_by_task_puts_tasks_in_columns_without_pooling_rows(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed, (vqa, gqa) in enumerate(((70.0, 40.0), (74.0, 44.0))):
        write_result(runs, f"albef-vqa-{seed}", seed=seed, metrics={"accuracy": vqa})
        write_result(runs, f"albef-gqa-{seed}", seed=seed, task="gqa", metrics={"accuracy": gqa})
    write_result(runs, "lxmert-vqa-0", model="lxmert", metrics={"accuracy": 80.0})
    write_result(runs, "albef-ablation", setting_overrides=["model.distill=false"], metrics={"accuracy": 10.0})
    wide = grouped(aggregate(read_runs(runs)), "task").set_index(["model", "setting"])
    assert list(wide.columns[-6:]) == ["gqa", "gqa std", "gqa n", "vqa", "vqa std", "vqa n"]
    albef = wide.loc[("albef", "")]
    assert (albef["vqa"], albef["gqa"], albef["vqa n"]) == (72.0, 42.0, 2)
    assert albef["vqa std"] == pytest.approx(np.std([70, 74], ddof=1))
    lxmert = wide.loc[("lxmert", "")]
    assert lxmert["vqa"] == 80.0 and lxmert["gqa n"] == 0 and np.isnan(lxmert["gqa"])
    assert wide.loc[("albef", "model.distill=false"), "vqa"] == 10.0  # its own row, not averaged into albef's
    out = tmp_path / "board" / "leaderboard.csv"
    main(["--root", str(runs), "--out", str(out), "--by", "task", "--no-plot"])
    markdown = (tmp_path / "board" / "leaderboard_by_task.md").read_text()
    assert markdown.startswith("| model | setting | gqa (accuracy) | vqa (accuracy) |")
    assert "| albef | tiny head=shared | 42.00 ± 2.83 (2) | 72.00 ± 2.83 (2) |" in markdown
    assert "| lxmert | tiny head=shared | — | 80.00 (1) |" in markdown
    assert pd.read_csv(tmp_path / "board" / "leaderboard_by_task.csv").shape == (
        3,
        7 + 6,
    )  # 7 row keys, 3 columns per task
    assert markdown in capsys.readouterr().out
    with pytest.raises(VlbenchError, match="--by mean: not a row key"):
        grouped(aggregate(read_runs(runs)), "mean")


def test_cli_errors_are_one_line(tmp_path):
    for args in (["--root", str(tmp_path / "nowhere")], ["--root", str(tmp_path)]):
        proc = subprocess.run([sys.executable, "-m", "vlbench.leaderboard", *args], capture_output=True, text=True)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1
        assert proc.stderr.startswith("vlbench-leaderboard: error:")


def test_slurm_launcher_config_composes(tmp_path, cache_dir):
    proc = vlbench(
        "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra", cwd=tmp_path, cache=cache_dir
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "SlurmLauncher" in proc.stdout and "partition: gpu" in proc.stdout and "gpus_per_node: 1" in proc.stdout


def test_sweep_with_a_failing_job_finishes_the_others(tmp_path, cache_dir):
    """Submitted through submitit (its local executor, the SLURM launcher's twin), one job of the sweep starts from a
    run that does not exist: it is recorded as failed, the other finishes, the leaderboard counts both."""
    proc = vlbench(
        "-m",
        "hydra/launcher=local_submitit",
        "model=textonly",
        f"init_from=null,{tmp_path}/no-such-run",
        "trainer.max_steps=2",
        "trainer.progress=false",
        f"hydra.sweep.dir={tmp_path}/sweep",
        *SMALL_WORLD,
        cwd=tmp_path,
        cache=cache_dir,
    )
    assert proc.returncode != 0  # Hydra reports the failed job once the sweep is over
    assert len(list((tmp_path / "sweep").rglob("result.json"))) == 1
    failed = list((tmp_path / "sweep").rglob("failed.json"))
    assert len(failed) == 1 and "no-such-run" in json.loads(failed[0].read_text())["error"]
    table = aggregate(read_runs(tmp_path / "sweep"))
    assert table["failed"].sum() == 1 and table["n_seeds"].sum() == 1
    # per-example scores are recorded for the paired test
    run_dir = next((tmp_path / "sweep").rglob("result.json")).parent
    scores = json.loads((run_dir / "scores_test.json").read_text())
    assert len(scores) == 24 * 3 and all(0.0 <= v <= 1.0 for v in scores.values())  # SMALL_WORLD's test questions
    accuracy = json.loads((run_dir / "result.json").read_text())["metrics"]["accuracy"]
    assert 100 * np.mean(list(scores.values())) == pytest.approx(accuracy, abs=0.01)


def test_archived_records_rebuild_the_same_table_without_weights(tmp_path, capsys):
    runs, archive = tmp_path / "runs", tmp_path / "reference"
    for seed in (0, 1):
        write_result(runs, f"albef/vqa/seed{seed}", seed=seed, metrics={"accuracy": 60.0 + seed})
        run_dir = runs / "albef" / "vqa" / f"seed{seed}"
        for name in ("config.yaml", "manifest.json", "scores_test.json", "metrics.jsonl", "predictions_test.json"):
            (run_dir / name).write_text("{}")
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "best.safetensors").write_bytes(b"weights")
    (runs / "lxmert" / "vqa" / "bad").mkdir(parents=True)
    (runs / "lxmert" / "vqa" / "bad" / "failed.json").write_text(json.dumps({"model": "lxmert", "error": "boom"}))
    main(["--archive", str(runs), "--root", str(archive), "--out", str(tmp_path / "board.csv"), "--no-plot"])
    assert "archived the records of 3 runs" in capsys.readouterr().out
    kept = sorted(str(p.relative_to(archive)) for p in archive.rglob("*") if p.is_file())
    assert kept == [
        "albef/vqa/seed0/config.yaml", "albef/vqa/seed0/manifest.json", "albef/vqa/seed0/result.json",
        "albef/vqa/seed0/scores_test.json", "albef/vqa/seed1/config.yaml", "albef/vqa/seed1/manifest.json",
        "albef/vqa/seed1/result.json", "albef/vqa/seed1/scores_test.json", "lxmert/vqa/bad/failed.json",
    ]  # fmt: skip
    pd.testing.assert_frame_equal(aggregate(read_runs(archive)), aggregate(read_runs(runs)))
    with pytest.raises(SystemExit):
        main(["--archive", str(tmp_path / "nowhere"), "--root", str(archive)])
    assert "--archive" in capsys.readouterr().err
    # a grid's setting only: the other runs in the same results folder (a demo run) stay out of the reference
    write_result(runs, "albef/vqa/grid0", seed=0, setting_overrides=["budget=tiny_96k"])
    (runs / "albef" / "vqa" / "failed-grid").mkdir()
    failed = {"model": "albef", "error": "boom", "setting_overrides": ["budget=tiny_96k"]}
    (runs / "albef" / "vqa" / "failed-grid" / "failed.json").write_text(json.dumps(failed))
    grid = tmp_path / "grid-reference"
    main(["--archive", str(runs), "--archive-setting", "budget=tiny_96k", "--root", str(grid), "--no-plot",
          "--out", str(tmp_path / "grid.csv")])  # fmt: skip
    assert "archived the records of 2 runs" in capsys.readouterr().out
    assert sorted(str(p.parent.relative_to(grid)) for p in grid.rglob("*.json")) == [
        "albef/vqa/failed-grid", "albef/vqa/grid0"
    ]  # fmt: skip


def test_student_t_quantiles_match_the_tables():
    from vlbench.reproduction import student_t_quantile

    table = {(0.975, 1): 12.7062, (0.975, 2): 4.3027, (0.975, 3): 3.1824, (0.975, 10): 2.2281, (0.95, 5): 2.0150}
    for (p, df), expected in table.items():
        assert student_t_quantile(p, df) == pytest.approx(expected, abs=1e-4)
    with pytest.raises(VlbenchError, match="0.5 < p < 1"):
        student_t_quantile(0.3, 4)


def test_reproduction_judges_each_rerun_against_the_reference_prediction_interval(tmp_path, capsys):
    reference, reruns = tmp_path / "reference", tmp_path / "reruns"
    for seed, accuracy in enumerate((80.0, 82.0, 84.0)):  # mean 82, std 2: 95 % interval ± 4.3027 · 2 · √(4/3)
        write_result(reference, f"vqa{seed}", seed=seed, metrics={"accuracy": accuracy})
        write_result(reference, f"base{seed}", seed=seed, model="textonly", metrics={"accuracy": 50.0})
    write_result(reference, "gqa0", task="gqa", metrics={"accuracy": 40.0})  # one seed: nothing to judge against
    write_result(reruns, "vqa0", seed=0, metrics={"accuracy": 91.0})  # z = +4.5 but inside ± 9.94
    write_result(reruns, "vqa1", seed=1, metrics={"accuracy": 72.0})  # 10 below: outside
    write_result(reruns, "base0", seed=0, model="textonly", metrics={"accuracy": 50.0})  # exactly the baseline
    write_result(reruns, "gqa0", task="gqa", metrics={"accuracy": 47.0})
    write_result(reruns, "nlvr0", task="nlvr2", metrics={"accuracy": 47.0})  # no reference row at all
    (reruns / "vqa2").mkdir()  # a re-run that raised: not reproduced, whatever the reference
    failed = {"model": "albef", "task": "vqa", "scale": "tiny", "seed": 2, "head": "shared", "data": "synthetic",
              "setting_overrides": [], "error": "VlbenchError: boom"}  # fmt: skip
    (reruns / "vqa2" / "failed.json").write_text(json.dumps(failed))
    from vlbench.reproduction import compare_with_reference

    table = compare_with_reference(read_runs(reruns), read_runs(reference)).set_index(["model", "task", "seed"])
    half_width = 4.302653 * 2 * (4 / 3) ** 0.5
    vqa0, vqa1 = table.loc[("albef", "vqa", 0)], table.loc[("albef", "vqa", 1)]
    assert vqa0["reference_mean"] == 82.0 and vqa0["reference_std"] == pytest.approx(2.0)
    assert vqa0["half_width"] == pytest.approx(half_width, abs=1e-5) and vqa0["z"] == pytest.approx(4.5)
    assert vqa0["within"] and vqa0["same_seed_reference"] == 80.0
    assert not vqa1["within"] and vqa1["same_seed_reference"] == 82.0
    assert table.loc[("albef", "vqa", 2), "within"] is False and "boom" in table.loc[("albef", "vqa", 2), "error"]
    assert table.loc[("textonly", "vqa", 0), "within"] and table.loc[("textonly", "vqa", 0), "half_width"] == 0.0
    for unjudged in (("albef", "gqa", 0), ("albef", "nlvr2", 0)):
        assert pd.isna(table.loc[unjudged, "within"])

    with pytest.raises(SystemExit) as stopped:  # the CLI: table, verdict, exit 1 (2 not reproduced)
        main(["--root", str(reruns), "--reproduce", str(reference)])
    assert stopped.value.code == 1
    out = capsys.readouterr().out
    assert "reproduction: 2 of 4 re-runs inside the reference seeds' 95 % prediction interval" in out
    assert "outside: albef vqa seed 1 (72.00 vs 82.00 ± 2.00), albef vqa seed 2 (failed: VlbenchError: boom)" in out
    assert "re-runs' summed run time: 180 s (0.05 h, one process each)" in out  # 5 finished × 36 s, the failed none
    board = tmp_path / "board.csv"
    with pytest.raises(SystemExit) as stopped:  # the filters apply: the baseline alone is inside
        main(["--root", str(reruns), "--reproduce", str(reference), "--model", "textonly", "--out", str(board)])
    assert stopped.value.code == 0 and "1 of 1 re-runs inside" in capsys.readouterr().out
    assert not board.exists()  # a check writes no table


def test_reproduction_judges_each_rows_mean_so_a_shift_of_every_seed_is_caught(tmp_path, capsys):
    """Three re-runs each 7–9 above the reference mean (std 2) are each inside their ± 9.94 interval, but their mean
    (+8) is outside the interval for a mean of three: ± t(0.975, 2) · 2 · √(1/3 + 1/3) = ± 7.03."""
    reference, reruns = tmp_path / "reference", tmp_path / "reruns"
    for seed, accuracy in enumerate((80.0, 82.0, 84.0)):
        write_result(reference, f"vqa{seed}", seed=seed, metrics={"accuracy": accuracy})
        write_result(reference, f"gqa{seed}", seed=seed, task="gqa", metrics={"accuracy": accuracy})
        write_result(reference, f"base{seed}", seed=seed, model="textonly", metrics={"accuracy": 50.0})
    for seed, accuracy in enumerate((89.0, 90.0, 91.0)):
        write_result(reruns, f"vqa{seed}", seed=seed, metrics={"accuracy": accuracy})
    write_result(reruns, "vqa0-again", seed=0, metrics={"accuracy": 89.0})  # a seed re-run twice counts once in a row
    write_result(reruns, "gqa1", seed=1, task="gqa", metrics={"accuracy": 88.0})  # one seed: the per-run interval
    write_result(reruns, "base0", seed=0, model="textonly", metrics={"accuracy": 50.0})
    write_result(reruns, "nlvr0", task="nlvr2", metrics={"accuracy": 47.0})  # no reference row
    from vlbench.reproduction import compare_rows, compare_with_reference, prediction_half_width

    runs = compare_with_reference(read_runs(reruns), read_runs(reference))
    assert runs["within"].dropna().all()  # every re-run alone is inside
    rows = compare_rows(read_runs(reruns), read_runs(reference)).set_index(["model", "task"])
    vqa, gqa = rows.loc[("albef", "vqa")], rows.loc[("albef", "gqa")]
    assert vqa["rerun_n"] == 3 and vqa["rerun_mean"] == 90.0 and vqa["difference"] == 8.0
    assert vqa["half_width"] == pytest.approx(4.302653 * 2 * (2 / 3) ** 0.5, abs=1e-5) and not vqa["within"]
    assert gqa["half_width"] == pytest.approx(prediction_half_width(2.0, 3)) and gqa["within"]  # 6 < 9.94
    assert rows.loc[("textonly", "vqa"), "within"] and rows.loc[("textonly", "vqa"), "half_width"] == 0.0
    assert pd.isna(rows.loc[("albef", "nlvr2"), "within"])
    with pytest.raises(VlbenchError, match="at least one new draw"):
        prediction_half_width(2.0, 3, new=0)

    with pytest.raises(SystemExit) as stopped:  # the CLI: every run inside, one row's mean outside → exit 1
        main(["--root", str(reruns), "--reproduce", str(reference)])
    out = capsys.readouterr().out
    assert stopped.value.code == 1 and "reproduction: 6 of 6 re-runs inside" in out
    assert "rows: 2 of 3 rows' re-run means inside the 95 % prediction interval for a mean of that many seeds" in out
    assert "outside: albef vqa (90.00 over 3 vs 82.00 ± 2.00)" in out
    row = "| albef | vqa | tiny head=shared | accuracy | 90.00 (3) | 82.00 ± 2.00 (3) | +8.00 | ± 7.03 | **no** |"
    assert row in out


def test_a_rerun_of_another_configuration_is_named_not_judged(tmp_path, capsys):
    """A preset changed since the reference ran keeps the row's name (model, task, setting overrides) but computes
    something else: such a re-run is listed as another configuration, neither inside nor outside."""
    reference, reruns = tmp_path / "reference", tmp_path / "reruns"
    for seed, accuracy in enumerate((80.0, 82.0, 84.0)):
        write_result(reference, f"vqa{seed}", seed=seed, metrics={"accuracy": accuracy})
        write_result(reference, f"gqa{seed}", seed=seed, task="gqa", metrics={"accuracy": accuracy})
    write_result(reruns, "vqa0", seed=0, metrics={"accuracy": 30.0}, setting_hash="s2")  # far off, but not the same
    write_result(reruns, "gqa0", seed=0, task="gqa", metrics={"accuracy": 30.0}, setting_hash="s2")
    write_result(reruns, "gqa1", seed=1, task="gqa", metrics={"accuracy": 83.0})  # the reference's configuration
    from vlbench.reproduction import compare_rows, compare_with_reference

    runs = compare_with_reference(read_runs(reruns), read_runs(reference)).set_index(["task", "seed"])
    assert pd.isna(runs.loc[("vqa", 0), "within"]) and pd.isna(runs.loc[("gqa", 0), "within"])
    assert runs.loc[("vqa", 0), "note"] == "another configuration (setting s2, reference s1)"
    assert runs.loc[("gqa", 1), "within"] and pd.isna(runs.loc[("gqa", 1), "note"])
    rows = compare_rows(read_runs(reruns), read_runs(reference)).set_index("task")
    assert pd.isna(rows.loc["vqa", "within"]) and "another configuration" in rows.loc["vqa", "note"]
    assert rows.loc["gqa", "rerun_n"] == 1 and rows.loc["gqa", "rerun_mean"] == 83.0  # the s2 re-run is left out
    assert rows.loc["gqa", "within"]
    with pytest.raises(SystemExit) as stopped:
        main(["--root", str(reruns), "--reproduce", str(reference)])
    out = capsys.readouterr().out
    assert stopped.value.code == 0
    assert (
        "1 of 1 re-runs inside the reference seeds' 95 % prediction interval (0 without a reference spread, 2 of "
        "another configuration)" in out
    )
    assert "| — (another configuration (setting s2, reference s1)) |" in out
    assert "rows: 1 of 1 rows' re-run means inside" in out and "1 of another configuration)" in out


def test_reproduction_parts_archived_on_different_machines_are_judged_together(tmp_path, capsys):
    """`make reproduce REPRO_ARCHIVE=...`: each session's re-runs (its machine keeps no outputs/) are copied into a
    folder kept in git and judged there, so the parts add up (a seed re-run in two sessions is two re-runs)."""
    reference, kept = tmp_path / "reference", tmp_path / "kept"
    grid = {"setting_overrides": ["budget=tiny_96k"]}
    for seed, accuracy in enumerate((80.0, 82.0, 84.0)):
        write_result(reference, f"vqa{seed}", seed=seed, metrics={"accuracy": accuracy}, **grid)
    for part, seeds in (("monday", (0, 1)), ("tuesday", (1, 2))):
        runs = tmp_path / part / "runs"
        for seed in seeds:
            write_result(runs, f"albef/vqa/seed{seed}", seed=seed, metrics={"accuracy": 81.0 + seed}, **grid)
        write_result(runs, "albef/vqa/demo", seed=9, metrics={"accuracy": 10.0})  # another setting: not archived
        with pytest.raises(SystemExit) as stopped:
            main(["--archive", str(runs), "--archive-setting", "budget=tiny_96k", "--root", str(kept / part),
                  "--reproduce", str(reference)])  # fmt: skip
        assert stopped.value.code == 0
        assert f"{len(seeds)} of {len(seeds)} re-runs inside" in capsys.readouterr().out
    with pytest.raises(SystemExit) as stopped:
        main(["--root", str(kept), "--reproduce", str(reference)])
    out = capsys.readouterr().out
    assert stopped.value.code == 0 and "4 of 4 re-runs inside" in out and "run time: 144 s" in out


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_reproduce_runs_the_grid_apart_from_the_reference_and_checks_it(tmp_path):
    """`make reproduce` must neither reuse the reference records nor write into results/: every grid command runs
    under REPRO_ROOT (runs, sweep directory, reuse root), and the last line judges the re-runs against the records."""
    root = tmp_path / "repro"
    repo = Path(__file__).resolve().parents[1]

    def commands(target, *extra):
        make = ["make", "-n", "--no-print-directory", target, f"REPRO_ROOT={root}", "GRID_SEEDS=0", *extra]
        dry = subprocess.run(make, cwd=repo, capture_output=True, text=True, check=True)
        return [c.strip() for c in dry.stdout.replace("\\\n", " ").split(";") if "bin/vlbench" in c]

    reproduce = commands("reproduce")
    grid = [c for c in reproduce if "bin/vlbench -m" in c]
    assert len(grid) == 3  # pre-training, fine-tuning, baselines
    for command in grid:
        for override in (f"results_dir={root}/runs", f"hydra.sweep.dir={root}/runs", f"reuse_root={root}"):
            assert override in command.split(), (override, command)
    assert reproduce[-1].endswith(f"vlbench-leaderboard --root {root}/runs --reproduce results/reference")
    # a part of the grid: some fine-tuning tasks, no baselines (pre-training always first)
    part = [c for c in commands("reproduce", "GRID_TASKS=retrieval,nlvr2", "GRID_BASELINES=") if "bin/vlbench -m" in c]
    swept = [[w for w in c.split() if w.startswith(("task=", "seed="))] for c in part]
    assert swept == [["task=pretrain", "seed=0"], ["task=retrieval,nlvr2", "seed=0"]]
    baselines = [c for c in commands("reproduce", "GRID_TASKS=retrieval,nlvr2") if "init_from=null" in c]
    assert len(baselines) == 1 and "task=nlvr2 " in baselines[0]  # retrieval has no blind baseline
    # REPRO_ARCHIVE: the records go to a folder kept in git, and that folder (all parts so far) is judged
    archived = commands("reproduce", f"REPRO_ARCHIVE={tmp_path / 'kept'}")
    assert archived[:-1] == reproduce[:-1]
    assert archived[-1].split()[1:] == [
        "--archive", f"{root}/runs", "--archive-setting", "budget=tiny_96k", "--root", str(tmp_path / "kept"),
        "--reproduce", "results/reference",
    ]  # fmt: skip
    leaderboard = commands("leaderboard")
    assert len([c for c in leaderboard if "bin/vlbench -m" in c]) == 3
    assert not any(str(root) in c for c in leaderboard)  # the reference grid keeps its own places
