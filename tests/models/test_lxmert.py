"""LXMERT: number-for-number equal to transformers' port (weights converted by key map), and its five pre-training
objectives with their randomness (masking rates, mismatches, QA only on matched questions) and gradient routing."""

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LxmertConfig, LxmertForPreTraining

from tests.models.test_albef import grads_of, nonzero  # gradient-routing helpers shared with ALBEF's tests
from vlbench.errors import VlbenchError
from vlbench.models.base import JointEncoding, ModelContext
from vlbench.models.lxmert import (
    LXMERT,
    from_transformers_state_dict,
    mask_regions,
    sample_answers,
    sample_mismatches,
    to_transformers_state_dict,
)
from vlbench.schema import LxmertModelConfig

VOCAB, FEAT, OBJ, ATTR, QA = 60, 16, 7, 5, 6
CTX = ModelContext(vocab_size=VOCAB, pad_token_id=0, cls_token_id=2, sep_token_id=3, mask_token_id=4, image_size=32)
ALL_LOSSES = {"mlm", "obj_feat", "obj_label", "obj_attr", "matched", "qa"}


def tiny_lxmert(**overrides) -> LXMERT:
    cfg = OmegaConf.structured(LxmertModelConfig)
    cfg.merge_with(
        {
            "text": {
                "hidden_size": 32,
                "num_heads": 2,
                "intermediate_size": 64,
                "dropout": 0.0,
                "max_position_embeddings": 20,
            },
            "l_layers": 2,
            "r_layers": 1,
            "x_layers": 2,
            "visual_feature_dim": FEAT,
            "num_object_labels": OBJ,
            "num_attr_labels": ATTR,
            "num_qa_labels": QA,
        },
        overrides,
    )
    torch.manual_seed(0)
    return LXMERT(cfg, CTX)


