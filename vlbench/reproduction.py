"""Does a re-run reproduce the reference leaderboard? Each re-run's number against the reference runs' seed spread.

A re-run of the grid (or of a part of it, say one model × seed chain) on another machine or from newer code is not
bitwise equal to the records it re-does: CPU kernels round differently and 1,500 tiny steps amplify it. What the
leaderboard promises is agreement *up to the seed-to-seed spread it states*. So each finished re-run is compared with
the reference rows of the same model × task × setting: the mean and standard deviation over the reference seeds, the
z-score of the re-run's value against them, the value the reference run of the same seed got, and a verdict: is the
value inside the reference seeds' 95 % *prediction interval* for one more seed,
``mean ± t(0.975, n − 1) · std · sqrt(1 + 1/n)``? Why a prediction interval and not "± 2 std": with 3 seeds the
sample std is itself uncertain (it understates the spread about half the time), and a new run is a new draw, not
the mean — the Student-t prediction interval accounts for both (for n = 3 it is ± 4.97 std). Where the reference
seeds agree exactly (blind baselines) the re-run must equal them. A re-run that failed reproduced nothing.

The leaderboard reports each row's *mean*, so the re-runs' mean over their seeds is judged too (``compare_rows``):
inside ``mean ± t(0.975, n − 1) · std · sqrt(1/m + 1/n)`` for m re-run seeds? A change that moves every seed by
+3 std leaves each re-run inside its own interval (± 4.97 std) but not the mean of three (± 3.51 std): a shift of
the whole row is what a code or machine difference looks like, and the per-run check alone would miss it.

Only a re-run of the reference's own configuration is judged: a row is named by model, task, scale, setting
overrides..., and a preset changed since the reference ran keeps that name while computing something else. A re-run
whose setting hash (its resolved config minus seed and results-neutral keys) is not the reference row's is listed
as "another configuration", not judged.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from vlbench.errors import VlbenchError
from vlbench.leaderboard import GROUP_KEYS as ROW_KEYS  # a re-run is compared with its leaderboard row
from vlbench.leaderboard import init_label, one_record_per_seed

# the columns of a re-run that is not judged against a spread (no reference row, one reference seed, or failed)
UNJUDGED = {"reference_mean": math.nan, "reference_std": math.nan, "reference_n": 0, "same_seed_reference": math.nan,
            "z": math.nan, "half_width": math.nan, "within": math.nan, "note": None}  # fmt: skip

# compare_rows' columns (also when every re-run failed and there is no row to judge)
ROW_COLUMNS = [*ROW_KEYS, "main_metric", "rerun_mean", "rerun_n", "reference_mean", "reference_std", "reference_n",
               "difference", "z", "half_width", "within", "note"]  # fmt: skip

EXACT = 1e-6  # reference seeds that agree to this are a point, not a spread


def student_t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 0.5) of Student's t with ``df`` degrees of freedom: closed forms for 1 and 2, else
    bisection on the CDF integrated numerically (Simpson over [0, x]; exact to ~1e-9 here, no SciPy needed)."""
    if not 0.5 < p < 1 or df < 1:
        raise VlbenchError(f"t quantile: expected 0.5 < p < 1 and df ≥ 1, got p={p}, df={df}")
    if df == 1:
        return math.tan(math.pi * (p - 0.5))
    if df == 2:
        return (2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p)))
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def cdf(x: float) -> float:
        t = np.linspace(0.0, x, 20_001)
        density = np.exp(log_norm - (df + 1) / 2 * np.log1p(t * t / df))
        weights = np.ones_like(t)
        weights[1:-1:2], weights[2:-1:2] = 4, 2
        return 0.5 + float((weights * density).sum() * (t[1] - t[0]) / 3)

    low, high = 0.0, 1.0
    while cdf(high) < p:
        low, high = high, 2 * high
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if cdf(mid) < p else (low, mid)
    return (low + high) / 2


def prediction_half_width(std: float, n: int, level: float = 0.95, new: int = 1) -> float:
    """Half-width of the Student-t prediction interval for the mean of ``new`` new draws (one run: ``new=1``), from
    n reference draws of sample std."""
    if new < 1:
        raise VlbenchError(f"prediction interval: expected at least one new draw, got {new}")
    return student_t_quantile(0.5 + level / 2, n - 1) * std * math.sqrt(1 / new + 1 / n)


