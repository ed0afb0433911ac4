"""Every task end to end through the shared runner on a small synthetic world: record, official prediction files."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from vlbench.data.files import read_jsonl
from vlbench.data.sources import resolve_data_root
from vlbench.errors import VlbenchError
from vlbench.runner import run
from vlbench.tasks.nlvr2_eval import evaluate_nlvr2, read_predictions

SMALL_FORMATS = [
    "data.gqa_images={train:40,val:10,test:10}",
    "data.gqa_questions_per_image=3",
    "data.nlvr2_sentences={train:12,val:4,test:4}",
    "data.karpathy_images={train:24,restval:4,val:6,test:6}",
]


def assert_recalls_consistent(metrics: dict) -> None:
    """Recalls are percentages that cannot fall as k grows; the main metric is their mean."""
    for direction in ("tr", "ir"):
        r1, r5, r10 = (metrics[f"{direction}_r{k}"] for k in (1, 5, 10))
        assert 0 <= r1 <= r5 <= r10 <= 100
    recalls = [metrics[f"{d}_r{k}"] for d in ("tr", "ir") for k in (1, 5, 10)]
    assert metrics["mean_recall"] == pytest.approx(sum(recalls) / 6)


def _metrics_log(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model", ["albef", "unimo3", "textonly", "majority"])
def test_gqa(make_cfg, tmp_path, model):
    cfg = make_cfg(f"model={model}", "task=gqa", *SMALL_FORMATS)
    result = run(cfg, tmp_path / "run")
    assert result["task"] == "gqa"
    assert {"binary", "open"} <= set(result["metrics"])
    assert {"structural", "semantic"} <= set(result["breakdown"])
    predictions = json.loads((tmp_path / "run" / "predictions_test.json").read_text())
    assert predictions and set(predictions[0]) == {"questionId", "prediction"}
    # the recorded accuracy is the official file's: predictions against testdev's answers, every question once
    gold = json.loads((resolve_data_root(cfg.data, "gqa") / "testdev_balanced_questions.json").read_text())
    assert sorted(p["questionId"] for p in predictions) == sorted(gold)
    correct = sum(p["prediction"] == gold[p["questionId"]]["answer"] for p in predictions)
    assert result["metrics"]["accuracy"] == pytest.approx(100 * correct / len(gold))


@pytest.mark.parametrize("model", ["albef", "unimo3", "pixelbert", "textonly", "majority"])
def test_nlvr2(make_cfg, tmp_path, model):
    cfg = make_cfg(f"model={model}", "task=nlvr2", *SMALL_FORMATS)
    result = run(cfg, tmp_path / "run")
    assert result["task"] == "nlvr2" and {"accuracy", "consistency"} <= set(result["metrics"])
    assert result["metrics"]["consistency"] <= result["metrics"]["accuracy"]
    path = tmp_path / "run" / "predictions_test.csv"
    rows = list(csv.reader(path.read_text().splitlines()))
    assert rows and all(len(r) == 2 and r[1] in ("True", "False") for r in rows)
    # the recorded scores are the official file's: every test example once, scored by the official rules
    gold = read_jsonl(resolve_data_root(cfg.data, "nlvr2") / f"{cfg.data.datasets.nlvr2.splits.test}.json")
    assert sorted(r[0] for r in rows) == sorted(ex["identifier"] for ex in gold)
    scores = evaluate_nlvr2(gold, read_predictions(path))
    assert result["metrics"]["accuracy"] == pytest.approx(scores.accuracy)
    assert result["metrics"]["consistency"] == pytest.approx(scores.consistency)


@pytest.mark.parametrize(
    ("model", "head"), [("albef", "shared"), ("albef", "native"), ("unimo3", "native"), ("lxmert", "shared")]
)
def test_retrieval(make_cfg, tmp_path, model, head):
    result = run(make_cfg(f"model={model}", "task=retrieval", f"head={head}", *SMALL_FORMATS), tmp_path / "run")
    metrics = result["metrics"]
    assert {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "mean_recall", "rsum"} <= set(metrics)
    assert_recalls_consistent(metrics)
    logged = set().union(*(_metrics_log(tmp_path / "run")))
    assert "train/itm" in logged and (head == "shared" or "train/itc" in logged)


def test_pixelbert_native_retrieval_ranks_with_its_match_head(make_cfg, tmp_path):
    result = run(make_cfg("model=pixelbert", "task=retrieval", "head=native", *SMALL_FORMATS), tmp_path / "run")
    assert_recalls_consistent(result["metrics"])
    assert "train/itm_rank" in set().union(*(_metrics_log(tmp_path / "run")))


def test_retrieval_itm_scoring_for_a_model_without_embeddings(make_cfg, tmp_path):
    result = run(make_cfg("model=textonly", "task=retrieval", *SMALL_FORMATS), tmp_path / "run")
    assert_recalls_consistent(result["metrics"])
    with pytest.raises(VlbenchError, match="task.scoring=itc: the model has no unimodal embeddings"):
        run(make_cfg("model=textonly", "task=retrieval", "task.scoring=itc", *SMALL_FORMATS), tmp_path / "run2")


def test_pretrain_logs_each_objective_and_selects_by_loss(make_cfg, tmp_path):
    result = run(make_cfg("model=albef", "task=pretrain", "trainer.eval_every=2", *SMALL_FORMATS), tmp_path / "run")
    assert result["main_metric"] == "loss"
    assert {"loss", "loss/itc", "loss/itm", "loss/mlm", "zero_shot/mean_recall"} <= set(result["metrics"])
    logged = set().union(*(_metrics_log(tmp_path / "run")))
    assert {"train/itc", "train/itm", "train/mlm"} <= logged
    assert result["metrics"]["loss"] == pytest.approx(
        result["metrics"]["loss/itc"] + result["metrics"]["loss/itm"] + result["metrics"]["loss/mlm"]
    )


def test_pretrain_evaluation_is_repeatable_and_leaves_training_state_alone(make_cfg, tmp_path):
    import torch

    from vlbench.data.text import load_tokenizer
    from vlbench.models.albef import ALBEF
    from vlbench.models.base import ModelContext
    from vlbench.runner import TaskModel, predict_split
    from vlbench.tasks.base import EvalContext
    from vlbench.tasks.pretrain import PretrainTask

    cfg = make_cfg("model=albef", "task=pretrain", *SMALL_FORMATS)
    root = resolve_data_root(cfg.data, "karpathy")
    tok = load_tokenizer(cfg.data.tokenizer, root)
    task = PretrainTask(cfg.task, cfg.data, root, tok, "pixels")
    ctx = ModelContext(len(tok), tok.pad_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id, 64)
    model = ALBEF(cfg.model, ctx)
    net = TaskModel(model, task.build_shared_head(model.hidden_size), task)
    queue, momentum = model.image_queue.clone(), [p.clone() for p in model.momentum_model.parameters()]
    rng = torch.get_rng_state()
    first = predict_split(net, task, "val", EvalContext(torch.device("cpu"), batch_size=8))
    second = predict_split(net, task, "val", EvalContext(torch.device("cpu"), batch_size=8))
    assert first == second
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(model.image_queue, queue)
    assert all(torch.equal(a, b) for a, b in zip(model.momentum_model.parameters(), momentum, strict=True))


def test_a_task_on_data_without_its_format_fails_clearly(make_cfg, tmp_path):
    root = tmp_path / "vqa-only"
    root.mkdir()
    with pytest.raises(VlbenchError, match=r"data=vqav2: has no gqa files"):
        run(make_cfg("task=gqa", "data=vqav2", f"data.root={root}", "data.tokenizer=auto"), tmp_path / "run")


def test_pretrain_adds_lxmert_qa_pairs_with_answer_targets(make_cfg):
    from vlbench.data.text import load_tokenizer
    from vlbench.tasks.pretrain import PretrainTask, read_lxmert_questions

    cfg = make_cfg("task=pretrain", "task.qa=on", *SMALL_FORMATS)
    root = resolve_data_root(cfg.data, "karpathy")
    task = PretrainTask(cfg.task, cfg.data, root, load_tokenizer(cfg.data.tokenizer, root), "pixels")
    dataset = task.dataset("train")
    captions = sum(len(im.captions) for im in task.images("train"))
    questions = read_lxmert_questions(root, ["lxmert_train.json"])
    assert len(dataset) == captions + len(questions)  # every training image has its questions in the file
    batch = dataset.collate([dataset[i] for i in (0, captions, captions + 1)])
    assert batch["qa_mask"].tolist() == [False, True, True]
    assert batch["qa_targets"][0].sum() == 0
    img_id, _, labels = questions[0]
    ((answer, score),) = labels.items()
    assert batch["qa_targets"][1, task.answers.index[answer]] == score
    assert task.images("train")[batch["image_ids"][1]].ref.path.stem == img_id


def test_pretrain_qa_follows_the_model(make_cfg):
    from vlbench.data.text import load_tokenizer
    from vlbench.models.albef import ALBEF
    from vlbench.tasks.pretrain import PretrainTask

    cfg = make_cfg("task=pretrain", *SMALL_FORMATS)
    root = resolve_data_root(cfg.data, "karpathy")
    task = PretrainTask(cfg.task, cfg.data, root, load_tokenizer(cfg.data.tokenizer, root), "pixels")
    task.configure_for_model(ALBEF)
    assert not task.use_qa and "qa_mask" not in task.dataset("train").collate([task.dataset("train")[0]])

    class WithQA:
        pretrain_uses_qa = True

    task.configure_for_model(WithQA)
    assert task.use_qa


def test_retrieval_auto_scoring_uses_itc_only_when_the_model_trained_it(make_cfg):
    from vlbench.data.text import load_tokenizer
    from vlbench.models.albef import ALBEF
    from vlbench.models.base import ModelContext
    from vlbench.tasks.retrieval import RetrievalTask

    cfg = make_cfg("task=retrieval", *SMALL_FORMATS)
    root = resolve_data_root(cfg.data, "karpathy")
    tok = load_tokenizer(cfg.data.tokenizer, root)
    task = RetrievalTask(cfg.task, cfg.data, root, tok, "pixels")
    model = ALBEF(cfg.model, ModelContext(len(tok), 0, 2, 3, 4, 64))
    _, visual_batch, _ = task.eval_inputs("val")
    assert task._scoring_for(model, native=True, visual_batch=visual_batch) == "itc_itm"
    assert task._scoring_for(model, native=False, visual_batch=visual_batch) == "itm"


@pytest.mark.parametrize("model_name", ["albef", "pixelbert"])
def test_shared_head_retrieval_scores_pairs_from_cached_unimodal_tokens(make_cfg, monkeypatch, model_name):
    """With the shared ITM head, retrieval encodes each image and caption once and fuses per pair: the same scores as
    encoding every pair from its raw inputs, without running the image encoder per pair."""
    from vlbench.data.text import load_tokenizer
    from vlbench.models.base import ModelContext
    from vlbench.registry import MODELS
    from vlbench.runner import TaskModel
    from vlbench.tasks.base import EvalContext
    from vlbench.tasks.retrieval import RetrievalTask

    cfg = make_cfg(f"model={model_name}", "task=retrieval", *SMALL_FORMATS)
    root = resolve_data_root(cfg.data, "karpathy")
    tok = load_tokenizer(cfg.data.tokenizer, root)
    task = RetrievalTask(cfg.task, cfg.data, root, tok, "pixels")
    torch.manual_seed(0)
    model = MODELS.get(model_name)(cfg.model, ModelContext(len(tok), 0, 2, 3, 4, 64))
    net = TaskModel(model, task.build_shared_head(model.hidden_size), task).eval()
    ctx = EvalContext(torch.device("cpu"), batch_size=16)
    calls = {"encode": 0}
    encode = model.encode

    def counting_encode(batch):
        calls["encode"] += 1
        return encode(batch)

    monkeypatch.setattr(model, "encode", counting_encode)
    cached_predictions = task.predict_split(net, "val", ctx)
    cached_scores, _, _, scoring = task._scores["val"]
    assert scoring == "itm" and calls["encode"] == 0  # every pair went through encode_from_tokens
    monkeypatch.setattr(model, "unimodal_tokens", lambda batch: None)
    direct_predictions = task.predict_split(net, "val", ctx)
    direct_scores = task._scores["val"][0]
    assert calls["encode"] > 0
    torch.testing.assert_close(cached_scores, direct_scores, atol=1e-5, rtol=1e-5)
    assert cached_scores.std() > 0 and cached_predictions == direct_predictions


def test_vqa_with_albef_native_answer_decoder(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    result = run(make_cfg("model=albef", "task=vqa", "head=native", "model.answer_rank_k=4"), run_dir)
    assert result["head"] == "native" and 0.0 <= result["metrics"]["accuracy"] <= 100.0
    logged = [entry for entry in _metrics_log(run_dir) if "train/loss" in entry]
    assert all(entry["train/answer_lm"] == pytest.approx(entry["train/loss"]) for entry in logged)
    predictions = json.loads((run_dir / "predictions_test.json").read_text())
    assert predictions and all(isinstance(p["answer"], str) and p["answer"] for p in predictions)


def test_a_native_head_the_model_lacks_is_refused(make_cfg, tmp_path):
    with pytest.raises(VlbenchError, match="no native head for task gqa"):
        run(make_cfg("model=albef", "task=gqa", "head=native", *SMALL_FORMATS), tmp_path / "run")


def test_nlvr2_after_text_assignment_with_albef_native_heads(make_cfg, tmp_path):
    ta_dir = tmp_path / "ta"
    ta = run(make_cfg("model=albef", "task=nlvr2_ta", "head=native", *SMALL_FORMATS), ta_dir)
    assert set(ta["metrics"]) == {"accuracy", "accuracy/first", "accuracy/second", "accuracy/neither"}
    predictions = json.loads((ta_dir / "predictions_test.json").read_text())
    assert {p["label"] for p in predictions} <= {"first", "second", "neither"}

    nlvr_dir = tmp_path / "nlvr2"
    cfg = make_cfg(
        "model=albef", "task=nlvr2", "head=native", f"init_from={ta_dir}", "trainer.finetune_lr=0", *SMALL_FORMATS
    )
    result = run(cfg, nlvr_dir)
    assert result["init_from"] == str(ta_dir)
    report = json.loads((nlvr_dir / "manifest.json").read_text())["init_from"]
    assert report["head"] == "loaded from the source run (same head)"
    before = load_file(ta_dir / "checkpoints" / "best.safetensors")
    after = load_file(nlvr_dir / "checkpoints" / "last.safetensors")
    twin = [k for k in before if k.startswith("head.layers.")]
    assert twin and all(torch.equal(before[k], after[k]) for k in twin)  # lr 0: the assignment-trained fusion


def test_text_assignment_needs_a_native_two_image_head(make_cfg, tmp_path):
    with pytest.raises(VlbenchError, match="use head=native"):
        run(make_cfg("model=albef", "task=nlvr2_ta", "head=shared", *SMALL_FORMATS), tmp_path / "a")
    with pytest.raises(VlbenchError, match="no native head for task nlvr2_ta"):
        run(make_cfg("model=textonly", "task=nlvr2_ta", "head=native", *SMALL_FORMATS), tmp_path / "b")


def test_gqa_reports_validity_and_plausibility_from_a_choices_file(make_cfg, tmp_path):
    """eval.py's ``{tier}_choices.json`` beside the questions: validity/plausibility are computed (and absent without
    it, as in test_gqa); a question missing from the file is named."""
    import shutil

    cfg = make_cfg("model=majority", "task=gqa", *SMALL_FORMATS)
    root = tmp_path / "gqa"
    shutil.copytree(resolve_data_root(cfg.data, "gqa"), root)
    every_answer = sorted(
        {
            q["answer"]
            for split in ("train", "val", "testdev")
            for q in json.loads((root / f"{split}_balanced_questions.json").read_text()).values()
        }
    )
    for split in ("val", "testdev"):
        questions = json.loads((root / f"{split}_balanced_questions.json").read_text())
        # "valid": every answer the model can give; "plausible": the gold answer only, so plausibility is the accuracy
        # (the world has no "what do they have in common" questions, which eval.py checks against attribute kinds)
        choices = {qid: {"valid": every_answer, "plausible": [q["answer"]]} for qid, q in questions.items()}
        (root / f"{split}_choices.json").write_text(json.dumps(choices))
    cfg.data.root = str(root)
    result = run(cfg, tmp_path / "run")
    assert result["metrics"]["validity"] == 100.0
    assert result["metrics"]["plausibility"] == pytest.approx(result["metrics"]["accuracy"])
    del choices[next(iter(choices))]
    (root / "testdev_choices.json").write_text(json.dumps(choices))
    with pytest.raises(VlbenchError, match=r"testdev_choices.json: no choices for question"):
        run(cfg, tmp_path / "again")
    (root / "testdev_choices.json").write_text(json.dumps({"q": {"valid": "yes", "plausible": []}}))
    with pytest.raises(VlbenchError, match=r"testdev_choices.json: question q has valid='yes'"):
        run(cfg, tmp_path / "bad")
