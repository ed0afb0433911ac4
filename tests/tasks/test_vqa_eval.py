"""The official VQA evaluator's behaviour, checked on hand-computed cases (quirks included)."""

import pytest

from vlbench.tasks.vqa_eval import (
    evaluate_vqa,
    leave_one_out_accuracy,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    question_accuracy,
    round_like_python2,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("hello, world", "hello world"),  # a mark touching a space is deleted
        ("a,b", "a b"),  # otherwise replaced by a space
        ("1,000", "1000"),  # a comma between digits: every mark is deleted
        ("3.5", "3.5"),  # a period before a digit stays
        ("end.", "end"),
        ("e.g.", "eg"),
        ("yes!", "yes "),  # '!' does not touch a space → replaced by a space
        ("." * 40, "." * 8),  # the script passes re.UNICODE (32) as the count of periods removed
        ("it's", "it's"),  # the apostrophe is not in the latest script's punctuation list
    ],
)
def test_process_punctuation(text, expected):
    assert process_punctuation(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Two Dogs", "2 dogs"),
        ("none", "0"),
        ("the red ball", "red ball"),
        ("an apple a day", "apple day"),
        ("dont know", "don't know"),
        ("isnt", "isn't"),
        ("ten", "10"),
    ],
)
def test_process_digit_article(text, expected):
    assert process_digit_article(text) == expected


def test_normalize_answer_full_chain():
    assert normalize_answer("  The Two dogs.\n") == "2 dogs"


def test_accuracy_leave_one_out_averaging():
    # 2 of 10 say "yes": leaving out a "yes" leaves 1 match (1/3), leaving out a "no" leaves 2 (2/3)
    assert question_accuracy("yes", ["yes"] * 2 + ["no"] * 8) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    assert question_accuracy("yes", ["yes"] * 3 + ["no"] * 7) == pytest.approx((3 * (2 / 3) + 7 * 1) / 10)
    assert question_accuracy("yes", ["yes"] * 4 + ["no"] * 6) == pytest.approx(1.0)
    assert question_accuracy("yes", ["yes"] * 1 + ["no"] * 9) == pytest.approx(0.3)
    assert question_accuracy("maybe", ["yes"] * 5 + ["no"] * 5) == 0.0


@pytest.mark.parametrize("matches", range(11))
def test_closed_form_equals_the_explicit_leave_one_out_loop(matches):
    answers = ["yes"] * matches + ["no"] * (10 - matches)
    explicit = sum(min(1.0, sum(a == "yes" for j, a in enumerate(answers) if j != i) / 3) for i in range(10)) / 10
    assert leave_one_out_accuracy(matches, 10) == pytest.approx(explicit)
    assert question_accuracy("yes", answers) == pytest.approx(explicit)


def test_unanimous_answers_are_not_normalised():
    # the official script only normalises when the ten answers disagree
    assert question_accuracy("yes", ["Yes"] * 10) == 0.0
    assert question_accuracy("Yes", ["Yes"] * 10) == 1.0
    assert question_accuracy(" Yes\t", ["Yes"] * 10) == 1.0  # whitespace is always cleaned


def test_disagreeing_answers_are_normalised_with_the_prediction():
    assert question_accuracy("two", ["Two"] * 9 + ["2"]) == 1.0
    assert question_accuracy("a dog", ["the dog"] * 5 + ["dog"] * 5) == 1.0


def test_evaluate_overall_and_breakdowns():
    def ann(qid, qtype, atype, answers):
        return {
            "question_id": qid,
            "question_type": qtype,
            "answer_type": atype,
            "answers": [{"answer": a} for a in answers],
        }

    annotations = [
        ann(1, "is there", "yes/no", ["yes"] * 10),
        ann(2, "is there", "yes/no", ["yes"] * 2 + ["no"] * 8),
        ann(3, "how many", "number", ["2"] * 10),
    ]
    scores = evaluate_vqa(annotations, {1: "yes", 2: "yes", 3: "3"})
    assert scores.per_question == {1: 1.0, 2: pytest.approx(0.6), 3: 0.0}
    assert scores.overall == round(100 * 1.6 / 3, 2) == 53.33
    assert scores.per_question_type == {"is there": 80.0, "how many": 0.0}
    assert scores.per_answer_type == {"yes/no": 80.0, "number": 0.0}


def test_evaluate_requires_every_prediction():
    with pytest.raises(KeyError, match="question 7"):
        evaluate_vqa(
            [{"question_id": 7, "question_type": "x", "answer_type": "other", "answers": [{"answer": "a"}]}], {}
        )


def test_question_accuracy_equals_the_official_loop_bit_for_bit_for_every_arrangement():
    """The script sums the 10 leave-one-out terms in the answers' order; a closed form can differ in the last bit
    (0.6 vs 0.6000000000000001), which can flip a rounded percentage."""
    import itertools

    for pattern in itertools.product([True, False], repeat=10):
        answers = ["yes" if hit else "no" for hit in pattern]
        gt_acc = []
        for i in range(10):  # vqaEval.py: otherGTAns, matchingAns, min(1, float(len(matchingAns)) / 3)
            others = [a for j, a in enumerate(answers) if j != i]
            gt_acc.append(min(1, float(len([a for a in others if a == "yes"])) / 3))
        assert question_accuracy("yes", answers) == float(sum(gt_acc)) / len(gt_acc), pattern


def test_percentages_round_halves_away_from_zero_as_the_python2_script():
    assert round_like_python2(3.125) == 3.13 and round(3.125, 2) == 3.12  # an exact binary half: Python 3 differs
    assert round_like_python2(2.675) == 2.67  # 2.67499999…: not a half, as in Python 2
    assert round_like_python2(12.5) == 12.5 and round_like_python2(0.0) == 0.0
    # 32 unanimous questions, one answered right: 100 / 32 = 3.125 exactly → the script reports 3.13
    annotations = [
        {"question_id": i, "question_type": "is", "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 10}
        for i in range(32)
    ]
    scores = evaluate_vqa(annotations, {i: "yes" if i == 0 else "no" for i in range(32)})
    assert (
        scores.overall == 3.13 and scores.per_answer_type == {"yes/no": 3.13} and scores.per_question_type["is"] == 3.13
    )
