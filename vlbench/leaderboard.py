"""`vlbench-leaderboard`: every run under a results root → one table with spread, cost and provenance.

A row is one model × task × setting (scale, head, data, from scratch or fine-tuned, the arithmetic — ``cpu fp32``,
``cuda bf16`` — and the run's overrides other than the seed), one value per seed (a seed recorded twice counts once:
its newest record); its columns are
the main metric's mean, standard deviation over seeds, number of seeds, 95 % bootstrap confidence interval of the mean,
the per-type breakdown means, parameters, forward FLOPs per sample, training samples seen, wall-clock, device-hours,
the code versions (git sha) and the configuration hash. Failed runs (a ``failed.json`` without ``result.json``) are
counted per row with their last error, so a sweep's failures are visible in the table.

Why a bootstrap CI over seeds: with 3 seeds a normal-theory interval is too narrow to trust and a t-interval assumes
a shape we do not know; the percentile bootstrap of the mean is the common, assumption-light choice. It is computed
with a fixed generator seed, so the same results give the same CSV.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from vlbench.config_hash import is_setting_override, record_identity
from vlbench.errors import VlbenchError
from vlbench.floor import clears_floor

# "init": from scratch or fine-tuned from another run's weights (init_from), which the setting's overrides leave out;
# "numerics": device kind and resolved precision (trainer.precision=auto is bf16 on a GPU, fp32 on a CPU)
GROUP_KEYS = ["model", "task", "scale", "head", "data", "init", "numerics", "setting"]
BOOTSTRAP_RESAMPLES = 10_000


def bootstrap_ci(
    values: Sequence[float], confidence: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean; (nan, nan) for fewer than two values (no spread to resample)."""
    x = np.asarray(values, dtype=float)
    if x.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(resamples, x.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def paired_bootstrap(
    scores_a: dict[str, float], scores_b: dict[str, float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> dict[str, float]:
    """Paired bootstrap test of mean(a) − mean(b) over the examples both were scored on (Koehn 2004; Berg-Kirkpatrick
    et al. 2012): resample examples with replacement, recompute the difference; two-sided p-value = twice the share
    of resampled differences on the other side of zero (capped at 1)."""
    common = sorted(set(scores_a) & set(scores_b))
    if not common:
        raise VlbenchError("paired test: the two runs share no scored example (different tasks or splits?)")
    a = np.array([scores_a[k] for k in common], dtype=float)
    b = np.array([scores_b[k] for k in common], dtype=float)
    diff = a - b
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, diff.size, size=(resamples, diff.size))].mean(axis=1)
    observed = float(diff.mean())
    if observed == 0 and not diff.any():
        p_value = 1.0
    else:
        other_side = (means <= 0).mean() if observed > 0 else (means >= 0).mean()
        p_value = float(min(1.0, 2 * other_side))
    low, high = np.quantile(means, [0.025, 0.975])
    return {"n": len(common), "mean_a": float(a.mean()), "mean_b": float(b.mean()), "difference": observed,
            "ci_low": float(low), "ci_high": float(high), "p_value": p_value}  # fmt: skip


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise VlbenchError(f"{path}: not a readable JSON run record ({e})") from e


def _setting_of(record: dict) -> str:
    """The overrides that define the setting (seed excluded); empty for records written before runs kept them."""
    overrides = [o for o in record.get("setting_overrides") or [] if is_setting_override(o)]  # today's rule
    return " ".join(overrides)


def init_kind(record: dict) -> str:
    """``scratch`` or ``fine-tuned`` (the run started from another run's or a file's weights): a leaderboard row never
    mixes the two, which share their overrides (``init_from`` is not one of the setting's)."""
    return "fine-tuned" if record.get("init_from") else "scratch"


def run_row(path: Path, record: dict, status: str) -> dict:
    """One run as a flat row (finished: its metrics; failed: its error)."""
    metrics = record.get("metrics", {})
    main = record.get("main_metric")
    row = {key: record.get(key) for key in ("model", "task", "scale", "head", "data", "seed", "split")}
    config_hash, setting_hash, numerics = record_identity(path.parent, record)  # today's results-neutral keys
    row.update(
        {
            "init": init_kind(record),
            "numerics": numerics,
            "setting": _setting_of(record),
            "setting_hash": setting_hash,
            "status": status,
            "error": record.get("error"),
            "run_dir": str(path.parent),
            "init_from": record.get("init_from"),
            "checkpoint": record.get("checkpoint"),
            "main_metric": main,
            "value": metrics.get(main) if main else None,
            "params": record.get("params"),
            "flops_per_sample": record.get("flops_per_sample_forward"),
            "train_samples": record.get("train_samples"),
            "wall_s": record.get("wall_s"),
            "device_hours": (record.get("wall_s") or 0) * record.get("num_devices", 1) / 3600,
            "device": record.get("device"),
            "git_sha": record.get("git_sha"),
            "config_hash": config_hash,
            "floor": (record.get("floor") or {}).get("value"),  # what a model that learned nothing scores
            "floor_examples": (record.get("floor") or {}).get("examples"),
            "recorded_at": path.stat().st_mtime,  # which of two records of one seed is the newer
        }
    )
    for name, value in metrics.items():
        if name != main:
            row[f"metric:{name}"] = value
    return row


RECORD_FILES = ("result.json", "failed.json", "config.yaml", "manifest.json", "scores_*.json")


def archive_records(source: Path, archive: Path, setting: str | None = None) -> int:
    """Copy the small records of every finished or failed run under ``source`` (its result or error, config,
    manifest and per-example scores; no weights, predictions or logs) to the same relative place under ``archive``;
    with ``setting`` (e.g. ``"budget=tiny_96k"``) only the runs of that setting (their overrides other than seed,
    model, task, ...).
    Why: run directories are git-ignored and hold checkpoints; the reference leaderboard is built from records kept in
    git, so a grid run over several sessions (whole model × seed chains each) adds up. The setting filter keeps a
    user's other runs in the same results folder (``make demo``, experiments) out of the reference. Returns the runs
    copied."""
    source, archive = Path(source), Path(archive)
    if not source.is_dir():
        raise VlbenchError(f"--archive {source}: no such results directory")
    run_dirs = {p.parent for name in ("result.json", "failed.json") for p in source.rglob(name)}
    if setting is not None:
        wanted = " ".join(setting.split())
        run_dirs = {d for d in run_dirs if _setting_of(_read_json(_record_file(d))) == wanted}
    for run_dir in sorted(run_dirs):
        target = archive / run_dir.relative_to(source)
        target.mkdir(parents=True, exist_ok=True)
        for pattern in RECORD_FILES:
            for path in run_dir.glob(pattern):
                shutil.copy2(path, target / path.name)
    return len(run_dirs)


def _record_file(run_dir: Path) -> Path:
    """A run's record: result.json once it finished, failed.json if it raised."""
    finished = run_dir / "result.json"
    return finished if finished.is_file() else run_dir / "failed.json"


def read_runs(root: Path) -> pd.DataFrame:
    """Every finished run (``result.json``) and failed run (``failed.json`` alone) under ``root``, one row each."""
    root = Path(root)
    if not root.is_dir():
        raise VlbenchError(f"{root}: no such results directory")
    rows = []
    for path in sorted(root.rglob("result.json")):
        rows.append(run_row(path, _read_json(path), "finished"))
    for path in sorted(root.rglob("failed.json")):
        if not (path.parent / "result.json").exists():
            rows.append(run_row(path, _read_json(path), "failed"))
    if not rows:
        raise VlbenchError(f"{root}: no result.json or failed.json below it — nothing to tabulate")
    return pd.DataFrame(rows)


def _joined(values: pd.Series) -> str:
    return ",".join(sorted({str(v)[:12] for v in values.dropna()}))


def one_record_per_seed(done: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """(the finished runs of a row keeping each seed's newest record, how many older ones were dropped). Two records
    of one seed (a re-run in another folder, an archived copy beside the run) are one draw of the seed-to-seed spread,
    not two: counting both would narrow the CI. A record without a seed is kept."""
    if "recorded_at" in done.columns:
        done = done.sort_values("recorded_at", kind="stable")
    seeded = done["seed"].notna()
    kept = done[~seeded | ~done["seed"].duplicated(keep="last")]
    return kept.sort_index(), len(done) - len(kept)


def aggregate(runs: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """One row per model × task × setting: mean, std, n, bootstrap CI, breakdown means, cost and provenance."""
    runs = runs.copy()
    for key in GROUP_KEYS:
        runs[key] = runs[key].fillna("").astype(str)
    metric_columns = sorted(c for c in runs.columns if c.startswith("metric:"))
    rows = []
    for key, group in runs.groupby(GROUP_KEYS, sort=True):
        done, duplicates = one_record_per_seed(group[group["status"] == "finished"])
        values = done["value"].dropna().astype(float).to_numpy()
        low, high = bootstrap_ci(values, seed=seed)
        failed = group[group["status"] == "failed"]
        row = dict(zip(GROUP_KEYS, key, strict=True))
        row.update(
            {
                "main_metric": _joined(done["main_metric"]) or _joined(group["main_metric"]),
                "mean": float(values.mean()) if values.size else float("nan"),
                "std": float(values.std(ddof=1)) if values.size > 1 else float("nan"),
                "n_seeds": int(values.size),
                "ci95_low": low,
                "ci95_high": high,
                "seeds": ",".join(str(int(s)) for s in sorted(done.loc[done["value"].notna(), "seed"].dropna())),
                "failed": len(failed),
                "duplicate_records": duplicates,
                **_floor_columns(values, done),
                "last_error": failed["error"].dropna().iloc[-1] if failed["error"].notna().any() else "",
            }
        )
        for column in metric_columns:
            row[column] = float(done[column].astype(float).mean()) if done[column].notna().any() else float("nan")
        row.update(
            {
                "params": int(done["params"].max()) if done["params"].notna().any() else pd.NA,
                "flops_per_sample": int(done["flops_per_sample"].max())
                if done["flops_per_sample"].notna().any()
                else pd.NA,
                "train_samples": int(done["train_samples"].max()) if done["train_samples"].notna().any() else pd.NA,
                "wall_s_mean": float(done["wall_s"].mean()) if done["wall_s"].notna().any() else float("nan"),
                "device_hours": float(done["device_hours"].sum()),
                "git_sha": _joined(done["git_sha"]),
                "config_hash": _joined(done["setting_hash"]),
            }
        )
        rows.append(row)
    return pd.DataFrame(rows)


def _floor_columns(values: np.ndarray, done: pd.DataFrame) -> dict:
    """``floor`` (the seeds' recorded floor, one value for one data split) and ``above_floor`` (does the mean clear it
    by two standard errors, vlbench/floor.py); empty for records written before runs kept their floor."""
    recorded = done["floor"].dropna() if "floor" in done.columns else pd.Series(dtype=float)
    if recorded.empty or not values.size:
        return {"floor": float("nan"), "above_floor": pd.NA}
    floor = {"value": float(recorded.astype(float).mean()), "examples": int(done["floor_examples"].dropna().min())}
    return {"floor": floor["value"], "above_floor": clears_floor(float(values.mean()), floor)}


def init_label(kind: str) -> str:
    """The Markdown tables' setting names a fine-tuned row; from scratch is the default, left unsaid."""
    return "fine-tuned" if kind == "fine-tuned" else ""


def to_markdown(table: pd.DataFrame) -> str:
    """A compact Markdown table: the comparison columns only (the CSV has everything)."""
    header = "| model | task | setting | metric | mean ± std | 95 % CI | seeds | params | train samples | failed |"
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in table.itertuples(index=False):
        setting = " ".join(x for x in (f"{r.scale}", f"head={r.head}", r.numerics, r.setting, init_label(r.init)) if x)
        spread = f"{r.mean:.2f} ± {r.std:.2f}" if r.n_seeds > 1 else (f"{r.mean:.2f}" if r.n_seeds else "—")
        ci = f"[{r.ci95_low:.2f}, {r.ci95_high:.2f}]" if r.n_seeds > 1 else "—"
        params = f"{int(r.params) / 1e6:.2f} M" if not pd.isna(r.params) else "—"
        samples = f"{int(r.train_samples):,}" if not pd.isna(r.train_samples) else "—"
        lines.append(
            f"| {r.model} | {r.task} | {setting} | {r.main_metric} | {spread} | {ci} | {r.n_seeds} | {params} "
            f"| {samples} | {r.failed} |"
        )
    return "\n".join(lines) + "\n"


def grouped(table: pd.DataFrame, by: str) -> pd.DataFrame:
    """The table with one of its row keys turned into columns — ``by="task"``: a row per model × setting and a
    column per task, the layout of a paper's results table; ``by="model"``: a column per model. Each value of ``by``
    gets ``<value>`` (mean), ``<value> std`` and ``<value> n`` columns; no value is pooled across rows."""
    if by not in GROUP_KEYS:
        raise VlbenchError(f"--by {by}: not a row key (choose from {', '.join(GROUP_KEYS)}; --sort orders rows)")
    keys = [k for k in GROUP_KEYS if k != by]
    values = sorted(table[by].astype(str).unique())
    rows = []
    for key, group in table.groupby(keys, sort=True, dropna=False):
        row = dict(zip(keys, key, strict=True))
        for value in values:
            cell = group[group[by].astype(str) == value]
            found = not cell.empty and int(cell["n_seeds"].iloc[0]) > 0
            row[value] = float(cell["mean"].iloc[0]) if found else float("nan")
            row[f"{value} std"] = float(cell["std"].iloc[0]) if found else float("nan")
            row[f"{value} n"] = int(cell["n_seeds"].iloc[0]) if not cell.empty else 0
        rows.append(row)
    wide = pd.DataFrame(rows)
    metrics = {v: table.loc[table[by].astype(str) == v, "main_metric"].unique() for v in values}
    wide.attrs["metric"] = {v: str(m[0]) for v, m in metrics.items() if len(m) == 1}  # one metric per column
    return wide


def grouped_markdown(wide: pd.DataFrame, by: str) -> str:
    """``grouped`` as Markdown: the row's setting, then ``mean ± std (n)`` per value of ``by``."""
    keys = [k for k in GROUP_KEYS if k != by]
    values = [c for c in wide.columns if c not in keys and not c.endswith((" std", " n"))]
    named = [k for k in ("model", "task") if k in keys]
    metric = wide.attrs.get("metric", {})
    titles = [f"{v} ({metric[v]})" if v in metric else v for v in values]
    header = "| " + " | ".join([*named, "setting", *titles]) + " |"
    lines = [header, "|" + "---|" * (len(named) + 1 + len(values))]
    for r in wide.to_dict("records"):
        setting = " ".join(
            str(x)
            for x in (r.get("scale"), r.get("head") and f"head={r['head']}", r.get("numerics"), r.get("setting"),
                      init_label(r.get("init", "")))
            if x
        )  # fmt: skip
        cells = []
        for v in values:
            n = r[f"{v} n"]
            if n == 0 or pd.isna(r[v]):
                cells.append("—")
            else:
                cells.append(f"{r[v]:.2f} ± {r[f'{v} std']:.2f} ({n})" if n > 1 else f"{r[v]:.2f} (1)")
        lines.append("| " + " | ".join([*(str(r[k]) for k in named), setting, *cells]) + " |")
    return "\n".join(lines) + "\n"


def plot(table: pd.DataFrame, path: Path) -> None:
    """One panel per task: each model × setting's mean with its 95 % CI as an error bar."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    tasks = sorted(table["task"].unique())
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        rows = table[(table["task"] == task) & (table["n_seeds"] > 0)]
        labels = [" ".join(x for x in (r.model, r.head, r.setting) if x) for r in rows.itertuples()]
        means = rows["mean"].to_numpy(dtype=float)
        low = np.where(np.isnan(rows["ci95_low"].to_numpy(dtype=float)), means, rows["ci95_low"].to_numpy(dtype=float))
        high = np.where(
            np.isnan(rows["ci95_high"].to_numpy(dtype=float)), means, rows["ci95_high"].to_numpy(dtype=float)
        )
        ax.bar(range(len(rows)), means, yerr=[means - low, high - means], capsize=4, color="tab:blue", alpha=0.8)
        ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
        ax.set_title(task)
        ax.set_ylabel(_joined(rows["main_metric"]))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_leaderboard(table: pd.DataFrame, out: Path, with_plot: bool = True) -> list[Path]:
    """CSV, Markdown and (optionally) PNG next to each other; written whole or not at all (temp file + rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out, out.with_suffix(".md")]
    staged = [p.with_name(f".{p.name}.tmp") for p in paths]
    table.to_csv(staged[0], index=False)
    staged[1].write_text(to_markdown(table), encoding="utf-8")
    if with_plot:
        paths.append(out.with_suffix(".png"))
        staged.append(out.with_name(f".{out.stem}.tmp.png"))
        plot(table, staged[2])
    for tmp, final in zip(staged, paths, strict=True):
        tmp.replace(final)
    return paths


def example_scores(run_dir: Path, split: str = "test") -> dict[str, float]:
    """A finished run's per-example scores (``scores_<split>.json``: example id → score), for the paired test."""
    path = Path(run_dir) / f"scores_{split}.json"
    if not path.exists():
        raise VlbenchError(f"{path}: no per-example scores (runs record them from this version on)")
    return {str(k): float(v) for k, v in _read_json(path).items()}


def _filtered(runs: pd.DataFrame, args: argparse.Namespace) -> pd.DataFrame:
    if args.task:
        runs = runs[runs["task"].isin(args.task)]
    if args.model:
        runs = runs[runs["model"].isin(args.model)]
    if runs.empty:
        raise VlbenchError("no run matches the --task/--model filters")
    return runs


def _report_reproduction(args: argparse.Namespace) -> int:
    from vlbench.reproduction import compare_rows, compare_with_reference, outside, report_markdown, rows_markdown

    reruns, reference = _filtered(read_runs(Path(args.root)), args), read_runs(Path(args.reproduce))
    table = compare_with_reference(reruns, reference, args.level)
    rows = compare_rows(reruns, reference, args.level)
    print(report_markdown(table, args.level))
    print("The leaderboard's rows: the re-runs' mean over their seeds against the reference row\n")
    print(rows_markdown(rows, args.level))
    return 1 if not (outside(table).empty and outside(rows).empty) else 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vlbench-leaderboard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default="results/runs", help="directory searched for result.json / failed.json")
    parser.add_argument(
        "--out",
        default=None,
        help="CSV path; .md and .png are written beside (default: <root>/leaderboard.csv, beside the runs it sums up, "
        "so that the committed reference table in results/ is rewritten only when asked: make leaderboard)",
    )
    parser.add_argument("--task", action="append", help="keep only these tasks (repeatable)")
    parser.add_argument("--model", action="append", help="keep only these models (repeatable)")
    parser.add_argument("--sort", default=None, help="sort rows by this column (default: task, then mean descending)")
    parser.add_argument(
        "--by",
        default=None,
        help="also write a table grouped by this row key, its values as columns (e.g. task: a row per model and "
        "setting, a column per task) to <out>_by_<key>.{csv,md}",
    )
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument(
        "--compare", nargs=2, metavar=("RUN_A", "RUN_B"), help="paired bootstrap test between two run directories"
    )
    parser.add_argument("--split", default="test", help="split of the per-example scores for --compare")
    parser.add_argument(
        "--archive", metavar="RUNS", help="first copy the records (no weights) of the runs under RUNS into --root"
    )
    parser.add_argument(
        "--archive-setting",
        metavar="OVERRIDES",
        help="--archive only the runs of this setting, e.g. 'budget=tiny_96k' ('' for runs without overrides)",
    )
    parser.add_argument(
        "--reproduce",
        metavar="REFERENCE",
        help="judge each finished or failed run under --root against the reference records under REFERENCE (their "
        "seed spread), and each row's re-run mean against the reference row; writes nothing, exits 1 when a run or a "
        "row's mean falls outside or a run failed",
    )
    parser.add_argument(
        "--level", type=float, default=0.95, help="--reproduce: level of the prediction interval (default 0.95)"
    )
    args = parser.parse_args(argv)
    try:
        if args.archive:
            copied = archive_records(Path(args.archive), Path(args.root), args.archive_setting)
            print(f"archived the records of {copied} runs in {args.root}")
        if args.reproduce:
            sys.exit(_report_reproduction(args))
        if args.compare:
            a, b = (example_scores(Path(d), args.split) for d in args.compare)
            r = paired_bootstrap(a, b)
            print(
                f"{r['n']} examples: A {r['mean_a']:.4f}  B {r['mean_b']:.4f}  A−B {r['difference']:+.4f} "
                f"(95 % CI [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}])  paired bootstrap p = {r['p_value']:.4f}"
            )
            return
        table = aggregate(_filtered(read_runs(Path(args.root)), args))
        if args.sort:
            if args.sort not in table.columns:
                raise VlbenchError(f"--sort {args.sort}: not a column (choose from {', '.join(table.columns)})")
            table = table.sort_values(args.sort, kind="stable")
        else:
            table = table.sort_values(["task", "mean"], ascending=[True, False], kind="stable")
        wide = grouped(table, args.by) if args.by else None
        out = Path(args.out) if args.out else Path(args.root) / "leaderboard.csv"
        paths = write_leaderboard(table, out, with_plot=not args.no_plot)
        if wide is not None:
            wide_csv = out.with_name(f"{out.stem}_by_{args.by}.csv")
            wide.to_csv(wide_csv, index=False)
            wide_csv.with_suffix(".md").write_text(grouped_markdown(wide, args.by), encoding="utf-8")
            paths += [wide_csv, wide_csv.with_suffix(".md")]
    except VlbenchError as e:
        print(f"vlbench-leaderboard: error: {e}", file=sys.stderr)
        sys.exit(2)
    print(to_markdown(table) if wide is None else grouped_markdown(wide, args.by))
    for r in table[table["duplicate_records"] > 0].itertuples(index=False):
        print(
            f"note: {r.model} {r.task}: {r.duplicate_records} older record(s) of a seed already counted were left out"
        )
    for r in table[table["above_floor"].eq(False).fillna(False).astype(bool)].itertuples(index=False):
        print(
            f"note: {r.model} {r.task} ({r.setting or 'no overrides'}): mean {r.mean:.2f} does not clear the floor "
            f"{r.floor:.2f} (what a model that learned nothing scores: answer prior or chance)"
        )
    for r in table[table["config_hash"].str.contains(",", na=False)].itertuples(index=False):
        n_configs = r.config_hash.count(",") + 1
        print(
            f"note: {r.model} {r.task} ({r.setting or 'no overrides'}): its runs computed {n_configs} "
            f"different configurations (config_hash {r.config_hash}) — a default or a config file changed between "
            "them; compare their config.yaml before trusting the row's spread"
        )
    print("wrote " + ", ".join(str(p) for p in paths))


if __name__ == "__main__":
    main()
