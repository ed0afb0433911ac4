"""The bad-input matrix (docs/RELIABILITY.md): each bad input fails with one line naming the file or key and what was
expected, before training where the input is read before training, and leaves no result.json or predictions.

Most rows run the runner in-process on a copy of the small synthetic world with one thing broken (fast); a few go
through the `vlbench` command to show what a user sees (exit status, the one line, failed.json). The checkpoint rows
include a pickle that runs code when unpickled: every path a user can point at a checkpoint must refuse it without
running it (the marker file it would create must not appear).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import SMALL_WORLD
from tests.test_cli import TRAINER_KEYS, error_lines, vlbench
from vlbench.data.extract import ExtractionConfig, extract_features
from vlbench.data.regions import RegionStoreWriter
from vlbench.errors import VlbenchError
from vlbench.runner import run
from vlbench.tasks.vqa import VQAAnswerVocab
from vlbench.tasks.vqa_eval import question_accuracy

TEMPLATE = "images/{subtype}/COCO_{subtype}_{image_id:012d}.png"  # conf/data/synthetic.yaml's VQA image template
SUBTYPES = {"train": "train2014", "val": "val2014", "test": "test2015"}


def questions_file(root: Path, split: str) -> Path:
    return root / f"v2_OpenEnded_mscoco_{SUBTYPES[split]}_questions.json"


def annotations_file(root: Path, split: str) -> Path:
    return root / f"v2_mscoco_{SUBTYPES[split]}_annotations.json"


def image_file(root: Path, split: str, image_id: int) -> Path:
    return root / TEMPLATE.format(subtype=SUBTYPES[split], image_id=image_id)


@pytest.fixture
def world(small_world, tmp_path) -> Path:
    """A private copy of the small world's VQA folder (~160 small files), free to break."""
    return Path(shutil.copytree(small_world, tmp_path / "data"))


def edit_json(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


def assert_refused(error: pytest.ExceptionInfo, expected: str, run_dir: Path) -> None:
    """The exact one-line message, and nothing a finished run writes (result, predictions, scores)."""
    message = str(error.value)
    assert "\n" not in message
    assert message == expected
    assert not (run_dir / "result.json").exists()
    assert not list(run_dir.glob("predictions*")) and not list(run_dir.glob("scores_*"))


def refuse(make_cfg, run_dir: Path, *overrides: str) -> pytest.ExceptionInfo:
    with pytest.raises(VlbenchError) as error:
        run(make_cfg(*overrides), run_dir)
    return error


# ----- data roots -----------------------------------------------------------------------------------------------------


def test_missing_data_root(make_cfg, tmp_path):
    root = tmp_path / "nowhere"
    error = refuse(make_cfg, tmp_path / "run", "model=textonly", f"data.root={root}")
    expected = f"data.root={root}: directory not found (expected the dataset's official files there)"
    assert_refused(error, expected, tmp_path / "run")


def test_empty_data_root(make_cfg, tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    error = refuse(make_cfg, tmp_path / "run", "model=textonly", f"data.root={root}")
    expected = f"data.root={root}: the directory is empty (expected the dataset's official files there)"
    assert_refused(error, expected, tmp_path / "run")


# ----- annotation files ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["train questions", "val annotations"])
def test_corrupt_json(make_cfg, tmp_path, world, which):
    split, kind = which.split()
    path = questions_file(world, split) if kind == "questions" else annotations_file(world, split)
    text = path.read_text()[:300]  # cut mid-file, as an interrupted download leaves it
    path.write_text(text)
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        expected = f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})"
    error = refuse(make_cfg, tmp_path / "run", "model=textonly", f"data.root={world}")
    assert_refused(error, expected, tmp_path / "run")


def test_corrupt_tokenizer_file(make_cfg, tmp_path, world):
    path = world / "tokenizer.json"
    path.write_text(path.read_text()[:200])
    error = refuse(make_cfg, tmp_path / "run", "model=textonly", f"data.root={world}")
    message = str(error.value)  # ours around the tokenizers library's reason ("... at line 1 column 200")
    assert message.startswith(f"{path}: not a readable tokenizer file (")
    assert message.endswith("; expected HF tokenizers' JSON)")
    assert_refused(error, message, tmp_path / "run")


def _set_first(key: str, value):
    def change(doc):
        doc[key][0][value[0]] = value[1]

    return change


def _drop_first(key: str, field: str):
    def change(doc):
        del doc[key][0][field]

    return change


