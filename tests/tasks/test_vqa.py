"""Reading official VQA v2 files, the answer vocabulary and soft targets, and clear errors on bad input."""

import json
from pathlib import Path

import pytest
from PIL import Image

from vlbench.errors import VlbenchError
from vlbench.tasks.vqa import VQAAnswerVocab, read_vqa_split

TEMPLATE = "images/{subtype}/COCO_{subtype}_{image_id:012d}.jpg"


def write_fixture(root: Path, subtype: str = "val2014", with_image: bool = True) -> None:
    """Two questions on one COCO-named image, in the exact official layout."""
    (root / "images" / subtype).mkdir(parents=True)
    if with_image:
        Image.new("RGB", (8, 8), (255, 0, 0)).save(root / "images" / subtype / f"COCO_{subtype}_000000000042.jpg")
    questions = {
        "info": {},
        "task_type": "Open-Ended",
        "data_type": "mscoco",
        "license": {},
        "data_subtype": subtype,
        "questions": [
            {"image_id": 42, "question": "What color is the ball?", "question_id": 42000},
            {"image_id": 42, "question": "How many balls?", "question_id": 42001},
        ],
    }
    answers_color = ["red"] * 7 + ["Red"] * 2 + ["dark red"]
    answers_count = ["2"] * 2 + ["two"] * 2 + ["3"] * 6
    annotations = {
        "info": {},
        "license": {},
        "data_subtype": subtype,
        "annotations": [
            {
                "question_type": "what color is the",
                "multiple_choice_answer": "red",
                "image_id": 42,
                "answer_type": "other",
                "question_id": 42000,
                "answers": [
                    {"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers_color)
                ],
            },
            {
                "question_type": "how many",
                "multiple_choice_answer": "3",
                "image_id": 42,
                "answer_type": "number",
                "question_id": 42001,
                "answers": [
                    {"answer": a, "answer_confidence": "maybe", "answer_id": i + 1} for i, a in enumerate(answers_count)
                ],
            },
        ],
    }
    (root / f"v2_OpenEnded_mscoco_{subtype}_questions.json").write_text(json.dumps(questions))
    (root / f"v2_mscoco_{subtype}_annotations.json").write_text(json.dumps(annotations))


def test_reads_official_files(tmp_path):
    write_fixture(tmp_path)
    examples, annotated = read_vqa_split(tmp_path, "val2014", TEMPLATE)
    assert annotated
    assert [e.question_id for e in examples] == [42000, 42001]
    assert examples[0].image_path.name == "COCO_val2014_000000000042.jpg"
    assert examples[1].question_type == "how many" and examples[1].answer_type == "number"
    assert len(examples[0].answers) == 10


def test_vocab_and_soft_targets(tmp_path):
    write_fixture(tmp_path)
    examples, _ = read_vqa_split(tmp_path, "val2014", TEMPLATE)
    vocab = VQAAnswerVocab.from_examples(examples, top_k=10)
    assert vocab.answers == ["3", "red"]  # equal counts: alphabetical
    # "3" has 6 annotators → 1.0 ("2"/"two" are outside this vocabulary)
    assert vocab.soft_targets(examples[1].answers) == {vocab.index["3"]: 1.0}
    targets = vocab.soft_targets(examples[0].answers)
    assert targets == {vocab.index["red"]: 1.0}  # "dark red" is not in the vocabulary
    assert VQAAnswerVocab.from_examples(examples, top_k=1).answers == ["3"]


def test_soft_targets_count_normalised_answers():
    vocab = VQAAnswerVocab(["2", "red", "yes"])
    # 2 × "Red" + 2 × "red" are 4 matches → 1.0; unnormalised, 2 matches would give 0.6
    assert vocab.soft_targets(["Red", "Red", "red", "red"] + ["blue"] * 6) == {vocab.index["red"]: 1.0}
    # "two" is the official "2": 4 matches → 1.0 (2 → 0.6); "3" is out of the vocabulary
    assert vocab.soft_targets(["2", "2", "two", "two"] + ["3"] * 6) == {vocab.index["2"]: 1.0}
    # 1 match of 10: the mean over leave-one-out subsets, 9/10 · 1/3 = 0.3; 3 matches → (3 · 2/3 + 7) / 10 = 0.9
    assert vocab.soft_targets(["yes"] + ["no"] * 9) == {vocab.index["yes"]: pytest.approx(0.3)}
    assert vocab.soft_targets(["yes"] * 3 + ["no"] * 7) == {vocab.index["yes"]: pytest.approx(0.9)}


def test_unannotated_split_reads_questions_only(tmp_path):
    write_fixture(tmp_path, "test2015")
    (tmp_path / "v2_mscoco_test2015_annotations.json").unlink()
    examples, annotated = read_vqa_split(tmp_path, "test2015", TEMPLATE.replace("test2015", "{subtype}"))
    assert not annotated and examples[0].answers is None


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (
            lambda r: (r / "v2_OpenEnded_mscoco_val2014_questions.json").write_text('{"questions": ['),
            r"v2_OpenEnded_mscoco_val2014_questions\.json: not valid JSON",
        ),
        (
            lambda r: (r / "v2_OpenEnded_mscoco_val2014_questions.json").write_text('{"qs": []}'),
            r"questions\.json: expected a JSON object with a list under 'questions'",
        ),
        (
            lambda r: (r / "v2_OpenEnded_mscoco_val2014_questions.json").write_text(
                '{"questions": [{"question": "x"}]}'
            ),
            r"questions\.json: question #0 lacks key\(s\) \['question_id', 'image_id'\]",
        ),
        (
            lambda r: (r / "v2_mscoco_val2014_annotations.json").write_text('{"annotations": [{"question_id": 1}]}'),
            r"annotations\.json: annotation #0 lacks key\(s\)",
        ),
        (lambda r: (r / "v2_OpenEnded_mscoco_val2014_questions.json").unlink(), r"questions\.json: file not found"),
        (
            lambda r: (r / "images/val2014/COCO_val2014_000000000042.jpg").unlink(),
            r"question 42000 refers to image 42, but .*COCO_val2014_000000000042\.jpg does not exist",
        ),
    ],
)
def test_bad_input_names_the_file_and_the_expectation(tmp_path, corrupt, message):
    write_fixture(tmp_path)
    corrupt(tmp_path)
    with pytest.raises(VlbenchError, match=message) as info:
        read_vqa_split(tmp_path, "val2014", TEMPLATE)
    assert "\n" not in str(info.value)
