"""The synthetic world's GQA, NLVR2 and Karpathy folders: determinism, lazy per-format generation, official fields,
answers/labels balanced given the text, entailment and consistency groups, one tokenizer covering every text."""

import dataclasses
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from tests.data.test_synthetic import tree_digest
from vlbench.data.sources import resolve_data_root
from vlbench.data.synthetic import FORMATS, SyntheticConfig, ensure_world, write_world
from vlbench.data.text import load_tokenizer

TINY = SyntheticConfig(
    images={"train": 8, "val": 2, "test": 2},
    gqa_images={"train": 30, "val": 6, "test": 6},
    nlvr2_sentences={"train": 8, "val": 3, "test": 3},
    karpathy_images={"train": 24, "restval": 3, "val": 5, "test": 5},
)
# large enough for answer shares to be meaningful, small enough to generate in about a second
BALANCE = SyntheticConfig(
    gqa_images={"train": 600, "val": 0, "test": 0},
    nlvr2_sentences={"train": 200, "val": 0, "test": 0},
)
NEW_FORMATS = ("gqa", "nlvr2", "karpathy")
STRUCTURAL = {"verify", "query", "choose", "logical", "compare"}
SEMANTIC = {"obj", "attr", "rel", "cat", "global"}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    cache = tmp_path_factory.mktemp("formats")
    return {name: ensure_world(TINY, name, cache) for name in FORMATS}


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("data_format", NEW_FORMATS)
def test_same_seed_gives_identical_files(tmp_path, data_format):
    write_world(TINY, data_format, tmp_path / "a")
    write_world(TINY, data_format, tmp_path / "b")
    a, b = tree_digest(tmp_path / "a"), tree_digest(tmp_path / "b")
    assert len(a) > 20 and a == b
    write_world(dataclasses.replace(TINY, seed=1), data_format, tmp_path / "c")
    assert tree_digest(tmp_path / "c") != a


def test_formats_are_generated_lazily_and_independently(tmp_path):
    gqa = ensure_world(TINY, "gqa", tmp_path)
    assert [p.name for p in gqa.parent.iterdir()] == ["gqa"]
    before = tree_digest(gqa)
    mtime = (gqa / "world.json").stat().st_mtime_ns
    nlvr2 = ensure_world(TINY, "nlvr2", tmp_path)
    assert nlvr2.parent == gqa.parent and sorted(p.name for p in gqa.parent.iterdir()) == ["gqa", "nlvr2"]
    assert ensure_world(TINY, "gqa", tmp_path) == gqa
    assert (gqa / "world.json").stat().st_mtime_ns == mtime and tree_digest(gqa) == before
    assert not list(gqa.parent.glob(".partial-*"))


def test_every_format_shares_one_tokenizer_covering_all_its_texts(world):
    tokenizers = {(folder / "tokenizer.json").read_bytes() for folder in world.values()}
    assert len(tokenizers) == 1
    gqa = json.loads((world["gqa"] / "train_balanced_questions.json").read_text()).values()
    karpathy = json.loads((world["karpathy"] / "dataset_coco.json").read_text())["images"]
    lxmert = json.loads((world["karpathy"] / "lxmert_train.json").read_text())
    texts = {
        "gqa": [t for q in gqa for t in (q["question"], q["answer"], q["fullAnswer"])],
        "nlvr2": [row["sentence"] for row in read_lines(world["nlvr2"] / "train.json")],
        "karpathy": [s["raw"] for image in karpathy for s in image["sentences"]]
        + [q for row in lxmert for q in row["sentf"]["vqa"]]
        + [a for row in lxmert for label in row["labelf"]["vqa"] for a in label],
    }
    for name, corpus in texts.items():
        tok = load_tokenizer("auto", world[name])
        ids = tok(corpus)["input_ids"]
        assert not any(tok.unk_token_id in seq for seq in ids), name


# --- GQA ---------------------------------------------------------------------------------------------------------


def test_gqa_official_fields_and_entailment(world):
    root = world["gqa"]
    structural = Counter()
    for split in ("train", "val", "testdev"):
        questions = json.loads((root / f"{split}_balanced_questions.json").read_text())
        graphs = json.loads((root / f"{split}_sceneGraphs.json").read_text())
        assert questions and {q["imageId"] for q in questions.values()} == set(graphs)
        for qid, q in questions.items():
            assert isinstance(qid, str) and isinstance(q["imageId"], str)
            assert q["isBalanced"] is True
            assert q["types"]["structural"] in STRUCTURAL and q["types"]["semantic"] in SEMANTIC
            assert set(q["groups"]) == {"global", "local"}
            assert q["annotations"] == {"question": {}, "answer": {}, "fullAnswer": {}}
            assert q["equivalent"] == [qid]
            for other in q["entailed"]:  # the same file, the same image
                assert other != qid and questions[other]["imageId"] == q["imageId"]
            for k, step in enumerate(q["semantic"]):
                assert set(step) == {"operation", "argument", "dependencies"}
                assert all(d < k for d in step["dependencies"])
            assert (root / "images" / f"{q['imageId']}.png").is_file()
            structural[q["types"]["structural"]] += 1
        obj = next(iter(next(iter(graphs.values()))["objects"].values()))
        assert {"name", "x", "y", "w", "h", "attributes", "relations"} <= set(obj)
    assert set(structural) == STRUCTURAL