# (file, change, expected message after "<file path>: "): a list where an object is expected, a missing field, a field
# of the wrong type, a value the image template cannot take, an annotation without answers
WRONG_SCHEMA = {
    "questions-a-list": (
        "questions",
        lambda doc: doc.__setitem__("questions", {"0": doc["questions"][0]}),
        "expected a JSON object with a list under 'questions' (official VQA v2 format)",
    ),
    "question-without-image-id": (
        "questions",
        _drop_first("questions", "image_id"),
        "question #0 lacks key(s) ['image_id'] (expected ['question_id', 'image_id', 'question'])",
    ),
    "question-text-a-number": (
        "questions",
        _set_first("questions", ("question", 7)),
        "question #0 has question=7 (int), expected str",
    ),
    "image-id-text-for-a-number-template": (
        "questions",
        _set_first("questions", ("image_id", "abc")),
        "question {qid} does not fit the image template '" + TEMPLATE + "' "
        "(ValueError: Unknown format code 'd' for object of type 'str')",
    ),
    "annotation-without-multiple-choice-answer": (
        "annotations",
        _drop_first("annotations", "multiple_choice_answer"),
        "annotation #0 lacks key(s) ['multiple_choice_answer'] "
        "(expected ['question_id', 'answers', 'multiple_choice_answer', 'question_type', 'answer_type'])",
    ),
    "annotation-with-no-answers": (
        "annotations",
        _set_first("annotations", ("answers", [])),
        "annotation #0 'answers' must be a non-empty list of {'answer': str, ...}",
    ),
}


@pytest.mark.parametrize("case", list(WRONG_SCHEMA))
def test_json_of_the_wrong_schema(make_cfg, tmp_path, world, case):
    kind, change, expected = WRONG_SCHEMA[case]
    path = questions_file(world, "train") if kind == "questions" else annotations_file(world, "train")
    qid = json.loads(questions_file(world, "train").read_text())["questions"][0]["question_id"]
    edit_json(path, change)
    error = refuse(make_cfg, tmp_path / "run", "model=textonly", f"data.root={world}")
    assert_refused(error, f"{path}: {expected.replace('{qid}', str(qid))}", tmp_path / "run")


def test_question_whose_image_is_missing(make_cfg, tmp_path, world):
    question = json.loads(questions_file(world, "test").read_text())["questions"][0]
    image = image_file(world, "test", question["image_id"])
    image.unlink()
    error = refuse(make_cfg, tmp_path / "run", "model=textonly", f"data.root={world}")
    expected = (
        f"{questions_file(world, 'test')}: question {question['question_id']} refers to image "
        f"{question['image_id']}, but {image} does not exist"
    )
    assert_refused(error, expected, tmp_path / "run")


def test_empty_split(make_cfg, tmp_path, world):
    edit_json(questions_file(world, "val"), lambda doc: doc.__setitem__("questions", []))
    edit_json(annotations_file(world, "val"), lambda doc: doc.__setitem__("annotations", []))
    error = refuse(make_cfg, tmp_path / "run", "model=textonly", f"data.root={world}")
    assert_refused(error, f"{questions_file(world, 'val')}: no questions (an empty split)", tmp_path / "run")


# ----- images and region features -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("damage", "workers"),
    [("truncated", 0), ("not-an-image", 0), ("truncated", 1)],  # a loader worker's error reads as the same line
)
def test_unreadable_image(make_cfg, tmp_path, world, damage, workers):
    # images are decoded when first loaded (not all up front: real datasets have 100k+), so break every training
    # image: the first training batch meets one; the run stops before any checkpoint, prediction or result
    images = sorted((world / "images" / SUBTYPES["train"]).iterdir())
    for path in images:
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"not a PNG at all\n")
    run_dir = tmp_path / "run"
    error = refuse(make_cfg, run_dir, "model=albef", f"data.root={world}", f"trainer.num_workers={workers}")
    message = str(error.value)
    path, _, rest = message.partition(": ")
    assert Path(path) in images and rest.startswith("not a readable image (") and rest.endswith(")")
    assert_refused(error, message, run_dir)
    assert not (run_dir / "checkpoints").exists()


def _region_store(path: Path, feature_dim: int) -> Path:
    with RegionStoreWriter(path, feature_dim, source="test") as writer:
        boxes = np.array([[0.1, 0.1, 0.5, 0.5], [0.2, 0.2, 0.9, 0.9]], dtype=np.float32)
        writer.add("1", np.ones((2, feature_dim), dtype=np.float32), boxes, img_h=8, img_w=8)
    return path


