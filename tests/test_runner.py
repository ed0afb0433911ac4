"""The shared runner end to end at tiny scale: the record it writes, every registered model, exact resume."""

import hashlib
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import vlbench.models  # noqa: F401
from vlbench.errors import VlbenchError
from vlbench.registry import MODELS
from vlbench.runner import EpochShuffleSampler, lr_multiplier, run


def test_tiny_albef_run_writes_a_complete_record(make_cfg, tmp_path):
    cfg = make_cfg("model=albef", "trainer.eval_every=2")
    run_dir = tmp_path / "run"
    result = run(cfg, run_dir)
    on_disk = json.loads((run_dir / "result.json").read_text())
    assert on_disk == result
    assert {
        "model",
        "task",
        "scale",
        "seed",
        "split",
        "main_metric",
        "metrics",
        "breakdown",
        "params",
        "train_samples",
        "wall_s",
    } <= set(result)
    assert result["model"] == "albef" and result["task"] == "vqa" and result["split"] == "test"
    assert 0.0 <= result["metrics"]["accuracy"] <= 100.0
    assert set(result["breakdown"]["answer_type"]) <= {"yes/no", "number", "other"}
    assert result["train_samples"] == 4 * 16
    predictions = json.loads((run_dir / "predictions_test.json").read_text())
    assert predictions and set(predictions[0]) == {"question_id", "answer"}
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["params"] == result["params"]
    # the data fingerprint: sha256 over the data root's JSON files (names and bytes), and each file's own; the box file
    # a region model's extraction may have merged there is not the dataset's
    data_files = sorted(p for p in Path(manifest["data_root"]).glob("*.json") if p.name != "regions.sceneGraphs.json")
    assert len(data_files) >= 6
    combined = hashlib.sha256()
    for path in data_files:
        combined.update(path.name.encode() + path.read_bytes())
    assert manifest["data_fingerprint"] == combined.hexdigest()[:16]
    assert manifest["data_files"] == {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in data_files}
    assert manifest["augmentation"] == "none" and manifest["image_size"] == 64
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in lines if "train/loss" in entry] == [1, 2, 3, 4]
    assert any("val/accuracy" in entry for entry in lines)
    assert (run_dir / "checkpoints" / "best.safetensors").exists()
    assert (run_dir / "config.yaml").exists()


@pytest.mark.parametrize("model_name", MODELS.names())
def test_every_registered_model_trains_and_evaluates(make_cfg, tmp_path, model_name, small_world):
    run_dir = tmp_path / model_name
    result = run(make_cfg(f"model={model_name}", "trainer.max_steps=2"), run_dir)
    assert result["model"] == model_name and "accuracy" in result["metrics"]
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(entry["step"], entry["train/loss"]) for entry in lines if "train/loss" in entry]
    assert [step for step, _ in losses] == [1, 2] and all(math.isfinite(loss) for _, loss in losses)
    # every test question answered once
    test = json.loads((small_world / "v2_OpenEnded_mscoco_test2015_questions.json").read_text())["questions"]
    predictions = json.loads((run_dir / "predictions_test.json").read_text())
    assert sorted(p["question_id"] for p in predictions) == sorted(q["question_id"] for q in test)


def test_majority_predicts_the_most_frequent_answer_per_question_type(make_cfg, tmp_path, small_world):
    # 18 steps × 16 = one pass over the small world's 288 training questions
    result = run(make_cfg("model=majority", "trainer.max_steps=18"), tmp_path / "m")
    assert result["trainable_params"] == 0
    train = json.loads((small_world / "v2_mscoco_train2014_annotations.json").read_text())["annotations"]
    overall = Counter(a["multiple_choice_answer"] for a in train)
    per_type: dict[str, Counter] = {}
    for a in train:
        per_type.setdefault(a["question_type"], Counter())[a["multiple_choice_answer"]] += 1
    # ties go to the answer more frequent overall (then alphabetical), as the vocabulary is ordered
    expected = {t: min(c, key=lambda ans: (-c[ans], -overall[ans], ans)) for t, c in per_type.items()}
    test = json.loads((small_world / "v2_mscoco_test2015_annotations.json").read_text())["annotations"]
    predictions = {
        p["question_id"]: p["answer"] for p in json.loads((tmp_path / "m" / "predictions_test.json").read_text())
    }
    assert all(predictions[a["question_id"]] == expected[a["question_type"]] for a in test)


