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
            "z": math.nan, "half_width": math.nan, "within": math.nan}  # fmt: skip

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


def prediction_half_width(std: float, n: int, level: float = 0.95) -> float:
    """Half-width of the Student-t prediction interval for one new draw, from n reference draws of sample std."""
    return student_t_quantile(0.5 + level / 2, n - 1) * std * math.sqrt(1 + 1 / n)


def compare_with_reference(reruns: pd.DataFrame, reference: pd.DataFrame, level: float = 0.95) -> pd.DataFrame:
    """One row per re-run: its value, the reference row's mean/std/n, the same seed's reference value, z-score, the
    prediction interval's half-width and ``within`` (the verdict). A failed re-run is judged not reproduced (its
    error in ``error``); re-runs with no reference row, or one reference seed (no spread), get ``within = NaN``."""
    if not 0 < level < 1:
        raise VlbenchError(f"--level {level}: expected a probability between 0 and 1")
    if reruns.empty or not reruns["status"].isin(["finished", "failed"]).any():
        raise VlbenchError("no finished or failed run to compare with the reference")
    ref = reference[reference["status"] == "finished"].copy()
    for key in ROW_KEYS:
        ref[key] = ref[key].fillna("").astype(str)
    groups = {key: one_record_per_seed(group)[0] for key, group in ref.groupby(ROW_KEYS, sort=False)}
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
        values = group["value"].dropna().astype(float).to_numpy()
        mean = float(values.mean())
        std = float(values.std(ddof=1)) if values.size > 1 else math.nan
        same_seed = group.loc[group["seed"] == run.seed, "value"].dropna()
        row.update(
            reference_mean=mean,
            reference_std=std,
            reference_n=int(values.size),
            same_seed_reference=float(same_seed.iloc[0]) if not same_seed.empty else math.nan,
        )
        difference = value - mean
        if values.size > 1 and std <= EXACT:  # the reference seeds agree: the re-run must equal them
            row.update(z=0.0 if abs(difference) <= EXACT else math.copysign(math.inf, difference), half_width=0.0)
            row["within"] = bool(abs(difference) <= EXACT)
        elif values.size > 1:
            row.update(z=difference / std, half_width=prediction_half_width(std, values.size, level))
            row["within"] = bool(abs(difference) <= row["half_width"])
        else:  # one reference seed: no spread to judge against
            row.update(z=math.nan, half_width=math.nan, within=math.nan)
        rows.append(row)
    return pd.DataFrame(rows).sort_values(["model", "task", "setting", "seed"], kind="stable", ignore_index=True)


def _number(x: float, digits: int = 2) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def report_markdown(table: pd.DataFrame, level: float = 0.95) -> str:
    """The comparison as a Markdown table and a one-line verdict."""
    header = (
        "| model | task | setting | seed | metric | re-run | same seed (ref.) | ref. mean ± std (n) | z "
        "| interval | within |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in table.itertuples(index=False):
        setting = " ".join(x for x in (r.scale, f"head={r.head}", r.numerics, r.setting, init_label(r.init)) if x)
        spread = f"{_number(r.reference_mean)} ± {_number(r.reference_std)} ({r.reference_n})"
        z = "—" if math.isnan(r.z) else (f"{r.z:+.2f}" if math.isfinite(r.z) else f"{r.z:+}")
        verdict = "—" if isinstance(r.within, float) and math.isnan(r.within) else ("yes" if r.within else "**no**")
        verdict += " (failed)" if isinstance(r.error, str) else ""
        lines.append(
            f"| {r.model} | {r.task} | {setting} | {r.seed} | {r.main_metric} | {_number(r.value)} "
            f"| {_number(r.same_seed_reference)} | {spread} | {z} | ± {_number(r.half_width)} | {verdict} |"
        )
    # across re-launches of an interrupted grid the command's own wall time covers one launch; the runs' sum all
    run_time = pd.to_numeric(table["wall_s"], errors="coerce").sum()
    summed = f"re-runs' summed run time: {run_time:,.0f} s ({run_time / 3600:.2f} h, one process each)"
    return "\n".join(lines) + "\n\n" + verdict_line(table, level) + "\n" + summed + "\n"


def outside(table: pd.DataFrame) -> pd.DataFrame:
    """The judged re-runs that fall outside the reference spread."""
    judged = table[table["within"].notna()]
    return judged[~judged["within"].astype(bool)]


def verdict_line(table: pd.DataFrame, level: float = 0.95) -> str:
    judged = table[table["within"].notna()]
    out = outside(table)
    line = (
        f"reproduction: {len(judged) - len(out)} of {len(judged)} re-runs inside the reference seeds' "
        f"{100 * level:g} % prediction interval ({len(table) - len(judged)} without a reference spread)"
    )
    if not out.empty:
        line += "; outside: " + ", ".join(
            f"{r.model} {r.task} seed {r.seed} "
            + (
                f"(failed: {r.error})"
                if isinstance(r.error, str)
                else f"({r.value:.2f} vs {r.reference_mean:.2f} ± {r.reference_std:.2f})"
            )
            for r in out.itertuples(index=False)
        )
    return line
