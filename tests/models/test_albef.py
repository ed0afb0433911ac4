"""ALBEF's objectives: each loss finite with gradients in the right places, the momentum model, the queues."""

import copy

import pytest
import torch
from omegaconf import OmegaConf

from vlbench.models.albef import ALBEF
from vlbench.models.base import ModelContext
from vlbench.models.losses import image_text_contrastive_loss, mask_tokens, momentum_update, sample_hard_negatives
from vlbench.schema import AlbefModelConfig

CTX = ModelContext(vocab_size=50, pad_token_id=0, cls_token_id=2, sep_token_id=3, mask_token_id=4, image_size=32)


def tiny_albef(**overrides) -> ALBEF:
    cfg = OmegaConf.structured(AlbefModelConfig)
    cfg.merge_with(
        {
            "vit_patch_size": 8,
            "vit_hidden_size": 32,
            "vit_depth": 1,
            "vit_num_heads": 2,
            "text": {
                "hidden_size": 32,
                "num_heads": 2,
                "intermediate_size": 64,
                "dropout": 0.0,
                "max_position_embeddings": 16,
            },
            "text_layers": 1,
            "fusion_layers": 1,
            "embed_dim": 16,
            "queue_size": 12,
            **overrides,
        }
    )
    torch.manual_seed(0)
    return ALBEF(cfg, CTX)


