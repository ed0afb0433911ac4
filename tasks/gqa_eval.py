"""The official GQA evaluation, mirrored: ``eval.py`` distributed with the GQA dataset (gqadataset.org). Our numbers
equal the official script's on the same predictions; its conventions and quirks are kept:

- answers compare by exact string equality (no normalisation at all, unlike VQA);
- every score is over the questions with ``isBalanced`` true only; ``open`` is structural type ``query``, ``binary``
  every other structural type;
- question length is ``len(question.split())``; reasoning steps count the program's operations except those whose
  ``"<operation>: <argument>"`` string *contains* ``exist``, ``query: name`` or ``choose name`` (a substring test, so
  ``query: name`` also drops ``query`` steps whose argument merely starts with ``name``);
- consistency: for each balanced question answered correctly, the accuracy over its ``entailed`` questions other than
  itself, averaged over those questions (entailed questions may be unbalanced);
- validity / plausibility: the prediction is in the choices file's ``valid`` / ``plausible`` list, except that for a
  question whose detailed type contains ``Common`` the list is replaced by ``["color", "material", "shape"]``;
- distribution: per ``groups.global`` group (``None`` groups skipped), chi-square summed over the *gold* answers only
  (a predicted answer never given as gold adds nothing), weighted by the group's size, averaged, then divided by 100;
- percentages are not rounded (the script prints them with ``{:.2f}`` but keeps full precision); distribution is a
  plain number (lower is better).

Where the official script would crash or print a misleading 0 we differ, on purpose and only there:
- an average over no questions is ``None`` (the script prints 0.00 for e.g. ``open`` when there are no open questions,
  and divides by zero for distribution when no question has a global group);
- consistency skips entailed questions that have no prediction or are absent from ``questions`` (the script requires
  predictions for the whole all-questions file and fails otherwise); with complete predictions the two agree;
- validity / plausibility are ``None`` without a choices file (the script reports 0.00);
- a balanced question without a prediction raises ``KeyError`` naming it (the script raises a bare Exception).
Grounding (attention maps) is left out. The script's sub-metric renaming (``attr`` → ``Attribute``) is dead code in the
script itself, so breakdown keys are the raw type names, word counts and step counts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass

STEPS_NOT_COUNTED = ("exist", "query: name", "choose name")
COMMON_GROUP = ("color", "material", "shape")
BREAKDOWNS = ("structural", "semantic", "length", "steps")


def question_length(question: Mapping) -> int:
    """Number of words, split on whitespace as the official script does (punctuation stays attached)."""
    return len(question["question"].split())


def reasoning_steps(question: Mapping) -> int:
    """Program steps that add reasoning: the final existence/name query is not counted (substring test, as official)."""
    return sum(
        not any(skip in f"{step['operation']}: {step['argument']}" for skip in STEPS_NOT_COUNTED)
        for step in question["semantic"]
    )


def belongs(answer: str, group: Iterable[str], question: Mapping) -> bool:
    """Validity/plausibility test: for "what do they have in common" questions the answer is an attribute kind."""
    if "Common" in question["types"]["detailed"]:
        group = COMMON_GROUP
    return answer in group


def distribution_score(
    gold: Mapping[Hashable, Mapping[str, int]], predicted: Mapping[Hashable, Mapping[str, int]]
) -> float | None:
    """Chi-square of predicted vs gold answer counts per global group, weighted by group size, averaged, / 100.

    Only answers present in the gold histogram contribute, as in the official ``chiSquare``. ``None`` when there is no
    gold answer at all (the official script divides by zero).
    """
    weighted_sum, total = 0.0, 0
    for group, gold_counts in gold.items():
        predicted_counts = predicted.get(group, {})
        chi_square = sum((predicted_counts.get(a, 0) - e) ** 2 / e for a, e in gold_counts.items())
        size = sum(gold_counts.values())
        weighted_sum += chi_square * size
        total += size
    return None if total == 0 else weighted_sum / total / 100


def predictions_from_official(records: Iterable[Mapping]) -> dict[str, str]:
    """The official predictions file (a JSON array of ``{"questionId", "prediction"}``) as ``{questionId: answer}``."""
    return {r["questionId"]: r["prediction"] for r in records}


def _percent(scores: list[float]) -> float | None:
    return 100 * sum(scores) / len(scores) if scores else None


@dataclass
class GQAScores:
    # accuracy, binary, open, consistency, validity, plausibility: percent (unrounded) or None when nothing to average;
    # distribution: chi-square / 100 (lower is better) or None
    metrics: dict[str, float | None]
    # structural / semantic: type name → percent; length: words → percent; steps: reasoning steps → percent
    breakdown: dict[str, dict[Hashable, float]]
    counts: dict[str, dict[Hashable, int]]  # same keys as breakdown → number of balanced questions


def evaluate_gqa(
    questions: Mapping[Hashable, Mapping],
    predictions: Mapping[Hashable, str],
    choices: Mapping[Hashable, Mapping] | None = None,
) -> GQAScores:
    """Score predictions {question_id: answer} against the official questions file (balanced or all questions).

    Every balanced question must be predicted. Consistency needs predictions for the entailed questions, which are
    mostly unbalanced: pass the all-questions file and predict all of it to reproduce the official ``--consistency``.
    """
    accuracy: list[float] = []
    by_answer_type: dict[str, list[float]] = {"binary": [], "open": []}
    consistency: list[float] = []
    validity: list[float] = []
    plausibility: list[float] = []
    per: dict[str, dict[Hashable, list[float]]] = {name: defaultdict(list) for name in BREAKDOWNS}
    gold_hist: dict[Hashable, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    predicted_hist: dict[Hashable, dict[str, int]] = defaultdict(lambda: defaultdict(int))

    for qid, question in questions.items():
        if not question["isBalanced"]:
            continue
        if qid not in predictions:
            raise KeyError(f"no prediction for balanced question {qid}")
        gold, predicted = question["answer"], predictions[qid]
        correct = predicted == gold
        score = float(correct)
        structural = question["types"]["structural"]

        accuracy.append(score)
        by_answer_type["open" if structural == "query" else "binary"].append(score)
        per["structural"][structural].append(score)
        per["semantic"][question["types"]["semantic"]].append(score)
        per["length"][question_length(question)].append(score)
        per["steps"][reasoning_steps(question)].append(score)

        if choices is not None:
            if qid not in choices:
                raise KeyError(f"no choices for balanced question {qid}")
            validity.append(float(belongs(predicted, choices[qid]["valid"], question)))
            plausibility.append(float(belongs(predicted, choices[qid]["plausible"], question)))

        group = question["groups"]["global"]
        if group is not None:
            gold_hist[group][gold] += 1
            predicted_hist[group][predicted] += 1

        entailed = [eid for eid in question["entailed"] if eid != qid and eid in predictions and eid in questions]
        if correct and entailed:
            consistency.append(sum(predictions[eid] == questions[eid]["answer"] for eid in entailed) / len(entailed))

    if not accuracy:
        raise ValueError("no balanced questions to evaluate")
    metrics = {
        "accuracy": _percent(accuracy),
        "binary": _percent(by_answer_type["binary"]),
        "open": _percent(by_answer_type["open"]),
        "consistency": _percent(consistency),
        "validity": _percent(validity) if choices is not None else None,
        "plausibility": _percent(plausibility) if choices is not None else None,
        "distribution": distribution_score(gold_hist, predicted_hist),
    }
    return GQAScores(
        metrics=metrics,
        breakdown={name: {k: _percent(v) for k, v in per[name].items()} for name in BREAKDOWNS},
        counts={name: {k: len(v) for k, v in per[name].items()} for name in BREAKDOWNS},
    )
