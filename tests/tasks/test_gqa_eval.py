"""The official GQA evaluator's behaviour, checked on a hand-computed fixture (quirks included)."""

import pytest

from vlbench.tasks.gqa_eval import (
    belongs,
    distribution_score,
    evaluate_gqa,
    predictions_from_official,
    question_length,
    reasoning_steps,
)


def question(text, answer, structural, semantic, program=(), *, balanced=True, entailed=(), group=None, detailed="x"):
    return {
        "imageId": "1",
        "question": text,
        "answer": answer,
        "types": {"structural": structural, "semantic": semantic, "detailed": detailed},
        "entailed": list(entailed),
        "equivalent": [],
        "isBalanced": balanced,
        "semantic": [{"operation": op, "argument": arg, "dependencies": []} for op, arg in program],
        "groups": {"global": group, "local": None},
    }


# words / steps / correct with PREDICTIONS:
# q1 5 words, 2 steps, right; q2 4, 2, right; q3 4, 1 ("query: name" not counted), wrong;
# q6 6, 3 (two "exist" not counted), right; q7 9, 3, wrong; q4, q5, q8 unbalanced.
QUESTIONS = {
    "q1": question(
        "What color is the car?", "red", "query", "attr", [("select", "car"), ("query", "color")],
        entailed=["q1", "q4"], group="color",
    ),
    "q2": question(
        "Is the car red?", "yes", "verify", "attr", [("select", "car"), ("verify color", "red")],
        entailed=["q4", "q5", "q8"],
    ),
    "q3": question(
        "What vehicle is it?", "car", "query", "cat", [("select", "vehicle"), ("query", "name")], group="vehicle"
    ),
    "q4": question("Is the car blue?", "no", "verify", "attr", balanced=False),
    "q5": question("Is the car green?", "yes", "verify", "attr", balanced=False),
    "q6": question(
        "Are there both cars and buses?", "no", "logic", "obj",
        [("select", "car"), ("exist", "?"), ("select", "bus"), ("exist", "?"), ("and", "")],
        entailed=["q6"],
    ),
    "q7": question(
        "Are the car and the bus the same color?", "no", "compare", "attr",
        [("select", "car"), ("select", "bus"), ("same color", "")], entailed=["q3"],
    ),
    "q8": question("Is the car white?", "no", "verify", "attr", balanced=False),
}  # fmt: skip
PREDICTIONS = {"q1": "red", "q2": "yes", "q3": "bus", "q4": "no", "q5": "no", "q6": "no", "q7": "yes"}
CHOICES = {
    "q1": {"valid": ["red", "blue"], "plausible": ["red"]},
    "q2": {"valid": ["yes", "no"], "plausible": ["yes", "no"]},
    "q3": {"valid": ["car", "bus"], "plausible": ["car"]},
    "q6": {"valid": ["yes", "no"], "plausible": ["yes", "no"]},
    "q7": {"valid": ["yes", "no"], "plausible": ["no"]},
}


def test_headline_metrics_by_hand():
    metrics = evaluate_gqa(QUESTIONS, PREDICTIONS).metrics
    assert metrics["accuracy"] == pytest.approx(60.0)  # q1 q2 q6 right of the 5 balanced
    assert metrics["open"] == pytest.approx(50.0)  # query: q1 right, q3 wrong
    assert metrics["binary"] == pytest.approx(200 / 3)  # verify/logic/compare: q2 q6 right, q7 wrong
    # q1 → {q4}: 1; q2 → {q4 right, q5 wrong} (q8 unpredicted, skipped): 0.5; q6 only entails itself; q3 q7 wrong
    assert metrics["consistency"] == pytest.approx(75.0)
    # groups: color {red: gold 1, predicted 1} → 0; vehicle {car: gold 1, predicted 0} → 1 ("bus" is not gold: ignored)
    assert metrics["distribution"] == pytest.approx((0 * 1 + 1 * 1) / 2 / 100)
    assert metrics["validity"] is None and metrics["plausibility"] is None  # no choices given


def test_breakdowns_by_hand():
    scores = evaluate_gqa(QUESTIONS, PREDICTIONS)
    assert scores.breakdown["structural"] == {"query": 50.0, "verify": 100.0, "logic": 100.0, "compare": 0.0}
    assert scores.breakdown["semantic"] == {"attr": pytest.approx(200 / 3), "cat": 0.0, "obj": 100.0}
    assert scores.breakdown["length"] == {5: 100.0, 4: 50.0, 6: 100.0, 9: 0.0}
    assert scores.breakdown["steps"] == {2: 100.0, 1: 0.0, 3: 50.0}
    assert scores.counts["structural"] == {"query": 2, "verify": 1, "logic": 1, "compare": 1}
    assert scores.counts["length"] == {5: 1, 4: 2, 6: 1, 9: 1}
    assert scores.counts["steps"] == {2: 2, 1: 1, 3: 2}


def test_validity_and_plausibility():
    metrics = evaluate_gqa(QUESTIONS, PREDICTIONS, choices=CHOICES).metrics
    assert metrics["validity"] == 100.0
    assert metrics["plausibility"] == pytest.approx(60.0)  # q3 "bus" and q7 "yes" are valid but not plausible