def make_batch(batch_size: int = 4, length: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 50, (batch_size, length), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    ids[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": torch.randn(batch_size, 3, 32, 32, generator=g)}


def grads_of(model: ALBEF, loss: torch.Tensor) -> dict[str, torch.Tensor | None]:
    model.zero_grad(set_to_none=True)
    loss.backward(retain_graph=True)
    return {n: p.grad for n, p in model.named_parameters()}


def nonzero(grads, prefix: str) -> bool:
    return any(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n.startswith(prefix))


def test_encode_shapes():
    model = tiny_albef()
    enc = model.encode(make_batch())
    assert enc.pooled.shape == (4, 32) and enc.tokens.shape == (4, 8, 32)


def test_losses_are_finite_and_reach_the_right_parameters():
    model = tiny_albef()
    losses = model.pretrain_losses(make_batch(), step=0)
    assert set(losses) == {"itc", "itm", "mlm"}
    for name, loss in losses.items():
        assert loss.ndim == 0 and torch.isfinite(loss), name

    itc = grads_of(model, losses["itc"])
    assert nonzero(itc, "online.vision_proj") and nonzero(itc, "online.text_proj") and itc["temp"] is not None
    assert not nonzero(itc, "online.fusion_encoder") and not nonzero(itc, "itm_head")

    itm = grads_of(model, losses["itm"])
    assert nonzero(itm, "itm_head") and nonzero(itm, "online.fusion_encoder") and nonzero(itm, "online.visual_encoder")
    assert not nonzero(itm, "online.vision_proj")

    mlm = grads_of(model, losses["mlm"])
    assert nonzero(mlm, "online.mlm_head") and nonzero(mlm, "online.fusion_encoder")
    assert not nonzero(mlm, "itm_head")

    total = grads_of(model, sum(losses.values()))
    assert all(g is None for n, g in total.items() if n.startswith("momentum_model."))
    assert all(not p.requires_grad for p in model.momentum_model.parameters())


def test_momentum_model_follows_the_ema_rule():
    model = tiny_albef(momentum=0.9)
    with torch.no_grad():  # make online and momentum differ
        for p in model.online.parameters():
            p.add_(0.1)
    online_before = copy.deepcopy(model.online.state_dict())
    momentum_before = copy.deepcopy(model.momentum_model.state_dict())
    model.pretrain_losses(make_batch(), step=0)
    for name, value in model.momentum_model.named_parameters():
        expected = 0.9 * momentum_before[name] + 0.1 * online_before[name]
        torch.testing.assert_close(value, expected)


def test_queue_is_a_ring_buffer_of_momentum_features():
    model = tiny_albef()  # queue 12, batch 4
    batch = make_batch()
    model.queue_ptr.fill_(10)  # writing 4 from column 10 wraps to columns 10, 11, 0, 1
    before = model.image_queue.clone()
    model.pretrain_losses(batch, step=0)
    assert int(model.queue_ptr) == 2
    with torch.no_grad():
        _, image_feat_m = model.momentum_model.encode_image(batch["pixel_values"])
    torch.testing.assert_close(model.image_queue[:, [10, 11, 0, 1]], image_feat_m.t())
    torch.testing.assert_close(model.image_queue[:, 2:10], before[:, 2:10])
    assert torch.allclose(model.text_queue.norm(dim=0), torch.ones(12), atol=1e-5)


def test_enqueue_traces_as_one_graph():
    """The queue pointer is read as a tensor: no `.item()` host sync per step (a GPU stall), no graph break under
    torch.compile (dynamo counts a graph break at `.item()`)."""
    from torch._dynamo.utils import counters

    model = tiny_albef()  # queue 12
    model.queue_ptr.fill_(10)
    image_feat, text_feat = torch.randn(4, 16), torch.randn(4, 16)
    torch._dynamo.reset()
    counters.clear()
    torch.compile(model._dequeue_and_enqueue, backend="eager")(image_feat, text_feat, torch.tensor([7, 8, 9, 10]))
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert int(model.queue_ptr) == 2
    torch.testing.assert_close(model.image_queue[:, [10, 11, 0, 1]], image_feat.t())
    torch.testing.assert_close(model.text_queue[:, [10, 11, 0, 1]], text_feat.t())
    assert model.id_queue[[10, 11, 0, 1]].tolist() == [7, 8, 9, 10]


def test_temperature_is_clamped():
    model = tiny_albef()
    with torch.no_grad():
        model.temp.fill_(5.0)
    model.pretrain_losses(make_batch(), step=0)
    assert model.temp.item() == pytest.approx(0.5)


def test_alpha_ramps_over_warmup():
    model = tiny_albef(alpha=0.4, alpha_warmup_steps=100)
    assert model.alpha_at(0) == 0.0 and model.alpha_at(50) == pytest.approx(0.2) and model.alpha_at(500) == 0.4
    assert tiny_albef(distill=False).alpha_at(500) == 0.0


def test_itc_with_alpha_zero_is_plain_infonce():
    torch.manual_seed(0)
    feats = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    queue = torch.nn.functional.normalize(torch.randn(8, 6), dim=0)
    temp = torch.tensor(0.1)
    loss, sim_i2t, _ = image_text_contrastive_loss(feats, feats, feats, feats, queue, queue, temp, alpha=0.0)
    expected = torch.nn.functional.cross_entropy(feats @ torch.cat([feats.t(), queue], 1) / temp, torch.arange(4))
    torch.testing.assert_close(loss, expected)
    assert sim_i2t.shape == (4, 10)


def test_hard_negatives_never_pick_the_positive():
    torch.manual_seed(0)
    sim = torch.eye(5) * 50  # the positive dominates: still never sampled
    for _ in range(20):
        neg_t, neg_i = sample_hard_negatives(sim, sim)
        assert (neg_t != torch.arange(5)).all() and (neg_i != torch.arange(5)).all()


def test_hard_negatives_follow_similarity():
    torch.manual_seed(0)
    sim = torch.full((3, 3), -10.0)
    sim[0, 2] = sim[1, 0] = sim[2, 1] = 10.0  # one very similar negative per row
    neg_t, _ = sample_hard_negatives(sim, sim)
    assert neg_t.tolist() == [2, 0, 1]


def test_mask_tokens_bert_recipe():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (64, 40), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    mask[:, 30:] = 0
    masked, labels = mask_tokens(ids, mask, 1000, 4, [0, 2, 3], 0.15, generator=g)
    chosen = labels != -100
    assert not chosen[:, 0].any() and not chosen[:, 30:].any()  # specials and padding never chosen
    assert 0.12 < chosen[:, 1:30].float().mean() < 0.18
    assert torch.equal(labels[chosen], ids[chosen])
    replaced_by_mask = (masked == 4) & chosen
    assert 0.75 < replaced_by_mask.sum() / chosen.sum() < 0.85
    assert torch.equal(masked[~chosen], ids[~chosen])


def test_momentum_encoders_move_once_per_optimizer_step_under_gradient_accumulation(make_cfg, tmp_path):
    """With k accumulated micro-batches the momentum EMA runs once per optimizer step, as the reference runs it once
    per iteration of the whole batch: after step 1 the momentum weights are m·θ₀ + (1 − m)·θ₁, not m^k·θ₀ + …"""
    from safetensors.torch import load_file

    from tests.test_tasks_end_to_end import SMALL_FORMATS
    from vlbench.runner import run

    common = ("model=albef", "task=pretrain", *SMALL_FORMATS, "trainer.batch_size=4", "trainer.grad_accum_steps=2")
    run(make_cfg(*common, "trainer.max_steps=2", "trainer.stop_at_step=1"), tmp_path / "one")
    run(make_cfg(*common, "trainer.max_steps=2"), tmp_path / "two")
    after_one = load_file(tmp_path / "one" / "checkpoints" / "last.safetensors")
    after_two = load_file(tmp_path / "two" / "checkpoints" / "last.safetensors")
    m = make_cfg("model=albef").model.momentum
    pairs = [(k, k.replace("momentum_model.", "online.")) for k in after_two if "momentum_model." in k]
    pairs = [(k, online) for k, online in pairs if online in after_one and after_one[k].is_floating_point()]
    assert len(pairs) > 20
    # the EMA of step 0 was a no-op (momentum = online at initialisation), so one run's momentum weights are θ₀
    moved = 0
    for k, online in pairs:
        theta0, theta1 = after_one[k], after_one[online]
        torch.testing.assert_close(after_two[k], m * theta0 + (1 - m) * theta1, rtol=0, atol=1e-6)
        moved += not torch.equal(theta0, theta1)
    assert moved > 10  # the online weights did change at step 0, so twice m would have shown


def test_momentum_update_is_the_per_parameter_ema_bit_for_bit():
    """The multi-tensor EMA computes exactly m · θ_m + (1 − m) · θ for every parameter, fp32 and bf16 alike."""
    torch.manual_seed(0)
    online = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.LayerNorm(7), torch.nn.Linear(7, 3).to(torch.bfloat16))
    momentum_model = copy.deepcopy(online)
    for p in momentum_model.parameters():
        p.data.normal_()
    pairs = zip(momentum_model.parameters(), online.parameters(), strict=True)
    expected = [p_m.detach().clone().mul_(0.995).add_(p.detach(), alpha=1 - 0.995) for p_m, p in pairs]
    momentum_update(online, momentum_model, 0.995)
    for got, want in zip(momentum_model.parameters(), expected, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want)
