"""The official NLVR2 evaluation, mirrored: lil-lab/nlvr ``nlvr2/eval/metrics.py``. Its conventions:

- predictions are CSV lines ``identifier,True|False`` (each line stripped, split on ",", fields 0 and 1 used; a later
  line for the same identifier wins);
- a prediction is correct when it equals the label case-insensitively;
- accuracy (the script's "precision") = correct / all labelled examples;
- consistency = share of groups whose examples are all correct, a group being the identifiers equal once their third
  dash-separated field (the image-pair index) is blanked: ``dev-850-0-0`` and ``dev-850-3-0`` share the group
  ``dev-850--0`` (same sentence, different image pairs).

We report percentages (the script prints fractions in [0, 1]), unrounded. The script only notices missing predictions
when it has fewer predictions than examples (and then prints them and exits); we raise ``KeyError`` naming them
whenever any labelled example is unpredicted. Blank lines in a predictions file are skipped (the script would fail).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

_MAX_NAMED_MISSING = 10


def sentence_group(identifier: str) -> str:
    """The consistency group of an example: its identifier with the pair index (third dash field) blanked."""
    fields = identifier.split("-")
    fields[2] = ""
    return "-".join(fields)


def _as_label(value: str | bool) -> str:
    return str(value).lower()


@dataclass
class NLVR2Scores:
    accuracy: float  # percent of examples predicted correctly, unrounded (the script's "precision" × 100)
    consistency: float  # percent of sentence groups with every example correct, unrounded
    per_example: dict[str, bool]  # identifier → correct


def evaluate_nlvr2(examples: Iterable[Mapping], predictions: Mapping[str, str | bool]) -> NLVR2Scores:
    """Score predictions {identifier: "True"/"False" or bool} against labelled examples (``identifier``, ``label``
    records, as in the official JSON-lines files). Every labelled example must have a prediction."""
    examples = list(examples)
    missing = [ex["identifier"] for ex in examples if ex["identifier"] not in predictions]
    if missing:
        named = ", ".join(missing[:_MAX_NAMED_MISSING]) + (", …" if len(missing) > _MAX_NAMED_MISSING else "")
        raise KeyError(f"no prediction for {len(missing)} of {len(examples)} examples: {named}")
    if not examples:
        raise ValueError("no labelled examples to evaluate")

    per_example: dict[str, bool] = {}
    group_consistent: dict[str, bool] = {}
    n_correct = 0  # per labelled example, not per identifier: a duplicated example counts twice, as in the script
    for ex in examples:
        identifier = ex["identifier"]
        correct = _as_label(predictions[identifier]) == _as_label(ex["label"])
        per_example[identifier] = correct
        n_correct += correct
        group = sentence_group(identifier)
        group_consistent[group] = group_consistent.get(group, True) and correct

    return NLVR2Scores(
        accuracy=100 * n_correct / len(examples),
        consistency=100 * sum(group_consistent.values()) / len(group_consistent),
        per_example=per_example,
    )


def parse_prediction_lines(lines: Iterable[str]) -> dict[str, str]:
    """Official CSV prediction lines → {identifier: prediction string}, parsed as the script does."""
    predictions: dict[str, str] = {}
    for line in lines:
        fields = line.strip().split(",")
        if fields == [""]:
            continue
        if len(fields) < 2:
            raise ValueError(f"prediction line without a comma: {line!r}")
        predictions[fields[0]] = fields[1]
    return predictions


def read_predictions(path: str | Path) -> dict[str, str]:
    """Read an official predictions CSV file."""
    return parse_prediction_lines(Path(path).read_text().splitlines())


def format_prediction_lines(predictions: Mapping[str, str | bool]) -> list[str]:
    """{identifier: bool or "true"/"false" in any case} → official lines ``identifier,True|False``."""
    lines = []
    for identifier, value in predictions.items():
        label = _as_label(value)
        if label not in ("true", "false"):
            raise ValueError(f"prediction for {identifier} is {value!r}, expected True or False")
        lines.append(f"{identifier},{label.capitalize()}")
    return lines


def write_predictions(path: str | Path, predictions: Mapping[str, str | bool]) -> None:
    """Write predictions as the official CSV file the lil-lab script and leaderboard read."""
    Path(path).write_text("".join(line + "\n" for line in format_prediction_lines(predictions)))