def test_choices_must_cover_balanced_questions():
    with pytest.raises(KeyError, match="q7"):
        evaluate_gqa(QUESTIONS, PREDICTIONS, choices={k: v for k, v in CHOICES.items() if k != "q7"})


def test_common_questions_accept_any_attribute_kind():
    common = question("What do the car and the bus have in common?", "color", "compare", "attr", detailed="twoCommon")
    assert belongs("shape", ["red"], common)  # the list is replaced by color/material/shape
    assert not belongs("red", ["red"], common)
    assert belongs("red", ["red"], question("?", "red", "query", "attr", detailed="color"))


def test_only_balanced_questions_count():
    wrong_unbalanced = PREDICTIONS | {"q4": "yes", "q5": "yes"}
    assert evaluate_gqa(QUESTIONS, wrong_unbalanced).metrics["accuracy"] == pytest.approx(60.0)
    # ... though unbalanced questions still count as entailed ones: q1 → 0, q2 → (0 + 1) / 2
    assert evaluate_gqa(QUESTIONS, wrong_unbalanced).metrics["consistency"] == pytest.approx(25.0)
    assert sum(evaluate_gqa(QUESTIONS, wrong_unbalanced).counts["structural"].values()) == 5


def test_every_balanced_question_needs_a_prediction():
    with pytest.raises(KeyError, match="q3"):
        evaluate_gqa(QUESTIONS, {k: v for k, v in PREDICTIONS.items() if k != "q3"})
    evaluate_gqa(QUESTIONS, {k: v for k, v in PREDICTIONS.items() if k != "q5"})  # unbalanced: fine


def test_consistency_skips_self_entailment_and_unpredicted_questions():
    only_self = {"a": question("Is it red?", "yes", "verify", "attr", entailed=["a"])}
    assert evaluate_gqa(only_self, {"a": "yes"}).metrics["consistency"] is None
    unpredicted = {"a": question("Is it red?", "yes", "verify", "attr", entailed=["b"]), "b": QUESTIONS["q4"]}
    assert evaluate_gqa(unpredicted, {"a": "yes"}).metrics["consistency"] is None
    assert evaluate_gqa(unpredicted, {"a": "yes", "b": "no"}).metrics["consistency"] == 100.0
    assert evaluate_gqa(unpredicted, {"a": "no", "b": "no"}).metrics["consistency"] is None  # only correct ones count


def test_answers_compare_exactly():
    single = {"a": question("What color is it?", "red", "query", "attr")}
    assert evaluate_gqa(single, {"a": "Red"}).metrics["accuracy"] == 0.0
    assert evaluate_gqa(single, {"a": "red "}).metrics["accuracy"] == 0.0


def test_empty_categories_are_none_not_zero():
    metrics = evaluate_gqa({"a": question("Is it red?", "yes", "verify", "attr")}, {"a": "yes"}).metrics
    assert metrics["open"] is None and metrics["binary"] == 100.0
    assert metrics["distribution"] is None  # no global group at all


def test_no_balanced_questions_is_an_error():
    with pytest.raises(ValueError, match="no balanced questions"):
        evaluate_gqa({"q4": QUESTIONS["q4"]}, {"q4": "no"})


@pytest.mark.parametrize(
    ("program", "steps"),
    [
        ([("select", "car"), ("query", "color")], 2),
        ([("select", "car"), ("query", "name")], 1),
        ([("select", "animal"), ("choose name", "cat|dog")], 1),
        ([("select", "car"), ("choose color", "red|blue")], 2),
        ([("select", "car"), ("exist", "?"), ("select", "bus"), ("exist", "?"), ("or", "")], 3),
        ([("select", "existence")], 0),  # a substring test on "operation: argument", as in the official script
        ([], 0),
    ],
)
def test_reasoning_steps(program, steps):
    assert reasoning_steps(question("?", "x", "query", "obj", program)) == steps


def test_question_length_splits_on_whitespace():
    assert question_length({"question": "Is the  car red ?"}) == 5
    assert question_length({"question": "What color is the car?"}) == 5


def test_distribution_score_by_hand():
    gold = {"g": {"a": 2, "b": 1}, "h": {"x": 1}}
    predicted = {"g": {"a": 1, "c": 2}, "h": {"x": 1}}
    # g: (1-2)²/2 + (0-1)²/1 = 1.5 ("c" is not gold: ignored), size 3; h: 0, size 1 → (1.5·3 + 0·1) / 4 / 100
    assert distribution_score(gold, predicted) == pytest.approx(4.5 / 4 / 100)
    # nothing predicted: g: 2²/2 + 1²/1 = 3, size 3; h: 1, size 1
    assert distribution_score(gold, {}) == pytest.approx((3 * 3 + 1 * 1) / 4 / 100)
    assert distribution_score({}, {}) is None


def test_predictions_from_official_format():
    records = [{"questionId": "q1", "prediction": "red"}, {"questionId": "q2", "prediction": "yes"}]
    assert predictions_from_official(records) == {"q1": "red", "q2": "yes"}
