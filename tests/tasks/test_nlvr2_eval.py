"""The official NLVR2 evaluator's behaviour (lil-lab/nlvr metrics.py), checked on hand-computed cases."""

import pytest

from vlbench.tasks.nlvr2_eval import (
    evaluate_nlvr2,
    format_prediction_lines,
    parse_prediction_lines,
    read_predictions,
    sentence_group,
    write_predictions,
)

# two sentences (set 10 sentence 0, set 11 sentence 1), each paired with 4 image pairs
EXAMPLES = [{"identifier": f"dev-10-{pair}-0", "label": "True" if pair % 2 else "False"} for pair in range(4)] + [
    {"identifier": f"dev-11-{pair}-1", "label": "True"} for pair in range(4)
]


def test_accuracy_and_consistency_by_hand():
    predictions = {f"dev-10-{pair}-0": pair % 2 == 1 for pair in range(4)}  # sentence 10: all right
    predictions |= {"dev-11-0-1": "true", "dev-11-1-1": "TRUE", "dev-11-2-1": "True", "dev-11-3-1": "False"}
    scores = evaluate_nlvr2(EXAMPLES, predictions)
    assert scores.accuracy == 87.5  # 7 of 8
    assert scores.consistency == 50.0  # sentence 10 consistent, sentence 11 not
    assert scores.per_example["dev-11-3-1"] is False and scores.per_example["dev-11-1-1"] is True


def test_labels_match_case_insensitively():
    scores = evaluate_nlvr2([{"identifier": "dev-1-0-0", "label": "true"}], {"dev-1-0-0": "TRUE"})
    assert scores.accuracy == 100.0 and scores.consistency == 100.0


def test_group_blanks_only_the_pair_index():
    assert sentence_group("dev-850-0-0") == "dev-850--0"
    assert sentence_group("dev-850-3-0") == sentence_group("dev-850-0-0")
    assert sentence_group("dev-850-0-1") != sentence_group("dev-850-0-0")  # another sentence of the same set
    examples = [{"identifier": "dev-5-0-0", "label": "True"}, {"identifier": "dev-5-0-1", "label": "True"}]
    assert evaluate_nlvr2(examples, {"dev-5-0-0": True, "dev-5-0-1": False}).consistency == 50.0


def test_missing_prediction_names_the_identifier():
    predictions = {ex["identifier"]: "True" for ex in EXAMPLES if ex["identifier"] != "dev-11-2-1"}
    with pytest.raises(KeyError, match="dev-11-2-1"):
        evaluate_nlvr2(EXAMPLES, predictions | {"test1-0-0-0": "True"})  # extra predictions don't hide it


def test_no_examples_is_an_error():
    with pytest.raises(ValueError, match="no labelled examples"):
        evaluate_nlvr2([], {})


def test_csv_round_trip(tmp_path):
    path = tmp_path / "predictions.csv"
    write_predictions(path, {"dev-1-0-0": True, "dev-1-1-0": "false"})
    assert path.read_text() == "dev-1-0-0,True\ndev-1-1-0,False\n"
    assert read_predictions(path) == {"dev-1-0-0": "True", "dev-1-1-0": "False"}


def test_parse_lines_as_the_official_script():
    lines = ["dev-1-0-0,True\n", "dev-1-1-0,false,extra\n", "\n", "dev-1-0-0,False  \n"]
    # extra fields ignored, trailing whitespace stripped, blank lines skipped, a later line wins
    assert parse_prediction_lines(lines) == {"dev-1-0-0": "False", "dev-1-1-0": "false"}
    with pytest.raises(ValueError, match="without a comma"):
        parse_prediction_lines(["dev-1-0-0 True"])


def test_format_rejects_non_boolean_predictions():
    assert format_prediction_lines({"dev-1-0-0": "TRUE"}) == ["dev-1-0-0,True"]
    with pytest.raises(ValueError, match="dev-1-0-0"):
        format_prediction_lines({"dev-1-0-0": "maybe"})