def test_region_features_of_another_dimension(make_cfg, tmp_path):
    store = _region_store(tmp_path / "store", feature_dim=8)  # LXMERT tiny eats 147-d features
    error = refuse(make_cfg, tmp_path / "run", "model=lxmert", f"data.datasets.vqav2.region_features={store}")
    expected = (
        f"region store {store} holds 8-d features but model.visual_feature_dim=147: set model.visual_feature_dim=8 "
        "or point at a store extracted with a matching backbone"
    )
    assert_refused(error, expected, tmp_path / "run")


def test_region_feature_file_disagreeing_with_its_store(make_cfg, tmp_path):
    store = _region_store(tmp_path / "store", feature_dim=147)
    np.save(store / "features.npy", np.zeros((2, 4), dtype=np.float16))  # a features file of another dimension
    error = refuse(make_cfg, tmp_path / "run", "model=lxmert", f"data.datasets.vqav2.region_features={store}")
    expected = f"region store {store}: features.npy is float16 [2, 4], index and meta.json expect float16 [2, 147]"
    assert_refused(error, expected, tmp_path / "run")


# ----- evaluation: answers outside the vocabulary -------------------------------------------------------------------


def test_answers_outside_the_vocabulary_score_zero_and_do_not_crash(make_cfg, tmp_path, world):
    """Documented behaviour: the vocabulary is the training split's top-K answers; a ground-truth answer outside it
    has no training target (all-zero soft targets) and is still scored by the official evaluator, where a prediction
    (always from the vocabulary) that matches none of the ground-truth answers scores 0."""
    unseen = "zebra unicorn"
    qid = json.loads(annotations_file(world, "test").read_text())["annotations"][0]["question_id"]

    def unseen_answers(doc):
        doc["annotations"][0]["answers"] = [{"answer": unseen, "answer_id": k + 1} for k in range(10)]
        doc["annotations"][0]["multiple_choice_answer"] = unseen

    edit_json(annotations_file(world, "test"), unseen_answers)
    result = run(make_cfg("model=textonly", "trainer.max_steps=1", f"data.root={world}"), tmp_path / "run")
    scores = json.loads((tmp_path / "run" / "scores_test.json").read_text())
    assert scores[str(qid)] == 0.0 and 0.0 <= result["metrics"]["accuracy"] <= 100.0
    assert VQAAnswerVocab(["yes", "no"]).soft_targets([unseen] * 10) == {}
    assert question_accuracy("yes", [unseen] * 10) == 0.0


# ----- configuration ------------------------------------------------------------------------------------------------


def test_unknown_model_name_in_the_config(make_cfg, tmp_path):
    error = refuse(make_cfg, tmp_path / "run", "model=textonly", "model.name=textonlyy")
    expected = "model.name='textonlyy': no such model; registered: albef, lxmert, majority, pixelbert, textonly, unimo3"
    assert_refused(error, expected, tmp_path / "run")


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "trainer.max_stepz=5",
            f"unknown config key 'trainer.max_stepz' (known keys of trainer: {TRAINER_KEYS})",
        ),
        (
            "+trainer.max_stepz=5",
            f"unknown config key 'trainer.max_stepz' (known keys of trainer: {TRAINER_KEYS})",
        ),
        (
            "model=alberf",
            "model=alberf: no such option in config group 'model' (available: albef, lxmert, majority, pixelbert, "
            "textonly, unimo3)",
        ),
    ],
)
def test_unknown_config_key_or_model_on_the_command_line(tmp_path, cache_dir, override, expected):
    """Rejected while composing (Hydra's schemas; a `+` key by vlbench.schema.check_known_keys), before the app runs:
    one line naming the key and what it could be, exit status 2, no traceback, no run directory."""
    proc = vlbench(override, f"results_dir={tmp_path}/runs", cwd=tmp_path, cache=cache_dir)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(f"vlbench: error: {expected}")
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


# ----- checkpoints ---------------------------------------------------------------------------------------------------


class CodeOnLoad:
    """Unpickling this calls os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.command = f"touch {marker}"

    def __reduce__(self):
        return os.system, (self.command,)


UNSAFE_IMPORT = f"{os.system.__module__}.system"  # posix.system on Linux
REFUSED = (
    "refused: its pickle imports {imports}, which could run code; torch files are read as data only "
    "(torch.load weights_only=True): re-save the tensors as .safetensors where you trust the file"
)


@pytest.fixture
def marker(tmp_path) -> Path:
    path = tmp_path / "code-ran"
    yield path
    assert not path.exists(), "a checkpoint's pickle ran code"


def code_checkpoint(path: Path, marker: Path) -> Path:
    """A torch.save checkpoint whose unpickling runs ``touch <marker>`` (tensors beside it, as a real one has)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {"embeddings.weight": torch.zeros(2, 2)}, "args": CodeOnLoad(marker)}, path)
    return path