def test_training_lowers_the_loss(make_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run(make_cfg("model=textonly", "trainer.max_steps=30", "trainer.lr=1e-3"), run_dir)
    losses = [
        json.loads(x)["train/loss"] for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "train/loss" in x
    ]
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5


def test_resume_continues_exactly(make_cfg, tmp_path):
    straight = run(make_cfg("model=albef", "trainer.max_steps=6", "run_id=a"), tmp_path / "a")
    stopped = run(make_cfg("model=albef", "trainer.max_steps=6", "trainer.stop_at_step=3"), tmp_path / "b")
    assert stopped["stopped_at_step"] == 3 and not (tmp_path / "b" / "result.json").exists()
    resumed = run(make_cfg("model=albef", "trainer.max_steps=6", f"resume={tmp_path / 'b'}"), tmp_path / "b")
    assert resumed["steps"] == 6 and resumed["metrics"] == straight["metrics"]
    a = load_file(tmp_path / "a" / "checkpoints" / "last.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "last.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() if "train/loss" in x
    ]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_different_config(make_cfg, tmp_path):
    run(make_cfg("model=textonly", "trainer.max_steps=4", "trainer.stop_at_step=2"), tmp_path / "b")
    with pytest.raises(VlbenchError, match=r"trainer.lr: 0.001 → 0.002"):
        run(
            make_cfg("model=textonly", "trainer.max_steps=4", "trainer.lr=2e-3", f"resume={tmp_path / 'b'}"),
            tmp_path / "b",
        )


def test_resume_refuses_other_arithmetic(make_cfg, tmp_path):
    """A run saved by a GPU process (``trainer.precision=auto``: bf16) does not continue in fp32 on a CPU node: the
    config hashes the same, the numbers would not."""
    overrides = ("model=textonly", "trainer.max_steps=4")
    run(make_cfg(*overrides, "trainer.stop_at_step=2"), tmp_path / "b")
    path = tmp_path / "b" / "checkpoints" / "last.state.pt"
    state = torch.load(path, weights_only=True)
    assert state["numerics"] == "cpu fp32"
    torch.save({**state, "numerics": "cuda bf16"}, path)
    with pytest.raises(VlbenchError, match="trained in cuda bf16, this process would continue in cpu fp32"):
        run(make_cfg(*overrides, f"resume={tmp_path / 'b'}"), tmp_path / "b")
    torch.save({**state, "numerics": "cpu fp32"}, path)
    assert run(make_cfg(*overrides, f"resume={tmp_path / 'b'}"), tmp_path / "b")["steps"] == 4


def test_a_finished_run_is_never_overwritten(make_cfg, tmp_path):
    run(make_cfg("model=majority", "trainer.max_steps=1"), tmp_path / "r")
    with pytest.raises(VlbenchError, match="already finished"):
        run(make_cfg("model=majority", "trainer.max_steps=1"), tmp_path / "r")


def test_sampler_is_a_permutation_per_epoch_and_resumable():
    full = list(EpochShuffleSampler(10, seed=3, epoch=1))
    assert sorted(full) == list(range(10))
    assert full != list(EpochShuffleSampler(10, seed=3, epoch=2))
    assert list(EpochShuffleSampler(10, seed=3, epoch=1, start=4)) == full[4:]


def test_lr_schedule_warmup_then_cosine_to_floor(make_cfg):
    cfg = make_cfg("trainer.max_steps=100", "trainer.warmup_steps=10", "trainer.min_lr_ratio=0.1").trainer
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(10, cfg) == pytest.approx(1.0)
    assert lr_multiplier(4, cfg) == pytest.approx(0.5)
    assert lr_multiplier(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    # a sixth of the way: cosine 0.1 + 0.9 · (1 + cos(π/6)) / 2 = 0.9397, where a linear decay gives 0.85
    assert lr_multiplier(25, cfg) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(3) / 2))
    assert lr_multiplier(100, cfg) == pytest.approx(0.1)
    linear = make_cfg("trainer.max_steps=100", "trainer.warmup_steps=10", "trainer.min_lr_ratio=0.1",
                      "trainer.schedule=linear").trainer  # fmt: skip
    assert lr_multiplier(25, linear) == pytest.approx(0.85)


