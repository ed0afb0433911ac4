"""The synthetic world's VQA v2 folder: determinism, official shapes, balanced answers, a tokenizer that covers the
corpus, lazy atomic generation."""

import hashlib
import json
from collections import Counter
from pathlib import Path

from vlbench.data.synthetic import SyntheticConfig, ensure_world, write_world
from vlbench.data.text import load_tokenizer

SMALL = SyntheticConfig(images={"train": 40, "val": 8, "test": 8}, questions_per_image=3)


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_files(tmp_path):
    write_world(SMALL, "vqav2", tmp_path / "a")
    write_world(SMALL, "vqav2", tmp_path / "b")
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert len(a) > 50 and a == b


# sha256 of files written by generator v1 (VQA files at the world root): the VQA stream must never change, so
# checkpoints and reported numbers on the synthetic VQA world stay comparable across generator versions
VQA_V1_DIGESTS = {
    "v2_mscoco_train2014_annotations.json": "3ce58f526a8513b9b99a319491365ccd3b830133aee053138b32e507cf0af469",
    "v2_OpenEnded_mscoco_train2014_questions.json": "8701335db65c97dc6d0dd788f283ba53d2f1129fbb7b891b64de2395b6a4dba1",
    "train_sceneGraphs.json": "a7bcbd937bd08a335b300d00f61e0ba749b5929be73421779dbc7079709e471c",
}


def test_vqa_files_are_unchanged_since_v1(tmp_path):
    write_world(SMALL, "vqav2", tmp_path)
    assert {name: tree_digest(tmp_path)[name] for name in VQA_V1_DIGESTS} == VQA_V1_DIGESTS


def test_different_seed_gives_different_world(tmp_path):
    write_world(SMALL, "vqav2", tmp_path / "a")
    write_world(SyntheticConfig(seed=1, images=SMALL.images, questions_per_image=3), "vqav2", tmp_path / "b")
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert a.keys() == b.keys()
    assert a["v2_mscoco_train2014_annotations.json"] != b["v2_mscoco_train2014_annotations.json"]


def test_official_vqa_v2_shapes(small_world):
    questions = json.loads((small_world / "v2_OpenEnded_mscoco_val2014_questions.json").read_text())
    annotations = json.loads((small_world / "v2_mscoco_val2014_annotations.json").read_text())
    assert {"info", "task_type", "data_type", "license", "data_subtype", "questions"} <= questions.keys()
    assert questions["data_subtype"] == "val2014"
    q = questions["questions"][0]
    assert set(q) == {"image_id", "question", "question_id"}
    a = annotations["annotations"][0]
    assert {"question_type", "multiple_choice_answer", "answers", "image_id", "answer_type", "question_id"} <= set(a)
    assert len(a["answers"]) == 10
    assert {x["answer_id"] for x in a["answers"]} == set(range(1, 11))
    assert {x["answer_type"] for x in annotations["annotations"]} <= {"yes/no", "number", "other"}
    image = small_world / "images" / "val2014" / f"COCO_val2014_{q['image_id']:012d}.png"
    assert image.is_file()
    graphs = json.loads((small_world / "val_sceneGraphs.json").read_text())
    obj = next(iter(graphs[str(q["image_id"])]["objects"].values()))
    assert {"name", "x", "y", "w", "h", "attributes", "relations"} <= set(obj)


def test_answers_are_balanced_given_the_question_text(tmp_path):
    """A question-only model must stay near the prior: yes/no families are ~50/50, colours ~uniform."""
    cfg = SyntheticConfig(images={"train": 1500, "val": 0, "test": 0}, questions_per_image=5)
    write_world(cfg, "vqav2", tmp_path)
    annotations = json.loads((tmp_path / "v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    by_family: dict[str, Counter] = {}
    for a in annotations:
        by_family.setdefault(a["synthetic_family"], Counter())[a["synthetic_truth"]] += 1
    assert set(by_family) == {"existence", "count", "attribute", "relation", "compare"}
    for family in ("existence", "relation", "compare"):
        share_yes = by_family[family]["yes"] / sum(by_family[family].values())
        assert 0.42 < share_yes < 0.58, (family, share_yes)
    # within "what color is the <shape>?" no colour dominates
    colours = Counter(a["synthetic_truth"] for a in annotations if a["question_type"] == "what color is the")
    assert max(colours.values()) / sum(colours.values()) < 0.25
    # annotators disagree on a realistic share of questions, but the majority is the truth
    disagree = sum(len({x["answer"] for x in a["answers"]}) > 1 for a in annotations) / len(annotations)
    assert 0.3 < disagree < 0.9
    assert all(a["multiple_choice_answer"] == a["synthetic_truth"] for a in annotations[:200])


def test_tokenizer_covers_every_question(small_world):
    tok = load_tokenizer("auto", small_world)
    questions = json.loads((small_world / "v2_OpenEnded_mscoco_train2014_questions.json").read_text())["questions"]
    ids = tok([q["question"] for q in questions])["input_ids"]
    assert all(seq[0] == tok.cls_token_id and seq[-1] == tok.sep_token_id for seq in ids)
    assert not any(tok.unk_token_id in seq for seq in ids)


def test_world_is_generated_once_and_atomically(tmp_path):
    first = ensure_world(SMALL, "vqav2", tmp_path)
    assert first.name == "vqav2" and first.parent.name.startswith("world-")
    mtime = (first / "world.json").stat().st_mtime_ns
    assert ensure_world(SMALL, "vqav2", tmp_path) == first
    assert (first / "world.json").stat().st_mtime_ns == mtime
    assert not list((tmp_path / "synthetic").rglob(".partial-*"))
    assert [p.name for p in first.parent.iterdir()] == ["vqav2"]  # no other format generated