def _reference_rows(reference: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """The reference's finished records by leaderboard row, one record per seed (as the leaderboard counts them)."""
    ref = reference[reference["status"] == "finished"].copy()
    for key in ROW_KEYS:
        ref[key] = ref[key].fillna("").astype(str)
    return {key: one_record_per_seed(group)[0] for key, group in ref.groupby(ROW_KEYS, sort=False)}


def _other_configuration(setting_hash: object, reference: pd.DataFrame) -> str | None:
    """None when a re-run computed the reference row's configuration (or either side recorded no hash), else why not."""
    hashes = sorted({str(h) for h in reference["setting_hash"].dropna()}) if "setting_hash" in reference else []
    if not hashes or setting_hash is None or pd.isna(setting_hash) or str(setting_hash) in hashes:
        return None
    return f"another configuration (setting {setting_hash}, reference {','.join(hashes)})"


def _judge(difference: float, values: np.ndarray, level: float, new: int = 1) -> dict:
    """z (in reference std), the interval's half-width and the verdict for a difference from the reference mean;
    reference seeds that agree exactly are a point the re-run must hit; one reference seed gives no verdict (NaN)."""
    if values.size < 2:
        return {"z": math.nan, "half_width": math.nan, "within": math.nan}
    std = float(values.std(ddof=1))
    if std <= EXACT:
        z = 0.0 if abs(difference) <= EXACT else math.copysign(math.inf, difference)
        return {"z": z, "half_width": 0.0, "within": bool(abs(difference) <= EXACT)}
    half_width = prediction_half_width(std, values.size, level, new)
    return {"z": difference / std, "half_width": half_width, "within": bool(abs(difference) <= half_width)}


def compare_with_reference(reruns: pd.DataFrame, reference: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """One row per re-run: its value, the reference row's mean/std/n, the same seed's reference value, z-score, the
    prediction interval's half-width and ``within`` (the verdict). A failed re-run is judged not reproduced (its
    error in ``error``); re-runs with no reference row, or one reference seed (no spread), get ``within = NaN``."""
    _check_inputs(reruns, level)
    groups = _reference_rows(reference)
    rows = []
    for run in reruns.itertuples(index=False):
        key = tuple("" if pd.isna(getattr(run, k)) else str(getattr(run, k)) for k in ROW_KEYS)
        row = dict(zip(ROW_KEYS, key, strict=True))
        value = float(run.value) if run.value is not None and not pd.isna(run.value) else math.nan
        row.update({"seed": run.seed, "main_metric": run.main_metric, "value": value, "git_sha": run.git_sha,
                    "wall_s": run.wall_s, "error": run.error if run.status == "failed" else None})  # fmt: skip
        group = groups.get(key)
        if run.status == "failed" or group is None or group["value"].dropna().empty:
            rows.append({**row, **UNJUDGED, "within": False if run.status == "failed" else math.nan})
            continue
        other = _other_configuration(getattr(run, "setting_hash", None), group)
        if other:
            rows.append({**row, **UNJUDGED, "note": other})
            continue
        values = group["value"].dropna().astype(float).to_numpy()
        same_seed = group.loc[group["seed"] == run.seed, "value"].dropna()
        row.update(
            reference_mean=float(values.mean()),
            reference_std=float(values.std(ddof=1)) if values.size > 1 else math.nan,
            reference_n=int(values.size),
            same_seed_reference=float(same_seed.iloc[0]) if not same_seed.empty else math.nan,
        )
        row.update(_judge(value - row["reference_mean"], values, level), note=None)
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["model", "task", "setting", "seed"], kind="stable", ignore_index=True)


def _check_inputs(reruns: pd.DataFrame, level: float) -> None:
    if not 0 < level < 1:
        raise VlbenchError(f"--level {level}: expected a probability between 0 and 1")
    if reruns.empty or not reruns["status"].isin(["finished", "failed"]).any():
        raise VlbenchError("no finished or failed run to compare with the reference")


def compare_rows(reruns: pd.DataFrame, reference: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """One row per leaderboard row with finished re-runs: the re-runs' mean over their seeds (one record per seed,
    as the leaderboard counts), their number, the reference row's mean/std/n, the difference of the means, and the
    verdict — inside the prediction interval for the mean of that many new draws? Failed re-runs are judged per run
    (``compare_with_reference``), not here; re-runs of another configuration than the reference row's are left out
    (a row with only those gets a ``note``); a row without a reference spread gets ``within = NaN``."""
    _check_inputs(reruns, level)
    groups = _reference_rows(reference)
    done = reruns[reruns["status"] == "finished"].copy()
    for key in ROW_KEYS:
        done[key] = done[key].fillna("").astype(str)
    if "setting_hash" not in done:
        done["setting_hash"] = None
    rows = []
    for key, group in done.groupby(ROW_KEYS, sort=True):
        reference_group = groups.get(key)
        notes = group["setting_hash"].map(
            lambda h, ref=reference_group: None if ref is None else _other_configuration(h, ref)
        )
        same = group[notes.isna()]
        kept = one_record_per_seed(same if not same.empty else group)[0]
        values = kept["value"].dropna().astype(float).to_numpy()
        if not values.size:
            continue
        row = dict(zip(ROW_KEYS, key, strict=True))
        row.update(main_metric=str(kept["main_metric"].iloc[0]), rerun_mean=float(values.mean()),
                   rerun_n=int(values.size))  # fmt: skip
        reference_values = np.array([]) if reference_group is None else reference_group["value"].dropna().to_numpy()
        if same.empty or not reference_values.size:  # only another configuration, or no reference to judge against
            rows.append({**row, **UNJUDGED, "difference": math.nan, "note": notes.iloc[0] if same.empty else None})
            continue
        reference_values = reference_values.astype(float)
        mean = float(reference_values.mean())
        row.update(
            reference_mean=mean,
            reference_std=float(reference_values.std(ddof=1)) if reference_values.size > 1 else math.nan,
            reference_n=int(reference_values.size),
            difference=row["rerun_mean"] - mean,
        )
        row.update(_judge(row["difference"], reference_values, level, new=int(values.size)), note=None)
        rows.append(row)
    return pd.DataFrame(rows, columns=ROW_COLUMNS)


def _number(x: float, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _setting(r: tuple) -> str:
    return " ".join(x for x in (r.scale, f"head={r.head}", r.numerics, r.setting, init_label(r.init)) if x)


def _noted(note: object) -> str:
    return f" ({note})" if isinstance(note, str) else ""


def _unjudged(table: pd.DataFrame) -> str:
    """How many were not judged, and why: no reference spread, or another configuration than the reference's."""
    unjudged = table[table["within"].isna()]
    other = int(unjudged["note"].map(lambda n: isinstance(n, str)).sum())
    also = f", {other} of another configuration" if other else ""
    return f"{len(unjudged) - other} without a reference spread{also}"


def _verdict(within: object) -> str:
    return "—" if isinstance(within, float) and math.isnan(within) else ("yes" if within else "**no**")


def report_markdown(table: pd.DataFrame, level: float = 0.95) -> str:
    """The comparison as a Markdown table and a one-line verdict."""
    header = (
        "| model | task | setting | seed | metric | re-run | same seed (ref.) | ref. mean ± std (n) | z "
        "| interval | within |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in table.itertuples(index=False):
        spread = f"{_number(r.reference_mean)} ± {_number(r.reference_std)} ({r.reference_n})"
        z = "—" if math.isnan(r.z) else (f"{r.z:+.2f}" if math.isfinite(r.z) else f"{r.z:+}")
        verdict = _verdict(r.within) + (" (failed)" if isinstance(r.error, str) else "") + _noted(r.note)
        lines.append(
            f"| {r.model} | {r.task} | {_setting(r)} | {r.seed} | {r.main_metric} | {_number(r.value)} "
            f"| {_number(r.same_seed_reference)} | {spread} | {z} | ± {_number(r.half_width)} | {verdict} |"
        )
    # across re-launches of an interrupted grid the command's own wall time covers one launch; the runs' sum all
    run_time = pd.to_numeric(table["wall_s"], errors="coerce").sum()
    summed = f"re-runs' summed run time: {run_time:,.0f} s ({run_time / 3600:.2f} h, one process each)"
    return "\n".join(lines) + "\n\n" + verdict_line(table, level) + "\n" + summed + "\n"


def outside(table: pd.DataFrame) -> pd.DataFrame:
    """The judged re-runs (or rows) that fall outside the reference spread."""
    judged = table[table["within"].notna()]
    return judged[~judged["within"].astype(bool)]


def verdict_line(table: pd.DataFrame, level: float = 0.95) -> str:
    return _summary(
        table,
        f"reproduction: {{}} re-runs inside the reference seeds' {100 * level:g} % prediction interval",
        lambda r: (
            f"{r.model} {r.task} seed {r.seed} "
            + (
                f"(failed: {r.error})"
                if isinstance(r.error, str)
                else f"({r.value:.2f} vs {r.reference_mean:.2f} ± {r.reference_std:.2f})"
            )
        ),
    )


def _summary(table: pd.DataFrame, template: str, describe) -> str:
    """``template`` with "k of n" filled in, what was not judged, and each judged entry outside (``describe``)."""
    judged = table[table["within"].notna()]
    out = outside(table)
    line = template.format(f"{len(judged) - len(out)} of {len(judged)}") + f" ({_unjudged(table)})"
    if not out.empty:
        line += "; outside: " + ", ".join(describe(r) for r in out.itertuples(index=False))
    return line


def rows_markdown(rows: pd.DataFrame, level: float = 0.95) -> str:
    """``compare_rows`` as a Markdown table and a one-line verdict: the leaderboard's means, re-run against
    reference."""
    header = (
        "| model | task | setting | metric | re-run mean (n) | ref. mean ± std (n) | difference | interval | within |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows.itertuples(index=False):
        spread = f"{_number(r.reference_mean)} ± {_number(r.reference_std)} ({r.reference_n})"
        difference = "—" if math.isnan(r.difference) else f"{r.difference:+.2f}"
        lines.append(
            f"| {r.model} | {r.task} | {_setting(r)} | {r.main_metric} | {_number(r.rerun_mean)} ({r.rerun_n}) "
            f"| {spread} | {difference} | ± {_number(r.half_width)} | {_verdict(r.within)}{_noted(r.note)} |"
        )
    line = _summary(
        rows,
        f"rows: {{}} rows' re-run means inside the {100 * level:g} % prediction interval for a mean of that many seeds",
        lambda r: (
            f"{r.model} {r.task} ({r.rerun_mean:.2f} over {r.rerun_n} vs {r.reference_mean:.2f} ± "
            f"{r.reference_std:.2f})"
        ),
    )
    return "\n".join(lines) + "\n\n" + line + "\n"