def test_the_code_checkpoint_really_runs_code_when_unpickled(tmp_path):
    """The attack is real (so the refusals below mean something): an unsafe torch.load runs it."""
    marker = tmp_path / "ran"
    torch.load(code_checkpoint(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.fixture
def finished_run(make_cfg, tmp_path) -> Path:
    """A finished textonly run (one step): the source for init_from rows."""
    run_dir = tmp_path / "source"
    run(make_cfg("model=textonly", "trainer.max_steps=1"), run_dir)
    return run_dir


@pytest.fixture
def stopped_run(make_cfg, tmp_path) -> tuple[Path, tuple[str, ...]]:
    """A textonly run stopped at step 1 of 2 (resumable), and the overrides that resume it."""
    run_dir = tmp_path / "stopped"
    overrides = ("model=textonly", "trainer.max_steps=2")
    assert run(make_cfg(*overrides, "trainer.stop_at_step=1"), run_dir)["stopped_at_step"] == 1
    return run_dir, (*overrides, f"resume={run_dir}")


def cut_in_half(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return len(data) // 2, len(data)


def test_truncated_checkpoint_for_init_from(make_cfg, tmp_path, finished_run):
    weights = finished_run / "checkpoints" / "best.safetensors"
    have, whole = cut_in_half(weights)
    error = refuse(make_cfg, tmp_path / "run", "model=textonly", f"init_from={finished_run}")
    expected = (
        f"init_from={weights}: truncated: {have} of the {whole} bytes its header describes "
        "(an interrupted save or copy?)"
    )
    assert_refused(error, expected, tmp_path / "run")


def test_truncated_weights_for_resume(make_cfg, stopped_run):
    run_dir, resume = stopped_run
    weights = run_dir / "checkpoints" / "last.safetensors"
    have, whole = cut_in_half(weights)
    error = refuse(make_cfg, run_dir, *resume)
    expected = f"{weights}: truncated: {have} of the {whole} bytes its header describes (an interrupted save or copy?)"
    assert_refused(error, expected, run_dir)
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 1  # no step ran after the refusal


def test_truncated_trainer_state_for_resume(make_cfg, stopped_run):
    run_dir, resume = stopped_run
    state = run_dir / "checkpoints" / "last.state.pt"
    cut_in_half(state)
    error = refuse(make_cfg, run_dir, *resume)
    message = str(error.value)  # ours, then torch's reason in parentheses ("PytorchStreamReader failed ...")
    assert message.startswith(f"{state}: not a readable torch file, truncated or corrupt (") and message.endswith(")")
    assert_refused(error, message, run_dir)


def test_checkpoint_of_another_model_family(make_cfg, tmp_path, finished_run):
    weights = finished_run / "checkpoints" / "best.safetensors"
    error = refuse(make_cfg, tmp_path / "run", "model=albef", f"init_from={finished_run}", "trainer.max_steps=1")
    message = str(error.value)
    assert message.startswith(f"init_from={weights}: missing from the checkpoint: ")
    assert "; not in this model: " in message and " ... and " in message  # the keys, listed and counted
    assert message.endswith(" (the source run is model=textonly, this run model=albef)")
    assert_refused(error, message, tmp_path / "run")


# Every place a user can name a reference checkpoint: (model, config key, file name) for the pickle that runs code.
CODE_CHECKPOINT_PATHS = {
    "albef model.init_checkpoint": ("albef", "model.init_checkpoint", "ALBEF.pth"),
    "albef model.vit_init": ("albef", "model.vit_init", "deit_base.pth"),
    "albef model.bert_init (a directory)": ("albef", "model.bert_init", "bert/pytorch_model.bin"),
    "lxmert model.init_checkpoint": ("lxmert", "model.init_checkpoint", "model_LXRT.pth"),
    "pixelbert model.cnn_init": ("pixelbert", "model.cnn_init", "resnet50.pth"),
}


@pytest.mark.parametrize("case", list(CODE_CHECKPOINT_PATHS))
def test_code_checkpoint_as_reference_weights(make_cfg, tmp_path, marker, case):
    model, key, name = CODE_CHECKPOINT_PATHS[case]
    path = code_checkpoint(tmp_path / "downloads" / name, marker)
    given = path.parent if name.endswith("pytorch_model.bin") else path
    # LXMERT eats region features: a tiny store of the right size (the synthetic one would be extracted first)
    regions = [f"data.datasets.vqav2.region_features={_region_store(tmp_path / 'store', 147)}"] * (model == "lxmert")
    error = refuse(make_cfg, tmp_path / "run", f"model={model}", f"{key}={given}", *regions)
    assert_refused(error, f"{key}={path}: " + REFUSED.format(imports=UNSAFE_IMPORT), tmp_path / "run")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch notes the protocol, then refuses
def test_plain_pickle_as_reference_weights(make_cfg, tmp_path, marker):
    path = tmp_path / "weights.pkl"
    path.write_bytes(pickle.dumps({"w": CodeOnLoad(marker)}))  # not even torch's format
    error = refuse(make_cfg, tmp_path / "run", "model=albef", f"model.init_checkpoint={path}")
    # torch reads no plain pickle either way; its data-only reader names why the file is refused
    expected = REFUSED.replace("imports {imports}", "holds objects other than tensors and plain containers")
    assert_refused(error, f"model.init_checkpoint={path}: {expected}", tmp_path / "run")


@pytest.mark.parametrize("where", ["file named .safetensors", "run directory"])
def test_code_checkpoint_for_init_from(make_cfg, tmp_path, marker, where):
    source = tmp_path / "elsewhere"
    weights = code_checkpoint(source / "checkpoints" / "best.safetensors", marker)
    (source / "result.json").write_text("{}")  # looks like a finished run
    given = weights if where.startswith("file") else source
    error = refuse(make_cfg, tmp_path / "run", "model=textonly", f"init_from={given}")
    expected = (
        f"init_from={weights}: a torch/pickle file, not safetensors (pickles can run code: only safetensors are "
        "read here)"
    )
    assert_refused(error, expected, tmp_path / "run")


def test_code_checkpoint_with_a_torch_suffix_for_init_from(make_cfg, tmp_path, marker):
    weights = code_checkpoint(tmp_path / "model.pt", marker)
    error = refuse(make_cfg, tmp_path / "run", "model=textonly", f"init_from={weights}")
    expected = f"init_from={weights}: expected a run directory or a .safetensors checkpoint"
    assert_refused(error, expected, tmp_path / "run")


def test_code_checkpoint_as_trainer_state_for_resume(make_cfg, stopped_run, marker):
    run_dir, resume = stopped_run
    state = code_checkpoint(run_dir / "checkpoints" / "last.state.pt", marker)
    error = refuse(make_cfg, run_dir, *resume)
    assert_refused(error, f"{state}: " + REFUSED.format(imports=UNSAFE_IMPORT), run_dir)


def test_code_checkpoint_for_feature_extraction(tmp_path, marker, small_world):
    """`vlbench-data extract-features --pretrained <file>` reads the backbone's weights as data first."""
    path = code_checkpoint(tmp_path / "resnet18.pth", marker)
    config = ExtractionConfig(backbone="resnet18", boxes="grid:1", image_size=32, pretrained=str(path))
    with pytest.raises(VlbenchError) as error:
        extract_features(small_world / "images" / SUBTYPES["test"], tmp_path / "store", config, progress=False)
    assert str(error.value) == f"--pretrained {path}: " + REFUSED.format(imports=UNSAFE_IMPORT)
    assert not (tmp_path / "store").exists()


def test_code_checkpoint_through_the_command(tmp_path, cache_dir, marker):
    """What a user sees: exit status 2, one `vlbench: error:` line, failed.json with it, no result.json."""
    weights = code_checkpoint(tmp_path / "ALBEF.pth", marker)
    proc = vlbench(
        "model=albef",
        f"model.init_checkpoint={weights}",
        f"results_dir={tmp_path}/runs",
        "run_id=r",
        "trainer.progress=false",
        *SMALL_WORLD,
        cwd=tmp_path,
        cache=cache_dir,
    )
    expected = f"model.init_checkpoint={weights}: " + REFUSED.format(imports=UNSAFE_IMPORT)
    assert proc.returncode == 2 and error_lines(proc) == [f"vlbench: error: {expected}"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    run_dir = tmp_path / "runs" / "albef" / "vqa" / "r"
    assert json.loads((run_dir / "failed.json").read_text())["error"] == f"VlbenchError: {expected}"
    assert not (run_dir / "result.json").exists() and not list(run_dir.glob("predictions*"))