def reference_lxmert() -> LxmertForPreTraining:
    """transformers' LXMERT with the same sizes and every weight perturbed (so biases and LayerNorms count too)."""
    config = LxmertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_attention_heads=2,
        intermediate_size=64,
        l_layers=2,
        r_layers=1,
        x_layers=2,
        visual_feat_dim=FEAT,
        num_object_labels=OBJ,
        num_attr_labels=ATTR,
        num_qa_labels=QA,
        max_position_embeddings=20,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    torch.manual_seed(0)
    model = LxmertForPreTraining(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def make_batch(batch_size: int = 3, length: int = 9, regions: int = 5, pad: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, VOCAB, (batch_size, length), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    region_mask = torch.ones(batch_size, regions, dtype=torch.bool)
    if pad:
        mask[0, -3:], ids[0, -3:] = 0, 0
        ids[0, -4] = 3
        region_mask[1, -2:] = False
    boxes = torch.rand(batch_size, regions, 4, generator=g).sort(dim=-1).values[..., [0, 2, 1, 3]]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "region_features": torch.randn(batch_size, regions, FEAT, generator=g),
        "region_boxes": boxes,
        "region_mask": region_mask,
        "region_object_ids": torch.randint(0, OBJ, (batch_size, regions), generator=g),
        "region_object_conf": torch.rand(batch_size, regions, generator=g),
        "region_attr_ids": torch.randint(0, ATTR, (batch_size, regions), generator=g),
        "region_attr_conf": torch.rand(batch_size, regions, generator=g),
        "image_ids": torch.arange(batch_size),
        "qa_targets": torch.rand(batch_size, QA, generator=g).round(),
        "qa_mask": torch.ones(batch_size, dtype=torch.bool),
    }


@pytest.fixture(scope="module")
def reference_and_ours():
    reference = reference_lxmert()
    ours = tiny_lxmert().eval()
    ours.load_reference_weights(from_transformers_state_dict(reference.state_dict()))
    return reference, ours


def reference_outputs(reference: LxmertForPreTraining, batch, **extra):
    return reference(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        visual_feats=batch["region_features"],
        visual_pos=batch["region_boxes"],
        visual_attention_mask=batch["region_mask"].long(),
        **extra,
    )


def close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


# ----- parity with transformers --------------------------------------------------------------------------------------
def test_encoders_and_heads_equal_transformers(reference_and_ours):
    reference, ours = reference_and_ours
    batch = make_batch()
    with torch.no_grad():
        base = reference.lxmert(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            visual_feats=batch["region_features"],
            visual_pos=batch["region_boxes"],
            visual_attention_mask=batch["region_mask"].long(),
        )
        full = reference_outputs(reference, batch)
        objects = reference.obj_predict_head(base.vision_output)
        streams = ours.encode_streams(batch)
        close(streams.language, base.language_output)  # padded positions included
        close(streams.vision, base.vision_output)
        close(streams.pooled, base.pooled_output)
        close(ours.mlm_head(streams.language), full.prediction_logits)
        close(ours.match_head(streams.pooled), full.cross_relationship_score)
        close(ours.qa_head(streams.pooled), full.question_answering_score)
        hidden = ours.object_head.transform(streams.vision)
        close(ours.object_head.obj(hidden), objects["obj"])
        close(ours.object_head.attr(hidden), objects["attr"])
        close(ours.object_head.feat(hidden), objects["feat"])
        close(ours.match_scores(batch), full.cross_relationship_score[:, 1])


def test_pretraining_loss_equals_transformers_on_the_same_corruption(reference_and_ours):
    reference, ours = reference_and_ours
    batch = make_batch(batch_size=6, pad=False)  # transformers averages visual losses over every region
    torch.manual_seed(2)
    inputs = ours.corrupt(batch, step=0)
    assert (inputs.qa_answers >= 0).any() and inputs.masked_regions.any() and (inputs.matched == 0).any()
    with torch.no_grad():
        losses = ours.losses_from(inputs)
        expected = reference(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            visual_feats=inputs.region_features,
            visual_pos=inputs.region_boxes,
            labels=inputs.mlm_labels,
            obj_labels={
                "obj": (inputs.object_ids, inputs.object_conf),
                "attr": (inputs.attr_ids, inputs.attr_conf),
                "feat": (inputs.target_features, inputs.masked_regions.float()),
            },
            matched_label=inputs.matched,
            ans=inputs.qa_answers,
        ).loss
    assert set(losses) == ALL_LOSSES
    close(sum(losses.values()), expected)


def test_weights_convert_both_ways_and_from_the_original_release(reference_and_ours, tmp_path):
    reference, ours = reference_and_ours
    back = to_transformers_state_dict(ours.state_dict())
    missing, unexpected = reference_lxmert().load_state_dict(back, strict=True)
    assert not missing and not unexpected
    for key, value in reference.state_dict().items():
        assert torch.equal(back[key], value), key
    # the original release: ``bert.`` instead of ``lxmert.``, saved from DataParallel (``module.``)
    original = {"module." + k.replace("lxmert.", "bert.", 1): v for k, v in reference.state_dict().items()}
    path = tmp_path / "model_LXRT.pth"
    torch.save(original, path)
    loaded = tiny_lxmert(init_checkpoint=str(path)).eval()
    batch = make_batch()
    with torch.no_grad():
        close(loaded.encode(batch).pooled, ours.encode(batch).pooled)


def test_a_backbone_only_checkpoint_loads_and_bad_keys_are_listed(reference_and_ours):
    reference, ours = reference_and_ours
    model = tiny_lxmert()
    model.load_reference_weights(from_transformers_state_dict(reference.lxmert.state_dict()))  # LxmertModel keys
    torch.testing.assert_close(model.pooler.weight, ours.pooler.weight)
    bad = dict(reference.state_dict(), **{"lxmert.encoder.extra.weight": torch.zeros(1)})
    with pytest.raises(VlbenchError, match=r"cannot map: lxmert\.encoder\.extra\.weight"):
        from_transformers_state_dict(bad)
    deeper = tiny_lxmert(x_layers=3)
    with pytest.raises(VlbenchError, match="missing .*cross_encoder.2"):
        deeper.load_reference_weights(from_transformers_state_dict(reference.state_dict()))


# ----- the model contract --------------------------------------------------------------------------------------------
def test_shapes_heads_and_no_unimodal_embeddings():
    model = tiny_lxmert().eval()
    batch = make_batch()
    enc = model.encode(batch)
    assert enc.pooled.shape == (3, 32) and enc.tokens.shape == (3, 9, 32) and enc.mask is batch["attention_mask"]
    assert model.encode_streams(batch).vision.shape == (3, 5, 32)
    assert model.native_head("answer_classifier", 11)(enc, batch).shape == (3, 11)
    assert model.native_head("pair_classifier", 2)([enc, enc], batch).shape == (3, 2)
    assert model.native_head("image_text_matcher", 0) is None
    assert model.match_scores(batch).shape == (3,)
    assert model.embed_image(batch) is None and model.embed_text(batch) is None


def test_eval_encode_is_deterministic_and_padded_regions_are_ignored():
    model = tiny_lxmert(text={"dropout": 0.3}).eval()
    batch = make_batch()
    with torch.no_grad():
        first = model.encode(batch)
        assert torch.equal(first.pooled, model.encode(batch).pooled)
        changed = dict(batch, region_features=batch["region_features"].clone())
        changed["region_features"][1, -2:] += 10.0  # example 1's padded regions
        torch.testing.assert_close(model.encode(changed).tokens, first.tokens)
        changed["region_features"][1, 0] += 10.0  # a real one
        assert not torch.allclose(model.encode(changed).tokens[1], first.tokens[1])


# ----- pre-training objectives ---------------------------------------------------------------------------------------
def test_losses_are_finite_and_reach_the_right_parameters():
    model = tiny_lxmert()
    torch.manual_seed(0)
    losses = model.pretrain_losses(make_batch(batch_size=6), step=0)
    assert set(losses) == ALL_LOSSES
    for name, loss in losses.items():
        assert loss.ndim == 0 and torch.isfinite(loss), name
    routes = {
        "mlm": ("mlm_head.", "match_head."),
        "obj_feat": ("object_head.feat.", "object_head.obj."),
        "obj_label": ("object_head.obj.", "object_head.attr."),
        "obj_attr": ("object_head.attr.", "object_head.feat."),
        "matched": ("match_head.", "qa_head."),
        "qa": ("qa_head.", "match_head."),
    }
    for name, (reaches, spared) in routes.items():
        grads = grads_of(model, losses[name])
        assert nonzero(grads, reaches) and not nonzero(grads, spared), name
        assert nonzero(grads, "language_encoder.") and nonzero(grads, "cross_encoder."), name
    assert nonzero(grads_of(model, losses["obj_attr"]), "visual_embeddings.feature_proj")


def test_qa_waits_for_its_step_and_needs_answers():
    model = tiny_lxmert(qa_start_step=10)
    batch = make_batch(batch_size=6)
    early = model.pretrain_losses(batch, step=9)
    assert set(early) == ALL_LOSSES - {"qa"}
    grads = grads_of(model, sum(early.values()))
    assert all(g is None for n, g in grads.items() if n.startswith("qa_head."))
    assert "qa" in model.pretrain_losses(batch, step=10)
    captions_only = {k: v for k, v in batch.items() if not k.startswith("qa_")}
    assert "qa" not in model.pretrain_losses(captions_only, step=10)
    assert "qa" not in tiny_lxmert(num_qa_labels=0).pretrain_losses(batch, step=10)
    by_epochs = tiny_lxmert(qa_start_step=0, qa_start_epochs=2.5)
    by_epochs.ctx = dataclasses.replace(by_epochs.ctx, steps_per_epoch=4)  # epoch 2.5 of 4 steps: step 10
    assert by_epochs.qa_start() == 10
    assert "qa" not in by_epochs.pretrain_losses(batch, step=9) and "qa" in by_epochs.pretrain_losses(batch, step=10)
    with pytest.raises(VlbenchError, match="num_qa_labels"):
        model.pretrain_losses(dict(batch, qa_targets=torch.ones(6, QA + 1)), step=10)
    with pytest.raises(VlbenchError, match="region_attr_ids reach 5 but model.num_attr_labels=5"):
        model.pretrain_losses(dict(batch, region_attr_ids=torch.full((6, 5), ATTR)), step=0)


def test_qa_only_on_matched_questions():
    batch = make_batch(batch_size=6)
    unanswerable = dict(batch, qa_mask=torch.zeros(6, dtype=torch.bool))
    assert tiny_lxmert().pretrain_losses(unanswerable, step=0)["qa"].item() == 0.0
    all_mismatched = tiny_lxmert(matching_probability=1.0)
    assert all_mismatched.pretrain_losses(batch, step=0)["qa"].item() == 0.0
    scores = torch.tensor([[0.0, 0.3, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    usable = torch.tensor([True, False, True, True])
    for _ in range(20):
        answers = sample_answers(scores, usable)
        assert answers[0] == 1 and answers[1] == -100 and answers[2] == -100 and answers[3] == 2


def test_mismatches_are_balanced_and_never_the_own_sentence_or_image():
    torch.manual_seed(0)
    image_ids = torch.tensor([0, 0, 1, 2, 3, 4, 5, 6])  # pairs 0 and 1 show the same image
    matched_total = 0
    for _ in range(300):
        source, matched = sample_mismatches(8, 0.5, image_ids, torch.device("cpu"))
        flipped = ~matched
        assert (source[matched] == torch.arange(8)[matched]).all()
        assert (image_ids[source[flipped]] != image_ids[flipped]).all()
        matched_total += int(matched.sum())
    assert 0.45 < matched_total / (300 * 8) < 0.55
    source, matched = sample_mismatches(3, 1.0, torch.tensor([7, 7, 7]), torch.device("cpu"))
    assert matched.all() and torch.equal(source, torch.arange(3))  # one image only: nothing to mismatch with


def test_object_masking_follows_the_reference_recipe():
    torch.manual_seed(0)
    features = torch.randn(400, 10, 6) + 3.0  # no real feature is all zeros
    region_mask = torch.ones(400, 10, dtype=torch.bool)
    region_mask[:, 8:] = False
    masked, chosen = mask_regions(features, region_mask, 0.15)
    assert not chosen[:, 8:].any() and torch.equal(masked[:, 8:], features[:, 8:])
    assert 0.13 < chosen[:, :8].float().mean() < 0.17
    zeroed = (masked == 0).all(dim=-1)
    kept = (masked == features).all(dim=-1)
    assert not (zeroed & ~chosen).any() and kept[~chosen].all()
    assert 0.75 < zeroed.sum() / chosen.sum() < 0.85
    replaced = chosen & ~zeroed & ~kept
    assert 0.06 < replaced.sum() / chosen.sum() < 0.14
    real = features[region_mask]
    assert all((real == row).all(dim=-1).any() for row in masked[replaced][:20])  # another real region's feature


def test_word_masking_rate_over_many_draws():
    model = tiny_lxmert(matching_probability=0.0)
    batch = make_batch(batch_size=64, length=16, pad=False)
    torch.manual_seed(0)
    inputs = model.corrupt(batch, step=0)
    chosen = inputs.mlm_labels != -100
    assert not chosen[:, 0].any() and not chosen[:, -1].any()
    assert 0.12 < chosen[:, 1:-1].float().mean() < 0.18
    assert torch.equal(inputs.mlm_labels[chosen], batch["input_ids"][chosen])


def test_eval_mode_pretraining_is_random_but_reproducible():
    model = tiny_lxmert().eval()
    batch = make_batch(batch_size=6)
    with torch.no_grad():
        torch.manual_seed(5)
        first = model.pretrain_losses(batch, step=0)
        torch.manual_seed(5)
        again = model.pretrain_losses(batch, step=0)
        torch.manual_seed(6)
        other = model.pretrain_losses(batch, step=0)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_native_answer_head_is_the_reference_mlp():
    head = tiny_lxmert().native_head("answer_classifier", 4)
    layers = [type(m).__name__ for m in head.classifier.net]
    assert layers == ["Linear", "GELU", "LayerNorm", "Dropout", "Linear"] and head.classifier.net[3].p == 0.0
    assert head.classifier.net[0].out_features == 64
    enc = JointEncoding(pooled=torch.randn(2, 32), tokens=torch.randn(2, 3, 32), mask=torch.ones(2, 3))
    assert head(enc, {}).shape == (2, 4)
