"""init_from: pre-train → fine-tune starts from exactly the pre-trained model tensors, or stops naming what differs."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from tests.test_tasks_end_to_end import SMALL_FORMATS
from vlbench.config_hash import record_numerics
from vlbench.errors import VlbenchError
from vlbench.leaderboard import archive_records
from vlbench.reuse import find_pretrained
from vlbench.runner import run


@pytest.fixture
def pretrained_run(make_cfg, tmp_path):
    run_dir = tmp_path / "pretrain"
    run(make_cfg("model=albef", "task=pretrain", "trainer.max_steps=2", *SMALL_FORMATS), run_dir)
    return run_dir


def _model_tensors(path):
    return {k: v for k, v in load_file(path).items() if k.startswith("model.")}


def test_fine_tuning_starts_from_the_pretrained_model_tensors(make_cfg, tmp_path, pretrained_run):
    # fine-tuning lr 0 (so weight decay is 0 too): the fine-tuned run's final model tensors are its initial ones
    cfg = make_cfg(
        "model=albef", "task=vqa", f"init_from={pretrained_run}", "trainer.finetune_lr=0", "trainer.max_steps=1"
    )
    run_dir = tmp_path / "finetune"
    result = run(cfg, run_dir)
    source = _model_tensors(pretrained_run / "checkpoints" / "best.safetensors")
    finetuned = _model_tensors(run_dir / "checkpoints" / "last.safetensors")
    assert source.keys() == finetuned.keys() and len(source) > 50
    assert all(torch.equal(source[k], finetuned[k]) for k in source)
    assert result["init_from"] == str(pretrained_run)
    report = json.loads((run_dir / "manifest.json").read_text())["init_from"]
    assert report["checkpoint"] == "best" and report["model_tensors_loaded"] == len(source)
    assert report["head"] == "initialised fresh" and len(report["sha256"]) == 16


def _logged_lrs(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["train/lr"] for row in rows if "train/lr" in row]


def test_a_run_from_trained_weights_uses_the_fine_tuning_lr(make_cfg, tmp_path, pretrained_run):
    lrs = ("trainer.lr=1e-3", "trainer.finetune_lr=2e-4", "trainer.schedule=constant", "trainer.warmup_steps=0")
    steps = ("trainer.max_steps=2", "trainer.log_every=1")
    finetune = make_cfg("model=albef", "task=vqa", f"init_from={pretrained_run}", *lrs, *steps)
    run(finetune, tmp_path / "finetune")
    assert _logged_lrs(tmp_path / "finetune") == pytest.approx([2e-4, 2e-4])
    saved = OmegaConf.load(tmp_path / "finetune" / "config.yaml").trainer  # the lr it used, as a resume compares it
    assert saved.lr == pytest.approx(2e-4) and saved.finetune_lr is None
    run(make_cfg("model=albef", "task=vqa", *lrs, *steps), tmp_path / "scratch")
    assert _logged_lrs(tmp_path / "scratch") == pytest.approx([1e-3, 1e-3])


def test_scratch_and_pretrained_starts_differ(make_cfg, tmp_path, pretrained_run):
    scratch = run(make_cfg("model=albef", "trainer.lr=0", "trainer.max_steps=1"), tmp_path / "a")
    assert scratch["init_from"] is None
    a = _model_tensors(tmp_path / "a" / "checkpoints" / "last.safetensors")
    b = _model_tensors(pretrained_run / "checkpoints" / "best.safetensors")
    assert a.keys() == b.keys() and not all(torch.equal(a[k], b[k]) for k in a)


def test_a_different_architecture_is_refused_with_keys_and_config_differences(make_cfg, pretrained_run):
    cfg = make_cfg("model=albef", "task=vqa", f"init_from={pretrained_run}", "model.fusion_layers=1")
    with pytest.raises(VlbenchError) as error:
        run(cfg, pretrained_run.parent / "bad")
    message = str(error.value)
    assert "not in this model" in message and "fusion" in message
    assert "model.fusion_layers: 2 → 1" in message
    assert not (pretrained_run.parent / "bad" / "result.json").exists()


def test_another_model_family_is_refused(make_cfg, pretrained_run):
    cfg = make_cfg("model=textonly", "task=vqa", f"init_from={pretrained_run}")
    with pytest.raises(VlbenchError, match="missing from the checkpoint"):
        run(cfg, pretrained_run.parent / "bad")


def test_unfinished_runs_and_missing_paths_are_refused(make_cfg, tmp_path, pretrained_run):
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    with pytest.raises(VlbenchError, match=r"has not finished \(no result.json\)"):
        run(make_cfg(f"init_from={unfinished}"), tmp_path / "x")
    with pytest.raises(VlbenchError, match="no such run directory"):
        run(make_cfg(f"init_from={tmp_path / 'nowhere'}"), tmp_path / "y")
    not_weights = tmp_path / "weights.pt"
    not_weights.write_bytes(b"\0")
    with pytest.raises(VlbenchError, match="expected a run directory or a .safetensors"):
        run(make_cfg(f"init_from={not_weights}"), tmp_path / "z")


def test_a_checkpoint_file_of_an_unfinished_run_can_be_named(make_cfg, tmp_path, pretrained_run):
    weights = pretrained_run / "checkpoints" / "last.safetensors"
    (pretrained_run / "result.json").unlink()  # unfinished: a directory is refused (above), a named file is not
    result = run(make_cfg("model=albef", f"init_from={weights}", "trainer.max_steps=1"), tmp_path / "f")
    assert result["init_from"] == str(pretrained_run)
    report = json.loads((tmp_path / "f" / "manifest.json").read_text())["init_from"]
    assert report["checkpoint"] == "file" and report["path"] == str(weights)
    assert report["model_tensors_loaded"] == len(_model_tensors(weights))


def test_a_resumed_run_keeps_its_init_from_record(make_cfg, tmp_path, pretrained_run):
    run_dir = tmp_path / "resumed"
    overrides = ("model=albef", f"init_from={pretrained_run}", "trainer.max_steps=2")
    stopped = run(make_cfg(*overrides, "trainer.stop_at_step=1"), run_dir)
    assert stopped["stopped_at_step"] == 1
    result = run(make_cfg(*overrides, f"resume={run_dir}"), run_dir)
    assert result["init_from"] == str(pretrained_run)
    assert json.loads((run_dir / "manifest.json").read_text())["init_from"]["checkpoint"] == "best"


def test_init_from_pretrained_ignores_speed_only_model_keys(make_cfg, tmp_path):
    """A pre-training run records the speed-only keys (Pixel-BERT's model.channels_last) that the fine-tuning run's
    semantic config leaves out: they must not make the search miss it (the Pixel-BERT grid did)."""
    small = (*SMALL_FORMATS, "trainer.max_steps=1")
    pretrain_dir = tmp_path / "runs" / "pretrain"
    run(make_cfg("model=pixelbert", "task=pretrain", "model.channels_last=false", *small), pretrain_dir)
    cfg = make_cfg("model=pixelbert", "task=vqa", "init_from=pretrained", f"reuse_root={tmp_path}", *small)
    assert cfg.model.channels_last is True
    assert run(cfg, tmp_path / "vqa")["init_from"] == str(pretrain_dir)


def test_init_from_pretrained_finds_the_pretrain_run_of_this_model_and_seed(make_cfg, tmp_path, pretrained_run):
    cfg = make_cfg("model=albef", "task=vqa", "init_from=pretrained", f"reuse_root={tmp_path}", "trainer.max_steps=1")
    result = run(cfg, tmp_path / "vqa")
    assert result["init_from"] == str(pretrained_run)
    assert f"init_from: {pretrained_run}" in (tmp_path / "vqa" / "config.yaml").read_text()
    pretrain = make_cfg("model=albef", "task=pretrain", "init_from=pretrained", *SMALL_FORMATS, "trainer.max_steps=1")
    assert run(pretrain, tmp_path / "pretrain-again")["init_from"] is None  # the pre-training stage starts fresh
    with pytest.raises(VlbenchError, match="no finished task=pretrain run of model=albef .* seed=1"):
        run(make_cfg("model=albef", "init_from=pretrained", f"reuse_root={tmp_path}", "seed=1"), tmp_path / "s1")
    with pytest.raises(VlbenchError, match="nearest .*pretrain differs in model.embed_dim: 64 → 32"):
        run(
            make_cfg("model=albef", "init_from=pretrained", f"reuse_root={tmp_path}", "model.embed_dim=32"),
            tmp_path / "other",
        )


def test_init_from_pretrained_prefers_the_pretraining_of_its_own_setting(make_cfg, tmp_path, pretrained_run):
    """A newer pre-training run of the same model with other overrides (a smoke run, an ablation) must not become the
    starting point of runs launched with the grid's overrides: the run of the same setting wins over the newest."""
    smoke = tmp_path / "smoke-pretrain"
    run(make_cfg("model=albef", "task=pretrain", "trainer.max_steps=1", *SMALL_FORMATS), smoke)
    record = json.loads((smoke / "result.json").read_text())
    (smoke / "result.json").write_text(json.dumps({**record, "setting_overrides": ["trainer.max_steps=1"]}))
    cfg = make_cfg("model=albef", "task=vqa", "init_from=pretrained", f"reuse_root={tmp_path}", "trainer.max_steps=1")
    assert run(cfg, tmp_path / "vqa")["init_from"] == str(pretrained_run)  # its overrides (none here) match


def test_a_pretraining_of_another_setting_is_named_once_not_by_every_process(
    make_cfg, tmp_path, pretrained_run, capsys, monkeypatch
):
    """With no pre-training of its own setting the newest matching one is used and named — by rank 0 only (under
    torchrun every process resolves it)."""
    for budget in ("x", "y"):
        record = json.loads((pretrained_run / "result.json").read_text())
        (pretrained_run / "result.json").write_text(json.dumps({**record, "setting_overrides": [f"budget={budget}"]}))
        shutil.copytree(pretrained_run, tmp_path / f"pretrain-{budget}")
    shutil.rmtree(pretrained_run)
    cfg = make_cfg("model=albef", "task=vqa", "init_from=pretrained", f"reuse_root={tmp_path}")
    for rank, said in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        assert find_pretrained(tmp_path, cfg).name in ("pretrain-x", "pretrain-y")
        out = capsys.readouterr().out
        assert ("no pre-training run with this run's overrides" in out) == said, out


def test_init_from_pretrained_prefers_a_pretraining_in_its_own_arithmetic(make_cfg, tmp_path, pretrained_run, capsys):
    """A grid moved to a GPU beside a laptop's results: its fine-tunes start from the GPU (bf16) pre-training even when
    a CPU one of the same setting is newer, and the CPU grid keeps its own; with none in its arithmetic the newest is
    used and named."""
    import os

    gpu = tmp_path / "pretrain-gpu"
    shutil.copytree(pretrained_run, gpu)
    record = json.loads((gpu / "result.json").read_text())
    (gpu / "result.json").write_text(json.dumps({**record, "device": "NVIDIA H200", "precision": "bf16"}))
    os.utime(gpu / "result.json", (1_000, 1_000))  # older than the CPU run
    assert record_numerics(gpu, json.loads((gpu / "result.json").read_text())) == "cuda bf16"
    cfg = make_cfg("model=albef", "task=vqa", "init_from=pretrained", f"reuse_root={tmp_path}")
    assert find_pretrained(tmp_path, cfg, "cuda") == gpu
    assert find_pretrained(tmp_path, cfg, "cpu") == pretrained_run
    assert find_pretrained(tmp_path, cfg) == pretrained_run  # device unknown: the newest, as before
    assert capsys.readouterr().out == ""
    shutil.rmtree(pretrained_run)
    assert find_pretrained(tmp_path, cfg, "cpu") == gpu
    assert f"no such pre-training run computed in cpu fp32; using {gpu} (cuda bf16)" in capsys.readouterr().out


def test_a_resumed_fine_tune_keeps_its_pretraining_source(make_cfg, tmp_path, pretrained_run):
    """init_from=pretrained is resolved once, when the run starts: a requeued job continues from its checkpoint even
    if a newer matching pre-training run has finished meanwhile (its config would differ) or the source was moved."""
    overrides = ("model=albef", "task=vqa", "init_from=pretrained", f"reuse_root={tmp_path}", "trainer.max_steps=2")
    stopped = run(make_cfg(*overrides, "trainer.stop_at_step=1"), tmp_path / "vqa")
    assert stopped["stopped_at_step"] == 1
    run(make_cfg("model=albef", "task=pretrain", "trainer.max_steps=2", *SMALL_FORMATS), tmp_path / "newer-pretrain")
    result = run(make_cfg(*overrides, "resume=auto"), tmp_path / "vqa")
    assert result["steps"] == 2 and result["init_from"] == str(pretrained_run)


def test_reuse_finished_skips_a_finished_configuration(make_cfg, tmp_path):
    first = run(make_cfg("model=textonly", "reuse_finished=true", f"reuse_root={tmp_path}"), tmp_path / "a")
    again = run(make_cfg("model=textonly", "reuse_finished=true", f"reuse_root={tmp_path}"), tmp_path / "b")
    assert again == first and not (tmp_path / "b" / "result.json").exists()
    assert json.loads((tmp_path / "b" / "reused.json").read_text()) == {"run_dir": str(tmp_path / "a")}
    changed = run(make_cfg("model=textonly", "reuse_finished=true", f"reuse_root={tmp_path}", "seed=1"), tmp_path / "c")
    assert changed["seed"] == 1 and (tmp_path / "c" / "result.json").exists()


def test_a_record_hashed_before_a_key_became_results_neutral_is_still_reused(make_cfg, tmp_path):
    """Hashes are recomputed from a record's saved config under today's results-neutral keys: a record written when
    ``trainer.checkpoint_every`` still counted (its stored hash includes it) matches a new run that checkpoints every
    250 steps; without its config.yaml only the stored hash can match."""
    run(make_cfg("model=textonly", "trainer.max_steps=2"), tmp_path / "old")
    result = json.loads((tmp_path / "old" / "result.json").read_text())
    result["config_hash"] = "0123456789ab"  # as the older definition computed it
    (tmp_path / "old" / "result.json").write_text(json.dumps(result))
    reuse = ("reuse_finished=true", f"reuse_root={tmp_path}", "trainer.max_steps=2", "trainer.checkpoint_every=250")
    run(make_cfg("model=textonly", *reuse), tmp_path / "new")
    assert json.loads((tmp_path / "new" / "reused.json").read_text()) == {"run_dir": str(tmp_path / "old")}
    (tmp_path / "old" / "config.yaml").unlink()
    run(make_cfg("model=textonly", *reuse), tmp_path / "newer")
    assert (tmp_path / "newer" / "result.json").exists() and not (tmp_path / "newer" / "reused.json").exists()


def test_reuse_matches_what_a_run_computes_on_its_device(make_cfg, tmp_path):
    """``trainer.precision=auto`` is fp32 on the CPU and bf16 autocast on a GPU: a record made on a GPU is no answer
    for a CPU run, while ``auto``, ``trainer.device=cpu`` and ``trainer.precision=fp32`` on a CPU compute the same
    and reuse each other."""
    run(make_cfg("model=textonly", "trainer.max_steps=2"), tmp_path / "runs" / "cpu")
    record = json.loads((tmp_path / "runs" / "cpu" / "result.json").read_text())
    assert record["precision"] == "fp32" and record["device"].startswith("cpu")
    assert json.loads((tmp_path / "runs" / "cpu" / "manifest.json").read_text())["precision"] == "fp32"
    reuse = ("reuse_finished=true", f"reuse_root={tmp_path / 'runs'}", "trainer.max_steps=2")
    for name, override in (("explicit-cpu", "trainer.device=cpu"), ("explicit-fp32", "trainer.precision=fp32")):
        run(make_cfg("model=textonly", override, *reuse), tmp_path / name)
        assert json.loads((tmp_path / name / "reused.json").read_text()) == {"run_dir": str(tmp_path / "runs" / "cpu")}
    run(make_cfg("model=textonly", "trainer.precision=bf16", *reuse), tmp_path / "bf16")  # bf16 autocast on the CPU
    assert (tmp_path / "bf16" / "result.json").exists() and not (tmp_path / "bf16" / "reused.json").exists()
    # the same record as a GPU writes it (written before records named their precision: resolved from its config)
    del record["precision"]
    record["device"] = "NVIDIA H200"
    (tmp_path / "runs" / "cpu" / "result.json").write_text(json.dumps(record))
    assert record_numerics(tmp_path / "runs" / "cpu", record) == "cuda bf16"
    run(make_cfg("model=textonly", *reuse), tmp_path / "again")
    assert (tmp_path / "again" / "result.json").exists() and not (tmp_path / "again" / "reused.json").exists()


def test_archived_records_are_reused_but_a_pretraining_run_only_with_its_weights(make_cfg, tmp_path, pretrained_run):
    """Records archived for the reference leaderboard (no checkpoints): a finished fine-tuning configuration is
    skipped, but a pre-training run is not, since fine-tuning would have to start from its weights."""
    run(make_cfg("model=textonly", "trainer.max_steps=1"), tmp_path / "runs" / "textonly")
    shutil.copytree(pretrained_run, tmp_path / "runs" / "pretrain")
    archive = tmp_path / "reference"
    assert archive_records(tmp_path / "runs", archive) == 2
    reuse = ("reuse_finished=true", f"reuse_root={archive}")
    run(make_cfg("model=textonly", "trainer.max_steps=1", *reuse), tmp_path / "again")
    assert json.loads((tmp_path / "again" / "reused.json").read_text()) == {"run_dir": str(archive / "textonly")}
    pretrain = make_cfg("model=albef", "task=pretrain", "trainer.max_steps=2", *SMALL_FORMATS, *reuse)
    assert run(pretrain, tmp_path / "pretrain-again")["task"] == "pretrain"
    assert (tmp_path / "pretrain-again" / "result.json").exists()
    with pytest.raises(VlbenchError, match="no finished task=pretrain run of model=albef"):
        run(make_cfg("model=albef", "init_from=pretrained", f"reuse_root={archive}"), tmp_path / "vqa")


def test_reuse_finished_in_the_same_directory_returns_its_result(make_cfg, tmp_path):
    cfg = make_cfg("model=textonly", "reuse_finished=true", f"reuse_root={tmp_path}/elsewhere")
    first = run(cfg, tmp_path / "a")
    assert run(cfg, tmp_path / "a") == first and not (tmp_path / "a" / "reused.json").exists()
    other = make_cfg("model=textonly", "reuse_finished=true", f"reuse_root={tmp_path}/elsewhere", "seed=4")
    with pytest.raises(VlbenchError, match="a run with another config finished here"):
        run(other, tmp_path / "a")