def test_gqa_answers_agree_with_scene_graphs_and_entailed_questions(world):
    questions = json.loads((world["gqa"] / "train_balanced_questions.json").read_text())
    graphs = json.loads((world["gqa"] / "train_sceneGraphs.json").read_text())
    checked = entailed = 0
    for q in questions.values():
        objects = graphs[q["imageId"]]["objects"].values()
        if q["types"]["detailed"] == "queryColor":  # "What color is the circle?"
            shape = q["question"].removeprefix("What color is the ").removesuffix("?")
            assert [o["attributes"][0] for o in objects if o["name"] == shape] == [q["answer"]]
            checked += 1
        if q["types"]["detailed"] == "existColor":  # "Is there a red object?"
            color = q["question"].split()[3]
            assert q["answer"] == ("yes" if any(o["attributes"][0] == color for o in objects) else "no")
            checked += 1
        if q["types"]["detailed"] == "queryShape":  # its entailed verify names the answer iff it says yes
            for other in map(questions.get, q["entailed"]):
                if other["types"]["detailed"] == "verifyShape":
                    assert (other["answer"] == "yes") == other["question"].endswith(f" {q['answer']}?")
                    entailed += 1
    assert checked > 10 and entailed > 0


def test_gqa_answers_are_balanced_given_the_text(tmp_path):
    write_world(BALANCE, "gqa", tmp_path)
    questions = json.loads((tmp_path / "train_balanced_questions.json").read_text()).values()
    assert len(questions) > 0.99 * 600 * BALANCE.gqa_questions_per_image  # a scene of two blue circles has fewer
    by_template: dict[str, Counter] = defaultdict(Counter)
    for q in questions:
        by_template[q["types"]["detailed"]][q["answer"]] += 1
    assert len(by_template) >= 12
    for template, answers in by_template.items():
        share = max(answers.values()) / sum(answers.values())
        assert share < 0.6, (template, answers)
        if set(answers) == {"yes", "no"}:
            assert share < 0.55, (template, answers)
    # a question-only model that memorises each training text is near chance on binary questions
    by_text: dict[str, Counter] = defaultdict(Counter)
    for q in questions:
        if q["answer"] in ("yes", "no"):
            by_text[q["question"]][q["answer"]] += 1
    memorised = sum(max(c.values()) for c in by_text.values()) / sum(sum(c.values()) for c in by_text.values())
    assert memorised < 0.62
    assert sum(bool(q["entailed"]) for q in questions) > 0.3 * len(questions)


# --- NLVR2 -------------------------------------------------------------------------------------------------------


def test_nlvr2_identifiers_images_and_consistency_groups(world):
    root = world["nlvr2"]
    for split, n_sentences in (("train", 8), ("dev", 3), ("test1", 3)):
        rows = read_lines(root / f"{split}.json")
        groups: dict[str, list[dict]] = defaultdict(list)
        for row in rows:
            assert re.fullmatch(rf"{split}-\d+-\d+-0", row["identifier"]), row["identifier"]
            assert row["label"] in ("True", "False") and row["sentence"].endswith(".")
            assert ("directory" in row) == (split == "train")
            pair = row["identifier"].rsplit("-", 1)[0]
            for index in (0, 1):
                assert (root / "images" / split / f"{pair}-img{index}.png").is_file()
            set_id = re.sub(r"^(\w+-\d+)-\d+-", r"\1--", row["identifier"])  # the official grouping key
            groups[set_id].append(row)
        assert len(groups) == n_sentences
        for group in groups.values():
            assert len(group) == TINY.nlvr2_pairs_per_sentence and len({r["sentence"] for r in group}) == 1
            assert Counter(r["label"] for r in group) == {"True": 2, "False": 2}
            assert sorted(int(r["identifier"].split("-")[2]) for r in group) == [0, 1, 2, 3]