def test_the_record_says_which_checkpoint_was_tested(make_cfg, tmp_path):
    best = run(make_cfg("model=textonly", "trainer.eval_every=2"), tmp_path / "best")
    assert best["checkpoint"].startswith("best (step ")
    last = run(make_cfg("model=textonly", "trainer.test_checkpoint=last"), tmp_path / "last")
    assert last["checkpoint"] == "last"
    with pytest.raises(VlbenchError, match="trainer.test_checkpoint='newest': expected best or last"):
        run(make_cfg("model=textonly", "trainer.test_checkpoint=newest"), tmp_path / "bad")
    assert not (tmp_path / "bad" / "result.json").exists()


def test_evaluating_more_often_changes_no_training_result(make_cfg, tmp_path):
    quiet = run(make_cfg("model=albef", "trainer.max_steps=4", "trainer.test_checkpoint=last"), tmp_path / "q")
    chatty = run(
        make_cfg("model=albef", "trainer.max_steps=4", "trainer.test_checkpoint=last", "trainer.eval_every=1"),
        tmp_path / "c",
    )
    assert quiet["metrics"] == chatty["metrics"]
    a = load_file(tmp_path / "q" / "checkpoints" / "last.safetensors")
    b = load_file(tmp_path / "c" / "checkpoints" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def train_losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)["train/loss"] for x in lines if "train/loss" in x]


@pytest.mark.slow  # compiling on CPU takes a minute or more
@pytest.mark.parametrize("scope", ["blocks", "forward"])
def test_compiled_training_matches_eager_and_saves_plain_keys(make_cfg, tmp_path, scope):
    # textonly's shared VQA head has dropout (0.1): compiled dropout must draw eager's random numbers
    common = ("model=textonly", "trainer.max_steps=3", "trainer.test_checkpoint=last")
    eager = run(make_cfg(*common), tmp_path / "eager")
    compiled = run(make_cfg(*common, "trainer.compile=true", f"trainer.compile_scope={scope}"), tmp_path / "compiled")
    assert train_losses(tmp_path / "compiled") == pytest.approx(train_losses(tmp_path / "eager"), abs=1e-4)
    assert compiled["metrics"] == pytest.approx(eager["metrics"], abs=1e-6)
    a = load_file(tmp_path / "eager" / "checkpoints" / "last.safetensors")
    b = load_file(tmp_path / "compiled" / "checkpoints" / "last.safetensors")
    assert a.keys() == b.keys() and not any("_orig_mod" in k for k in b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-4, rtol=1e-4)
    manifest = json.loads((tmp_path / "compiled" / "manifest.json").read_text())
    assert manifest["compile"] is True and manifest["compile_scope"] == scope


def test_an_unknown_compile_scope_is_refused_before_training(make_cfg, tmp_path):
    bad = make_cfg("model=textonly", "trainer.max_steps=1", "trainer.compile=true", "trainer.compile_scope=layers")
    with pytest.raises(VlbenchError, match="trainer.compile_scope='layers': expected blocks or forward"):
        run(bad, tmp_path / "bad")
    assert not (tmp_path / "bad" / "result.json").exists()


