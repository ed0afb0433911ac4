"""Paper configurations compose with the paper's values; epoch budgets become steps; alpha ramps over an epoch."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from vlbench.config_hash import config_hash, setting_hash
from vlbench.runner import run

EXPERIMENTS = Path(__file__).resolve().parents[1] / "conf" / "experiment"

PAPER = {  # experiment: (task, head, image size, lr, epochs, effective batch)
    "albef_pretrain": ("pretrain", "shared", 256, 1e-4, 30, 512),
    "albef_vqa": ("vqa", "native", 384, 2e-5, 8, 256),
    "albef_nlvr2_ta": ("nlvr2_ta", "native", 256, 2e-5, 1, 512),
    "albef_nlvr2": ("nlvr2", "native", 384, 2e-5, 10, 128),
    "albef_retrieval_coco": ("retrieval", "native", 384, 1e-5, 5, 256),
    "albef_retrieval_flickr": ("retrieval", "native", 384, 1e-5, 10, 256),
}


@pytest.mark.parametrize("experiment", sorted(PAPER))
def test_albef_paper_configurations(experiment):
    with initialize_config_module(config_module="vlbench.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"+experiment={experiment}"])
    task, head, size, lr, epochs, batch = PAPER[experiment]
    assert cfg.model.name == "albef" and cfg.task.name == task and cfg.head == head
    assert cfg.data.image_size == size and cfg.trainer.lr == pytest.approx(lr) and cfg.trainer.epochs == epochs
    # the per-GPU batch × 8 accumulation steps: the paper's 8-GPU batch on one device (grad_accum_steps=1 on 8 GPUs)
    assert cfg.trainer.batch_size * cfg.trainer.grad_accum_steps == batch
    assert cfg.model.text.hidden_size == 768 and cfg.model.vit_depth == 12
    assert cfg.model.text_layers == 6 and cfg.model.fusion_layers == 6 and cfg.model.embed_dim == 256
    assert cfg.model.queue_size == 65536 and cfg.model.momentum == 0.995 and cfg.model.temperature == 0.07
    assert cfg.model.alpha == 0.4 and cfg.model.alpha_warmup_epochs == 1
    # the reference's tokenizer lengths: 25 for pre-training, VQA and text assignment, 30 for retrieval (its NLVR2
    # does not truncate: the data config's length applies)
    if task != "nlvr2":
        assert cfg.data.max_text_len == (30 if task == "retrieval" else 25)
    if experiment == "albef_retrieval_coco":
        assert cfg.task.rerank_k == 256
    if experiment == "albef_retrieval_flickr":
        assert cfg.task.rerank_k == 128
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


LXMERT_PAPER = {  # experiment: (task, lr, epochs, batch, warm-up ratio, gradient clipping) — airsplay/lxmert run/*.bash
    "lxmert_pretrain": ("pretrain", 1e-4, 20, 256, 0.05, 1.0),
    "lxmert_vqa": ("vqa", 5e-5, 4, 32, 0.1, 5.0),
    "lxmert_gqa": ("gqa", 1e-5, 4, 32, 0.1, 5.0),
    "lxmert_nlvr2": ("nlvr2", 5e-5, 4, 32, 0.1, 5.0),
}


@pytest.mark.parametrize("experiment", sorted(LXMERT_PAPER))
def test_lxmert_paper_configurations(experiment):
    cfg = _compose(f"+experiment={experiment}")
    task, lr, epochs, batch, warmup, clip = LXMERT_PAPER[experiment]
    assert cfg.model.name == "lxmert" and cfg.task.name == task and cfg.scale.name == "base"
    assert (cfg.model.l_layers, cfg.model.r_layers, cfg.model.x_layers) == (9, 5, 5)
    assert cfg.model.text.hidden_size == 768 and cfg.model.visual_feature_dim == 2048 and cfg.data.max_text_len == 20
    t = cfg.trainer
    assert t.lr == pytest.approx(lr) and t.epochs == epochs and t.batch_size * t.grad_accum_steps == batch
    assert t.schedule == "linear" and t.warmup_steps == 0 and t.warmup_ratio == warmup and t.min_lr_ratio == 0.0
    assert t.clip_grad_norm == clip and t.weight_decay == 0.01
    # fine-tuning from a pre-training run keeps the paper's lr; QA joins pre-training for its last 10 epochs
    assert t.finetune_lr in (None, pytest.approx(lr))
    assert cfg.model.qa_start_epochs == (10 if task == "pretrain" else 0)
    OmegaConf.to_container(cfg, resolve=True)


def test_albef_ramps_alpha_over_the_first_epoch_except_at_tiny_scale():
    assert _compose("model=albef", "scale=base").model.alpha_warmup_epochs == 1  # the paper
    assert _compose("model=albef", "scale=tiny").model.alpha_warmup_epochs == 0  # as the reference grid ran


def test_an_epoch_budget_becomes_steps_and_ramps_alpha(make_cfg, tmp_path):
    # the small world has 288 training questions: batch 16 → 18 steps per epoch; half an epoch = 9 steps
    run_dir = tmp_path / "run"
    result = run(make_cfg("model=albef", "trainer.epochs=0.5", "model.alpha_warmup_epochs=1"), run_dir)
    assert result["steps"] == 9 and result["train_samples"] == 9 * 16
    assert OmegaConf.load(run_dir / "config.yaml").trainer.max_steps == 9
    from vlbench.models.albef import ALBEF
    from vlbench.models.base import ModelContext

    cfg = make_cfg("model=albef", "model.alpha_warmup_epochs=1")
    ctx = ModelContext(vocab_size=40, pad_token_id=0, cls_token_id=1, sep_token_id=2, mask_token_id=3, image_size=64,
                       steps_per_epoch=18)  # fmt: skip
    model = ALBEF(cfg.model, ctx)
    assert model.alpha_at(0) == 0.0 and model.alpha_at(9) == pytest.approx(0.2) and model.alpha_at(40) == 0.4


def _compose(*overrides):
    with initialize_config_module(config_module="vlbench.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("budget", ["tiny_96k", "base_1m"])
def test_budget_presets_fix_samples_batch_and_resolution_for_every_model(budget):
    seen = set()
    for model in ("albef", "lxmert", "pixelbert", "unimo3", "textonly"):
        cfg = _compose(f"model={model}", f"budget={budget}", "scale=base" if budget == "base_1m" else "scale=tiny")
        t = cfg.trainer
        seen.add((t.max_steps * t.batch_size * t.grad_accum_steps, t.epochs, cfg.data.image_size))
    # every model: the preset's training samples (conf/budget/*.yaml), no epoch budget, its resolution
    assert seen == {{"tiny_96k": (96_000, 0, 64), "base_1m": (1_024_000, 0, 384)}[budget]}
    assert _compose(f"budget={budget}", "trainer.max_steps=7").trainer.max_steps == 7  # the command line still wins


def test_suite_starts_fine_tuning_from_pretraining_and_skips_finished_runs():
    cfg = _compose("+experiment=suite", "model=lxmert", "task=gqa", "seed=2")
    assert cfg.init_from == "pretrained" and cfg.reuse_finished and cfg.results_dir == "results/runs"
    assert cfg.resume == "auto"  # a re-launched grid continues its killed runs (tests/test_preemption.py)
    # from a checkpoint at most 250 steps back; when to checkpoint is not part of what a run computes
    assert cfg.trainer.checkpoint_every == 250
    plain = _compose("+experiment=suite", "model=lxmert", "task=gqa", "seed=2", "trainer.checkpoint_every=0")
    assert config_hash(cfg) == config_hash(plain) and setting_hash(cfg) == setting_hash(plain)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in EXPERIMENTS.glob("*.yaml")))
def test_only_protocol_experiments_are_left_out_of_a_leaderboard_setting(experiment):
    """`+experiment=suite` shares its leaderboard row with the same runs launched plainly (it changes how a grid runs,
    and init_from, which has its own column); a paper configuration changes what a run computes, so it names a
    setting of its own rather than pooling with the plain runs."""
    from vlbench.config_hash import PROTOCOL_EXPERIMENTS, is_setting_override

    with_it = _compose(f"+experiment={experiment}")
    without = _compose(f"model={with_it.model.name}", f"task={with_it.task.name}", f"init_from={with_it.init_from}")
    same = setting_hash(with_it) == setting_hash(without)
    assert (experiment in PROTOCOL_EXPERIMENTS) == same
    assert is_setting_override(f"+experiment={experiment}") == (not same)
