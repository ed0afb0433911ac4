"""Readers of the official GQA, NLVR2 and Karpathy formats, on small fixture files written here in those formats."""

import json

import pytest
from PIL import Image

from vlbench.errors import VlbenchError
from vlbench.tasks.gqa import read_gqa_split
from vlbench.tasks.nlvr2 import pair_identifier, read_nlvr2_split
from vlbench.tasks.retrieval import read_karpathy_split


def _png(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (200, 10, 10)).save(path)


def _gqa_question(image_id, question, answer, entailed=()):
    return {
        "imageId": image_id,
        "question": question,
        "answer": answer,
        "fullAnswer": f"The answer is {answer}.",
        "isBalanced": True,
        "types": {"structural": "query", "semantic": "attr", "detailed": "colorQuery"},
        "entailed": list(entailed),
        "equivalent": [],
        "groups": {"global": "color", "local": "10q-color"},
        "semantic": [{"operation": "select", "argument": "circle (1)", "dependencies": []}],
        "annotations": {"question": {}, "answer": {}, "fullAnswer": {}},
    }


def test_gqa_reader(tmp_path):
    _png(tmp_path / "images" / "n1.jpg")
    questions = {"q1": _gqa_question("n1", "What color is the circle?", "red", ["q2"]),
                 "q2": _gqa_question("n1", "Is the circle red?", "yes")}  # fmt: skip
    (tmp_path / "val_balanced_questions.json").write_text(json.dumps(questions))
    split = read_gqa_split(tmp_path, "val", "images/{image_id}.jpg")
    assert split.question_ids == ["q1", "q2"]
    assert split.questions["q1"]["entailed"] == ["q2"]
    assert split.image_paths[0] == tmp_path / "images" / "n1.jpg"


def test_gqa_reader_errors(tmp_path):
    (tmp_path / "val_balanced_questions.json").write_text(json.dumps({"q1": _gqa_question("n9", "Q?", "yes")}))
    with pytest.raises(VlbenchError, match=r"val_balanced_questions.json: question q1 refers to image n9"):
        read_gqa_split(tmp_path, "val", "images/{image_id}.jpg")
    (tmp_path / "val_balanced_questions.json").write_text(json.dumps({"q1": {"imageId": "n1", "question": "Q?"}}))
    with pytest.raises(VlbenchError, match=r"question q1 lacks key\(s\) \['answer'\]"):
        read_gqa_split(tmp_path, "val", "images/{image_id}.jpg")
    (tmp_path / "val_balanced_questions.json").write_text("{}")
    with pytest.raises(VlbenchError, match="no questions"):
        read_gqa_split(tmp_path, "val", "images/{image_id}.jpg")


def _nlvr2_lines(tmp_path, records, split="dev"):
    (tmp_path / f"{split}.json").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_nlvr2_reader(tmp_path):
    for pair in ("dev-850-0", "dev-850-1"):
        for k in (0, 1):
            _png(tmp_path / "images" / "dev" / f"{pair}-img{k}.png")
    _nlvr2_lines(tmp_path, [
        {"identifier": "dev-850-0-0", "sentence": "Both images show a dog.", "label": "True"},
        {"identifier": "dev-850-1-0", "sentence": "Both images show a dog.", "label": "False"},
    ])  # fmt: skip
    examples = read_nlvr2_split(tmp_path, "dev", "images/{subtype}/{directory}/{identifier}-img{index}.png")
    assert [ex.label for ex in examples] == [1, 0]
    assert examples[1].images[1].path == tmp_path / "images" / "dev" / "dev-850-1-img1.png"
    assert examples[1].images[1].key == "dev-850-1-img1"
    assert pair_identifier("test1-0-3-2") == "test1-0-3"


def test_nlvr2_reader_errors(tmp_path):
    _nlvr2_lines(tmp_path, [{"identifier": "dev-1-0-0", "sentence": "S."}])
    with pytest.raises(VlbenchError, match=r"dev.json: line 1 lacks key\(s\) \['label'\]"):
        read_nlvr2_split(tmp_path, "dev", "images/{subtype}/{identifier}-img{index}.png")
    _nlvr2_lines(tmp_path, [{"identifier": "dev-1-0-0", "sentence": "S.", "label": "maybe"}])
    with pytest.raises(VlbenchError, match=r"record 1 \(dev-1-0-0\) has label 'maybe'"):
        read_nlvr2_split(tmp_path, "dev", "images/{subtype}/{identifier}-img{index}.png")
    _nlvr2_lines(tmp_path, [{"identifier": "dev-1-0-0", "sentence": "S.", "label": "True"}])
    with pytest.raises(VlbenchError, match=r"needs image .*dev-1-0-img0.png, which does not exist"):
        read_nlvr2_split(tmp_path, "dev", "images/{subtype}/{identifier}-img{index}.png")
    (tmp_path / "dev.json").write_text("{not json\n")
    with pytest.raises(VlbenchError, match="line 1 is not valid JSON"):
        read_nlvr2_split(tmp_path, "dev", "images/{subtype}/{identifier}-img{index}.png")
    (tmp_path / "dev.json").write_text("")
    with pytest.raises(VlbenchError, match="no examples"):
        read_nlvr2_split(tmp_path, "dev", "images/{subtype}/{identifier}-img{index}.png")


def _karpathy(tmp_path, images):
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))


def _karpathy_image(i, split, filepath="val2014"):
    name = f"COCO_{filepath}_{i:012d}.jpg"
    return {
        "filepath": filepath,
        "filename": name,
        "imgid": i,
        "cocoid": 1000 + i,
        "split": split,
        "sentids": [2 * i, 2 * i + 1],
        "sentences": [
            {"raw": f"A photo number {i}.", "tokens": ["a", "photo", "number", str(i)], "imgid": i, "sentid": 2 * i},
            {"raw": f"Picture {i}.", "tokens": ["picture", str(i)], "imgid": i, "sentid": 2 * i + 1},
        ],
    }


def test_karpathy_reader(tmp_path):
    images = [_karpathy_image(0, "train", "train2014"), _karpathy_image(1, "restval"), _karpathy_image(2, "test")]
    for im in images:
        _png(tmp_path / "images" / im["filepath"] / im["filename"])
    _karpathy(tmp_path, images)
    train = read_karpathy_split(tmp_path, ["train", "restval"], "images/{filepath}/{filename}")
    assert [im.image_id for im in train] == ["1000", "1001"]
    assert train[0].captions == ["A photo number 0.", "Picture 0."]
    test = read_karpathy_split(tmp_path, ["test"], "images/{filepath}/{filename}")
    assert len(test) == 1 and test[0].ref.path.name == "COCO_val2014_000000000002.jpg"


def test_karpathy_reader_errors(tmp_path):
    with pytest.raises(VlbenchError, match="no dataset_\\*.json"):
        read_karpathy_split(tmp_path, ["test"], "images/{filepath}/{filename}")
    _karpathy(tmp_path, [_karpathy_image(2, "test")])
    with pytest.raises(
        VlbenchError, match=r"image #0 \(COCO_val2014_000000000002.jpg\) needs .*, which does not exist"
    ):
        read_karpathy_split(tmp_path, ["test"], "images/{filepath}/{filename}")
    with pytest.raises(VlbenchError, match=r"no images in split\(s\) \['val'\]"):
        read_karpathy_split(tmp_path, ["val"], "images/{filepath}/{filename}")