def test_loader_workers_across_epochs_and_resume_change_no_result(make_cfg, tmp_path, monkeypatch):
    # 288 training questions / 16 = 18 steps an epoch: both runs cross into the second epoch
    common = ("model=textonly", "trainer.max_steps=20", "trainer.test_checkpoint=last")
    straight = run(make_cfg(*common, "run_id=a"), tmp_path / "a")
    passes, real_iter = [], EpochShuffleSampler.__iter__

    def noting_iter(self):
        passes.append((self.epoch, self.start))
        return real_iter(self)

    monkeypatch.setattr(EpochShuffleSampler, "__iter__", noting_iter)
    workers = (*common, "trainer.num_workers=2")
    assert run(make_cfg(*workers, "trainer.stop_at_step=10"), tmp_path / "b")["stopped_at_step"] == 10
    resumed = run(make_cfg(*workers, f"resume={tmp_path / 'b'}"), tmp_path / "b")
    assert passes == [(0, 0), (0, 10 * 16), (1, 0)]  # one loader: each pass reads the sampler's epoch and start
    assert resumed["metrics"] == straight["metrics"]
    assert train_losses(tmp_path / "b") == train_losses(tmp_path / "a")
    a = load_file(tmp_path / "a" / "checkpoints" / "last.safetensors")
    b = load_file(tmp_path / "b" / "checkpoints" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_adamw_kernels_train_the_same_model(make_cfg, tmp_path):
    # fused (the default) is a speed switch: the per-tensor loop gives the same losses and weights up to rounding
    runs = {}
    for impl in ("fused", "loop"):
        run(make_cfg("model=albef", "trainer.max_steps=5", f"trainer.optimizer_impl={impl}"), tmp_path / impl)
        runs[impl] = (train_losses(tmp_path / impl), load_file(tmp_path / impl / "checkpoints" / "last.safetensors"))
    assert runs["fused"][0] == pytest.approx(runs["loop"][0], rel=1e-5)
    assert all(torch.allclose(runs["fused"][1][k], runs["loop"][1][k], atol=1e-5) for k in runs["loop"][1])
    with pytest.raises(VlbenchError, match="trainer.optimizer_impl: expected auto, fused, foreach or loop, got 'adam'"):
        run(make_cfg("model=albef", "trainer.max_steps=1", "trainer.optimizer_impl=adam"), tmp_path / "bad")
    assert not (tmp_path / "bad" / "result.json").exists()


def test_speed_switches_leave_the_config_hash(make_cfg):
    # runs may resume, be reused or initialise others across these switches (and across their introduction)
    from vlbench.config_hash import config_hash

    switched = make_cfg(
        "model=pixelbert",
        "trainer.compile=true",
        "trainer.compile_scope=forward",
        "model.channels_last=false",
        "trainer.optimizer_impl=loop",
    )
    assert config_hash(switched) == config_hash(make_cfg("model=pixelbert"))
    elsewhere = make_cfg("model=pixelbert", "trainer.log_every=7", "trainer.num_workers=2", "data.cache_dir=/x")
    assert config_hash(elsewhere) == config_hash(make_cfg("model=pixelbert"))
    assert config_hash(make_cfg("model=pixelbert", "trainer.eval_every=7")) != config_hash(make_cfg("model=pixelbert"))


def test_a_stem_width_timm_ignored_leaves_the_config_hash(make_cfg):
    # records of Pixel-BERT tiny written while the preset said stem_width: 32 (never built) keep matching new runs
    from vlbench.config_hash import config_hash

    now = make_cfg("model=pixelbert")
    assert "stem_width" not in now.model.cnn_kwargs
    assert config_hash(make_cfg("model=pixelbert", "+model.cnn_kwargs.stem_width=32")) == config_hash(now)
    deep = make_cfg("model=pixelbert", "+model.cnn_kwargs.stem_type=deep")
    assert config_hash(
        make_cfg("model=pixelbert", "+model.cnn_kwargs.stem_type=deep", "+model.cnn_kwargs.stem_width=16")
    ) != config_hash(deep)


def test_a_key_added_later_at_its_former_value_leaves_the_config_hash(make_cfg):
    # Pixel-BERT's init_std did not exist before: its records (no such key) computed with BERT's 0.02
    from vlbench.config_hash import config_hash

    now = make_cfg("model=pixelbert", "scale=base")
    assert now.model.init_std == 0.02
    before = OmegaConf.create(OmegaConf.to_container(now))  # a record's saved config.yaml, written before the key
    del before.model["init_std"]
    assert config_hash(before) == config_hash(now)
    assert config_hash(make_cfg("model=pixelbert", "scale=base", "model.init_std=0.088")) != config_hash(now)
    assert config_hash(make_cfg("model=albef", "scale=base")) != config_hash(now)  # models without the key untouched
    tiny = make_cfg("model=pixelbert")  # the tiny preset's own value: a record without the key is not one of its runs
    assert tiny.model.init_std == 0.088
    tiny_before = OmegaConf.create(OmegaConf.to_container(tiny))
    del tiny_before.model["init_std"]
    assert config_hash(tiny_before) != config_hash(tiny)


@pytest.mark.parametrize("key", ["trainer.keep_freed_memory", "trainer.skip_unread_states"])
def test_speed_switches_are_on_by_default_and_leave_the_config_hash(make_cfg, key):
    """Freed memory kept (bit for bit the same numbers) and unread states skipped (the same function up to float
    rounding): records written with either setting are one configuration."""
    from vlbench.config_hash import config_hash

    cfg = make_cfg("model=unimo3")
    assert OmegaConf.select(cfg, key) is True
    assert config_hash(make_cfg("model=unimo3", f"{key}=false")) == config_hash(cfg)


def test_keys_a_run_does_not_read_leave_the_config_hash(make_cfg):
    """LXMERT's qa_start_epochs (added later, 0 = as before), ALBEF's nlvr_merge (read only by its native NLVR2 head;
    its default changed after the shared-head records) and finetune_lr (read only with init_from)."""
    from vlbench.config_hash import config_hash

    def without(cfg, dotted):
        saved = OmegaConf.create(OmegaConf.to_container(cfg))  # a record's config.yaml, written before the change
        *parents, leaf = dotted.split(".")
        node = saved
        for p in parents:
            node = node[p]
        del node[leaf]
        return saved

    lxmert = make_cfg("model=lxmert")
    assert config_hash(without(lxmert, "model.qa_start_epochs")) == config_hash(lxmert)
    assert config_hash(make_cfg("model=lxmert", "model.qa_start_epochs=10")) != config_hash(lxmert)
    shared = make_cfg("model=albef", "task=nlvr2")
    assert config_hash(make_cfg("model=albef", "task=nlvr2", "model.nlvr_merge=linear")) == config_hash(shared)
    native = make_cfg("model=albef", "task=nlvr2", "head=native")
    assert config_hash(make_cfg("model=albef", "task=nlvr2", "head=native", "model.nlvr_merge=linear")) != (
        config_hash(native)
    )
    scratch = make_cfg("model=unimo3")
    assert scratch.trainer.finetune_lr is not None
    assert config_hash(make_cfg("model=unimo3", "trainer.finetune_lr=null")) == config_hash(scratch)
    init = make_cfg("model=unimo3", "init_from=/some/run")
    assert config_hash(make_cfg("model=unimo3", "init_from=/some/run", "trainer.finetune_lr=3e-4")) != config_hash(init)


def test_the_reference_records_match_todays_grid_configuration():
    """Every pre-training record in results/reference has the setting a fresh `make reproduce` composes today: a key
    added or re-defaulted without KEYS_ADDED_LATER (or a rule for keys a run does not read) would turn the judged
    re-runs into "another configuration" (LXMERT's and ALBEF's did until this test)."""
    from hydra import compose, initialize_config_module

    from vlbench.config_hash import setting_hash

    records = sorted(Path("results/reference").glob("*/pretrain/*seed0"))
    assert {r.parts[-3] for r in records} == {"albef", "lxmert", "pixelbert", "unimo3"}
    with initialize_config_module(config_module="vlbench.conf", version_base="1.3"):
        for record in records:
            grid = ["+experiment=suite", "budget=tiny_96k", f"model={record.parts[-3]}", "task=pretrain", "seed=0"]
            fresh = compose(config_name="config", overrides=[*grid, "init_from=null"])  # as a pre-training records it
            assert setting_hash(OmegaConf.load(record / "config.yaml"), "cpu") == setting_hash(fresh, "cpu"), record


def test_activation_checkpointing_from_the_config_changes_no_number(make_cfg, tmp_path, monkeypatch):
    # dropout inside the blocks (text) and outside them (the head): checkpointing replays the blocks' draws
    import vlbench.runner as runner

    wrapped = []
    real = runner.checkpoint_transformer_blocks
    monkeypatch.setattr(runner, "checkpoint_transformer_blocks", lambda net: wrapped.append(real(net)) or wrapped[-1])
    common = ("model=textonly", "model.text.dropout=0.1", "trainer.max_steps=3", "trainer.test_checkpoint=last")
    plain = run(make_cfg(*common), tmp_path / "plain")
    assert not wrapped
    checkpointed = run(make_cfg(*common, "trainer.activation_checkpointing=true"), tmp_path / "checkpointed")
    assert wrapped == [4]  # the tiny text encoder's four layers
    assert train_losses(tmp_path / "checkpointed") == pytest.approx(train_losses(tmp_path / "plain"), abs=1e-6)
    assert checkpointed["metrics"] == pytest.approx(plain["metrics"], abs=1e-6)
    a = load_file(tmp_path / "plain" / "checkpoints" / "last.safetensors")
    b = load_file(tmp_path / "checkpointed" / "checkpoints" / "last.safetensors")
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert json.loads((tmp_path / "checkpointed" / "manifest.json").read_text())["activation_checkpointing"] is True
