"""UNIMO-3: every head's shapes, gradients everywhere, the gates' invariants, the exact in-layer reduction."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from vlbench.errors import VlbenchError
from vlbench.models.base import JointEncoding, ModelContext, ModelObjectives
from vlbench.models.checkpoints import resample_pos_embed
from vlbench.models.losses import in_batch_contrastive_loss, itm_pair_indices
from vlbench.models.unimo3 import UNIMO3
from vlbench.schema import Unimo3ModelConfig

CTX = ModelContext(vocab_size=50, pad_token_id=0, cls_token_id=2, sep_token_id=3, mask_token_id=4, image_size=32)
H = 32  # cross-modal hidden size; the pooled output is 2H
VARIANTS = {  # the configurations a sweep runs: both level sources, both gates, the in-layer ablation
    "unimodal": {},
    "cross_modal": {"cross_layer_source": "cross_modal"},
    "average": {"gate": "average"},
    "in_layer": {"cross_layer": False},
}


def tiny_unimo3(**overrides) -> UNIMO3:
    cfg = OmegaConf.structured(Unimo3ModelConfig)
    cfg.merge_with(
        {
            "vit_patch_size": 8,
            "vit_hidden_size": 24,  # ≠ H: the stream input transforms must bridge it
            "vit_depth": 3,
            "vit_num_heads": 2,
            "text": {"hidden_size": H, "num_heads": 2, "intermediate_size": 64, "dropout": 0.0},
            "text_layers": 2,
            "cross_layers": 3,
            "embed_dim": 16,
            **overrides,
        }
    )
    torch.manual_seed(0)
    return UNIMO3(cfg, CTX)


def make_batch(batch_size: int = 4, length: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (batch_size, length), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    mask[0, -2:] = 0
    ids[0, -2:] = 0
    pixels = torch.randn(batch_size, 3, 32, 32, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "image_ids": torch.arange(batch_size)}


def test_encode_and_every_head_have_the_contract_shapes():
    model = tiny_unimo3().eval()
    batch = make_batch()
    enc = model.encode(batch)
    assert model.hidden_size == 2 * H
    assert enc.pooled.shape == (4, 2 * H) and enc.tokens.shape == (4, 8, H) and enc.mask is batch["attention_mask"]

    answers = model.native_head("answer_classifier", 7)
    assert answers(enc, batch).shape == (4, 7)
    pair = model.native_head("pair_classifier", 2)
    assert pair([enc, model.encode(make_batch(seed=2))], batch).shape == (4, 2)
    assert isinstance(model.native_head("image_text_matcher", 2), ModelObjectives)
    assert isinstance(model.native_head("pretrain", 0), ModelObjectives)
    assert model.native_head("text_assignment", 3) is None  # no native head: the task says so

    image_emb, text_emb = model.embed_image(batch), model.embed_text(batch)
    assert image_emb.shape == text_emb.shape == (4, 16)
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(4))
    assert model.match_scores(batch).shape == (4,)


@pytest.mark.parametrize("levels", [0, 2])
def test_retrieval_from_cached_levels_equals_encoding_each_pair(levels):
    model = tiny_unimo3(unimodal_levels=levels).eval()
    batch = make_batch()
    with torch.no_grad():
        images = model.unimodal_tokens({"pixel_values": batch["pixel_values"]})
        texts = model.unimodal_tokens({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
        kept = levels or 3
        assert images["image_levels"].shape == (4, kept, 1 + 16, 24)  # every ViT level the layers read
        assert texts["text_levels"].shape == (4, min(kept, 2), 8, H)
        cached = model.match_scores_from_tokens({**images, **texts, "attention_mask": batch["attention_mask"]})
        torch.testing.assert_close(cached, model.match_scores(batch))
    assert tiny_unimo3(retrieval_cache=False).unimodal_tokens(batch) is None


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_pretrain_losses_reach_every_trainable_parameter(variant):
    model = tiny_unimo3(**VARIANTS[variant])
    losses = model.pretrain_losses(make_batch(), step=0)
    assert set(losses) == {"itc", "itm", "mlm"}
    assert all(loss.ndim == 0 and torch.isfinite(loss) for loss in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing  # no exclusions needed: every parameter is on some objective's path
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    gates = [p.grad for n, p in model.named_parameters() if "_gate.logits" in n]
    assert bool(gates) == (variant in ("unimodal", "cross_modal"))
    assert all(g.abs().sum() > 0 for g in gates)


def test_each_objective_trains_its_own_parts():
    model = tiny_unimo3()
    losses = model.pretrain_losses(make_batch(), step=0)

    def reached(loss: torch.Tensor) -> set[str]:
        model.zero_grad(set_to_none=True)
        loss.backward(retain_graph=True)
        return {n.split(".")[0] for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}

    assert reached(losses["itc"]) == {"visual_encoder", "text_encoder", "vision_proj", "text_proj", "temp"}
    assert {"cross_encoder", "itm_head"} <= reached(losses["itm"]) and "vision_proj" not in reached(losses["itm"])
    assert {"cross_encoder", "mlm_head"} <= reached(losses["mlm"]) and "itm_head" not in reached(losses["mlm"])


@pytest.mark.parametrize("source", ["unimodal", "cross_modal"])
def test_cross_layer_model_with_gates_on_the_in_layer_level_is_exactly_the_in_layer_model(source):
    in_layer = tiny_unimo3(cross_layer=False, cross_layer_source=source).eval()
    model = tiny_unimo3(cross_layer_source=source).eval()
    missing, unexpected = model.load_state_dict(in_layer.state_dict(), strict=False)
    assert not unexpected and missing and all("_gate." in k for k in missing)  # only the gates are new
    batch = make_batch()
    with torch.no_grad():
        assert not torch.allclose(model.encode(batch).pooled, in_layer.encode(batch).pooled)  # the levels matter
        for name, p in model.named_parameters():  # gate logits: +1000 on level 0 (in-layer), 0 elsewhere
            if "_gate.logits." in name:
                p.zero_()
                if name.endswith("bias"):
                    p[0] = 1000.0
        fused = model.fuse_batch(batch)
        assert all(
            torch.equal(w, F.one_hot(torch.zeros(4, dtype=torch.long), w.shape[1]).float())
            for w in fused.text_gates + fused.vision_gates
            if w is not None
        )
        expected = in_layer.fuse_batch(batch)
        assert torch.equal(fused.text, expected.text) and torch.equal(fused.vision, expected.vision)
        assert torch.equal(fused.pooled, expected.pooled)


def test_adaptive_gates_are_input_dependent_distributions_over_levels():
    model = tiny_unimo3().eval()
    with torch.no_grad():
        fused = model.fuse_batch(make_batch())
    weights = fused.text_gates + fused.vision_gates
    # unimodal source: the in-layer level + every layer of the other encoder (ViT 3, text 2)
    assert [w.shape for w in fused.text_gates] == [(4, 4)] * 3 and [w.shape for w in fused.vision_gates] == [(4, 3)] * 3
    for w in weights:
        assert (w >= 0).all()
        torch.testing.assert_close(w.sum(dim=-1), torch.ones(4))
        assert (w[0] - w[1]).abs().max() > 1e-4  # two examples, two different mixtures


def test_average_gates_are_uniform_and_cross_modal_levels_grow_with_depth():
    with torch.no_grad():
        fused = tiny_unimo3(gate="average").eval().fuse_batch(make_batch())
        for w in fused.text_gates + fused.vision_gates:
            assert torch.equal(w, torch.full_like(w, 1 / w.shape[1]))
        fused = tiny_unimo3(cross_layer_source="cross_modal").eval().fuse_batch(make_batch())
    # layer d reads the other stream's d earlier outputs besides its in-layer states; the first has no gate
    assert fused.text_gates[0] is None and [w.shape[1] for w in fused.text_gates[1:]] == [2, 3]


def test_a_few_steps_on_a_fixed_batch_lower_the_pretrain_loss():
    model = tiny_unimo3()
    batch = make_batch(batch_size=6)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def losses() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)  # the same masks and hard negatives every step
        return model.pretrain_losses(batch, step=0)

    with torch.no_grad():
        first = losses()
    for _ in range(8):
        optimizer.zero_grad()
        sum(losses().values()).backward()
        optimizer.step()
    with torch.no_grad():
        last = losses()
    assert all(last[name] < first[name] for name in first), (first, last)
    assert sum(last.values()) < 0.9 * sum(first.values())


def test_unknown_choices_fail_with_the_field_name():
    with pytest.raises(VlbenchError, match="model.gate='max'"):
        tiny_unimo3(gate="max")
    with pytest.raises(VlbenchError, match="model.cross_layer_source='all'"):
        tiny_unimo3(cross_layer_source="all")


def test_in_batch_contrastive_loss_is_symmetric_infonce_with_image_positives():
    g = torch.Generator().manual_seed(0)
    image, text = (F.normalize(torch.randn(4, 8, generator=g), dim=-1) for _ in range(2))
    temp = torch.tensor(0.1)
    logits = image @ text.t() / temp
    expected = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.t(), torch.arange(4))) / 2
    torch.testing.assert_close(in_batch_contrastive_loss(image, text, temp), expected)
    torch.testing.assert_close(in_batch_contrastive_loss(image, text, temp, torch.arange(4)), expected)
    # captions 0 and 1 show one image: each is a positive of the other's image, weighted equally
    same = in_batch_contrastive_loss(image, text, temp, torch.tensor([7, 7, 8, 9]))
    targets = torch.tensor([[0.5, 0.5, 0, 0], [0.5, 0.5, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
    manual = (
        -(targets * F.log_softmax(logits, 1)).sum(1).mean() - (targets * F.log_softmax(logits.t(), 1)).sum(1).mean()
    )
    torch.testing.assert_close(same, manual / 2)


def test_itm_pairs_are_positives_then_hard_negatives_never_of_the_same_image():
    sims = torch.randn(5, 5)
    same_image = torch.eye(5, dtype=torch.bool)
    same_image[0, 1] = same_image[1, 0] = True
    texts, images, labels = itm_pair_indices(sims, sims.t(), same_image)
    assert labels.tolist() == [1] * 5 + [0] * 10
    assert texts[:5].tolist() == images[:5].tolist() == list(range(5))
    assert not same_image[texts[5:], images[5:]].any()


def test_the_joint_encoding_is_the_pooled_concatenation_of_both_streams():
    model = tiny_unimo3().eval()
    with torch.no_grad():
        fused = model.fuse_batch(make_batch())
        encoder = model.cross_encoder
        text_pooled = torch.tanh(encoder.text_pooler(fused.text[:, 0]))
        vision_pooled = torch.tanh(encoder.vision_pooler(fused.vision[:, 0]))
    assert isinstance(model.encode(make_batch()), JointEncoding)
    torch.testing.assert_close(fused.pooled, torch.cat([text_pooled, vision_pooled], dim=-1))


def test_weights_saved_at_another_image_size_load_with_resampled_position_embeddings():
    small = tiny_unimo3()
    large = UNIMO3(small.cfg, ModelContext(**{**CTX.__dict__, "image_size": 48}))
    large.load_state_dict(large.adapt_checkpoint(small.state_dict()))  # 4×4 patches → 6×6
    assert large.visual_encoder.pos_embed.shape == (1, 37, 24)
    # the saved grid resampled, not a fresh initialisation
    expected = resample_pos_embed(small.visual_encoder.pos_embed.detach(), 37)
    torch.testing.assert_close(large.visual_encoder.pos_embed.detach(), expected)
    torch.testing.assert_close(large.visual_encoder.cls_token, small.visual_encoder.cls_token)


def test_the_gate_with_levels_standardised_once_equals_a_layer_norm_per_level():
    """Σ_k g_k · LayerNorm_k(level_k) + g_0 · in_layer, as written, against the folded form the model computes."""
    from vlbench.models.unimo3 import LevelGate, normalise_levels

    torch.manual_seed(0)
    gate = LevelGate(H, num_cross_levels=3, adaptive=True)
    with torch.no_grad():
        for norm in gate.norms:  # LayerNorms as trained, not at their identity initialisation
            norm.weight.normal_(1.0, 0.5)
            norm.bias.normal_(0.0, 0.5)
    query, in_layer, levels = torch.randn(4, 5, H), torch.randn(4, 7, H), torch.randn(4, 3, 7, H) * 3 + 1
    mask = torch.tensor([[1, 1, 1, 0, 0]] * 4)
    context, weights = gate(query, mask, in_layer, normalise_levels(levels))
    written = torch.stack([in_layer, *(norm(levels[:, k]) for k, norm in enumerate(gate.norms))], dim=1)
    torch.testing.assert_close(context, torch.einsum("bk,bknh->bnh", weights, written), rtol=1e-5, atol=1e-5)
    context.square().sum().backward()
    assert all(norm.weight.grad.abs().sum() > 0 and norm.bias.grad.abs().sum() > 0 for norm in gate.norms)