def test_nlvr2_labels_are_balanced_given_the_text(tmp_path):
    write_world(BALANCE, "nlvr2", tmp_path)
    rows = read_lines(tmp_path / "train.json")
    by_template: dict[str, Counter] = defaultdict(Counter)
    for row in rows:
        by_template[row["synthetic_template"]][row["label"]] += 1
    from vlbench.data.synthetic_nlvr2 import TEMPLATES

    assert set(by_template) == set(TEMPLATES)
    for template, labels in by_template.items():
        assert labels["True"] == labels["False"], (template, labels)
    sentences = " ".join(row["sentence"] for row in rows)
    for phrase in ("more", "Both images", "exactly", "left image", "right image"):
        assert phrase in sentences


# --- Karpathy + LXMERT files ---------------------------------------------------------------------------------------


def test_karpathy_captions_and_splits(world):
    root = world["karpathy"]
    doc = json.loads((root / "dataset_coco.json").read_text())
    images = doc["images"]
    assert doc["dataset"] == "coco"
    assert Counter(i["split"] for i in images) == TINY.karpathy_images
    graphs = json.loads((root / "sceneGraphs.json").read_text())
    assert set(graphs) == {str(i["cocoid"]) for i in images}
    sentids = [s["sentid"] for i in images for s in i["sentences"]]
    assert len(set(sentids)) == len(sentids)
    well_described = 0
    for imgid, image in enumerate(images):
        assert image["imgid"] == imgid
        assert image["filepath"] == ("train2014" if image["split"] == "train" else "val2014")
        assert image["filename"] == f"COCO_{image['filepath']}_{image['cocoid']:012d}.png"
        assert (root / "images" / image["filepath"] / image["filename"]).is_file()
        assert len(image["sentences"]) == 5 and image["sentids"] == [s["sentid"] for s in image["sentences"]]
        assert len({s["raw"] for s in image["sentences"]}) == 5
        for s in image["sentences"]:
            assert s["imgid"] == imgid and s["tokens"] == re.findall(r"[a-z0-9]+", s["raw"].lower())
        # most captions name every object by colour and shape, so a caption picks out its image
        named = [f"{o['attributes'][0]} {o['name']}" for o in graphs[str(image["cocoid"])]["objects"].values()]
        well_described += sum(all(n in s["raw"] for n in named) for s in image["sentences"]) >= 3
    assert well_described == len(images)


def test_lxmert_pretraining_files(world):
    root = world["karpathy"]
    images = json.loads((root / "dataset_coco.json").read_text())["images"]
    stems = {
        split: {i["filename"].removesuffix(".png") for i in images if i["split"] == split}
        for split in TINY.karpathy_images
    }
    train = json.loads((root / "lxmert_train.json").read_text())
    val = json.loads((root / "lxmert_val.json").read_text())
    assert {r["img_id"] for r in train} == stems["train"] | stems["restval"]
    assert {r["img_id"] for r in val} == stems["val"]  # test images are never pre-trained on
    for row in train + val:
        assert set(row) == {"img_id", "sentf", "labelf"}
        assert len(row["sentf"]["mscoco"]) == 5
        assert len(row["sentf"]["vqa"]) == len(row["labelf"]["vqa"]) > 0
        assert all(len(label) == 1 and next(iter(label.values())) == 1.0 for label in row["labelf"]["vqa"])
    assert (root / "objects_vocab.txt").read_text().split() == ["circle", "square", "triangle"]
    assert len((root / "attributes_vocab.txt").read_text().split()) == 8


# --- the config's image templates match the generator's layout -----------------------------------------------------


def test_data_config_templates_find_the_generated_images(make_cfg, cache_dir):
    cfg = make_cfg(
        "data.gqa_images={train: 4, val: 2, test: 2}",
        "data.nlvr2_sentences={train: 2, val: 1, test: 1}",
        "data.karpathy_images={train: 4, restval: 1, val: 2, test: 2}",
    )
    gqa = resolve_data_root(cfg.data, "gqa")
    assert gqa.name == "gqa" and gqa.parent == resolve_data_root(cfg.data, "vqav2").parent
    files = cfg.data.datasets
    for split in files.gqa.splits.values():
        q = next(iter(json.loads((gqa / f"{split}_balanced_questions.json").read_text()).values()))
        assert (gqa / files.gqa.image_template.format(subtype=split, image_id=q["imageId"])).is_file()
    nlvr2 = resolve_data_root(cfg.data, "nlvr2")
    for split in files.nlvr2.splits.values():
        row = read_lines(nlvr2 / f"{split}.json")[0]
        identifier = row["identifier"].rsplit("-", 1)[0]
        for index in (0, 1):
            assert (
                nlvr2 / files.nlvr2.image_template.format(subtype=split, identifier=identifier, index=index)
            ).is_file()
    karpathy = resolve_data_root(cfg.data, "karpathy")
    for image in json.loads((karpathy / "dataset_coco.json").read_text())["images"]:
        assert (karpathy / files.karpathy.image_template.format(**image)).is_file()
