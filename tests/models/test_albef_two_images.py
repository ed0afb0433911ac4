"""ALBEF's two-image fusion (NLVR2 native head) and text-assignment pairs."""

import pytest
import torch

from tests.models.test_albef import make_batch, tiny_albef
from vlbench.models.base import TextSizes
from vlbench.models.layers import TransformerLayer, TwinBlockLayer, TwinCrossAttentionLayer
from vlbench.models.losses import text_assignment_pairs

SIZES = TextSizes(hidden_size=16, num_heads=2, intermediate_size=32, dropout=0.0, max_position_embeddings=8)


def test_twin_layer_starts_as_the_single_image_layer():
    torch.manual_seed(0)
    layer = TransformerLayer(SIZES, cross_attention_size=16).eval()
    twin = TwinCrossAttentionLayer(layer, merge="mean").eval()
    x, image, other = torch.randn(2, 5, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    mask, image_mask = torch.ones(2, 5), torch.ones(2, 7)
    single = layer(x, mask, image, image_mask)
    # both copies start as the layer's cross-attention: the same image twice reads exactly as the single layer
    assert torch.allclose(twin(x, mask, (image, image), (image_mask, image_mask)), single, atol=1e-6)
    assert not torch.allclose(twin(x, mask, (image, other), (image_mask, image_mask)), single, atol=1e-3)
    linear = TwinCrossAttentionLayer(layer, merge="linear")
    assert linear.merge.weight.shape == (16, 32)
    assert torch.equal(linear.crossattention[0].key.weight, linear.crossattention[1].key.weight)
    assert linear.crossattention[0].key.weight is not linear.crossattention[1].key.weight  # trained apart


def test_albef_block_pair_starts_as_the_layer_twice_and_shares_key_value():
    """ALBEF's own NLVR2 layer: the fusion layer replicated into two blocks, image 1 then image 2, sharing the
    cross-attention key/value projections (model_nlvr.py share_cross_attention)."""
    torch.manual_seed(0)
    layer = TransformerLayer(SIZES, cross_attention_size=16).eval()
    pair = TwinBlockLayer(layer).eval()
    x, image, other = torch.randn(2, 5, 16), torch.randn(2, 7, 16), torch.randn(2, 7, 16)
    mask, image_mask = torch.ones(2, 5), torch.ones(2, 7)
    out = pair(x, mask, (image, other), (image_mask, image_mask))
    torch.testing.assert_close(out, layer(layer(x, mask, image, image_mask), mask, other, image_mask))
    # one copy of the shared projections: the second block has none of its own, and both images train them
    names = [n for n, _ in pair.named_parameters()]
    assert "first.crossattention.key.weight" in names and not any("second.crossattention.key" in n for n in names)
    assert "second.crossattention.query.weight" in names and "second.attention.key.weight" in names
    assert len(set(map(id, pair.parameters()))) == len(names)  # nothing registered twice
    other.requires_grad_(True)
    read_second_only = torch.autograd.grad(pair(x, mask, (image, other), (image_mask, image_mask)).sum(), other)[0]
    assert read_second_only.abs().sum() > 0  # image 2 reaches the output through the shared key/value
    pair.train()
    for p in pair.parameters():
        p.grad = None
    pair.second(x, mask, other, image_mask, shared_key_value=pair.first.crossattention).sum().backward()
    assert pair.first.crossattention.key.weight.grad.abs().sum() > 0  # the second block's read trains them


def test_native_nlvr2_head_follows_nlvr_merge_and_round_trips_a_checkpoint(tmp_path):
    from safetensors.torch import load_model, save_model

    from vlbench.errors import VlbenchError

    model = tiny_albef()
    head = model.native_head("pair_classifier", 2)
    assert all(isinstance(layer, TwinBlockLayer) for layer in head.layers)  # the default: ALBEF's design
    save_model(head, str(tmp_path / "head.safetensors"))
    again = model.native_head("pair_classifier", 2)
    assert not load_model(again, str(tmp_path / "head.safetensors"))[0]  # no missing keys
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values(), strict=True))
    model.cfg.nlvr_merge = "linear"
    assert all(isinstance(layer, TwinCrossAttentionLayer) for layer in model.native_head("pair_classifier", 2).layers)
    model.cfg.nlvr_merge = "concat"
    with pytest.raises(VlbenchError, match=r"model.nlvr_merge='concat': expected replicate"):
        model.native_head("pair_classifier", 2)


def test_text_assignment_pairs_are_balanced_and_correct():
    torch.manual_seed(0)
    batch = 6
    image_ids = torch.tensor([0, 0, 1, 2, 3, 4])  # captions 0 and 1 show the same image
    same = image_ids.view(-1, 1) == image_ids.view(1, -1)
    counts = torch.zeros(3)
    for _ in range(300):
        first, second, labels = text_assignment_pairs(torch.randn(batch, batch), same)
        counts += torch.bincount(labels, minlength=3)
        rows = torch.arange(batch)
        own_first = image_ids[first] == image_ids[rows]
        own_second = image_ids[second] == image_ids[rows]
        assert torch.equal(own_first, labels == 0) and torch.equal(own_second, labels == 1)
        assert (first != second).all()  # two different images, never the same one twice
    shares = counts / counts.sum()
    assert ((shares - 1 / 3).abs() < 0.03).all(), shares


def test_albef_two_image_head_trains_its_twin_layers_and_the_encoders():
    model = tiny_albef()
    head = model.native_head("pair_classifier", 2)
    assert head is not None and model.native_head("text_assignment", 3).__class__ is head.__class__
    first, second = make_batch(), make_batch()
    second["pixel_values"] = torch.randn_like(second["pixel_values"])
    logits = head.pair_logits(model, first, second)
    assert logits.shape == (4, 2)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1, 0, 1])).backward()
    for name, module in (("twin", head.layers), ("vit", model.online.visual_encoder),
                         ("text", model.online.text_encoder)):  # fmt: skip
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
    assert all(p.grad is None for p in model.online.fusion_encoder.parameters())  # replaced by the twin copies
    assert all(p.grad is None for p in head.ta_head.parameters())


def test_albef_assignment_logits_and_labels():
    model = tiny_albef()
    head = model.native_head("text_assignment", 3)
    batch = make_batch()
    batch["image_ids"] = torch.arange(4)
    torch.manual_seed(3)
    logits, labels = head.assignment_logits(model, batch)
    assert logits.shape == (4, 3) and labels.shape == (4,) and set(labels.tolist()) <= {0, 1, 2}
    torch.nn.functional.cross_entropy(logits, labels).backward()
    assert head.ta_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in head.cls_head.parameters())


def test_nlvr2_distils_from_the_momentum_copy_as_the_reference():
    """model_nlvr.py: loss = (1 − alpha) · CE(logits, y) − alpha · Σ log_softmax(logits) · softmax(teacher); the
    teacher is the momentum encoders + momentum two-image layers + momentum classifier, updated once per step."""
    import torch.nn.functional as F

    from vlbench.tasks.nlvr2 import DistilledLogits, NLVR2Task

    torch.manual_seed(0)
    model = tiny_albef(alpha=0.4, alpha_warmup_steps=0, alpha_warmup_epochs=0).train()
    head = model.native_head("pair_classifier", 2).train()
    first, second = make_batch(), make_batch()
    second["pixel_values"] = torch.randn_like(second["pixel_values"])
    logits = head.pair_logits(model, first, second)
    teacher, alpha = head.pair_teacher(model, first, second, step=0)
    assert alpha == 0.4
    torch.testing.assert_close(teacher, logits.detach())  # every copy starts as its online module
    assert not teacher.requires_grad and all(not p.requires_grad for p in head.layers_m.parameters())
    labels = torch.tensor([0, 1, 1, 0])
    # the loss by hand, with a teacher that disagrees
    other_teacher = torch.randn(4, 2)
    expected = (
        0.6 * F.cross_entropy(logits, labels)
        - 0.4 * (F.log_softmax(logits, dim=1) * F.softmax(other_teacher, dim=1)).sum(dim=1).mean()
    )
    task = NLVR2Task.__new__(NLVR2Task)  # loss() reads nothing from the task's data
    torch.testing.assert_close(task.loss(DistilledLogits(logits, other_teacher, 0.4), {"labels": labels}), expected)
    # after the online weights move, the teacher moves by (1 − m) of the way, and only on a step's first micro-batch
    with torch.no_grad():
        for p in head.cls_head.parameters():
            p.add_(1.0)
    before = [p.clone() for p in head.cls_head_m.parameters()]
    model.first_micro_batch = False
    head.pair_teacher(model, first, second, step=1)
    assert all(torch.equal(a, b) for a, b in zip(before, head.cls_head_m.parameters(), strict=True))
    model.first_micro_batch = True
    head.pair_teacher(model, first, second, step=1)
    m = model.cfg.momentum
    for b, p_m, p in zip(before, head.cls_head_m.parameters(), head.cls_head.parameters(), strict=True):
        torch.testing.assert_close(p_m, m * b + (1 - m) * p)
    assert head.eval().pair_teacher(model, first, second, step=1) is None  # evaluation: plain logits
    assert not hasattr(tiny_albef(distill=False).native_head("pair_classifier", 2), "layers_m")


def test_text_assignment_draws_come_from_the_shard_not_the_global_rng():
    """Negatives and labels from the model's batch shard (the step's CPU generator): the same whatever the global
    RNG or the device's generator holds."""
    from vlbench.models.global_batch import BatchShard

    similarity = torch.randn(6, 6)
    drawn = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        shard = BatchShard.of(6, training=True, generator=torch.Generator().manual_seed(3))
        drawn.append(torch.stack(text_assignment_pairs(similarity, shard=shard)))
    assert torch.equal(drawn[0], drawn[1])
    others = [  # and they are drawn: other shard seeds, other draws
        torch.stack(text_assignment_pairs(similarity, shard=BatchShard.of(6, True, torch.Generator().manual_seed(s))))
        for s in range(4, 9)
    ]
    assert any(not torch.equal(other, drawn[0]) for other in others)


@pytest.mark.parametrize("merge", ["replicate", "linear"])
def test_two_image_heads_read_the_cls_alone_when_skipping_unread_states(merge):
    """NLVR2's and text assignment's heads read the fused [CLS] only: with ``skip_unread_states`` the last two-image
    layer computes it alone — the same logits and every gradient as the full computation."""
    import copy

    base = tiny_albef(nlvr_merge=merge).eval()
    first, second = make_batch(), make_batch()
    second["pixel_values"] = torch.randn_like(second["pixel_values"])
    batch = {**make_batch(), "image_ids": torch.arange(4)}
    results = {}
    for skip in (False, True):
        model = copy.deepcopy(base)
        model.skip_unread_states = skip
        torch.manual_seed(0)  # the same initial head both ways
        head = model.native_head("pair_classifier", 2)
        torch.manual_seed(3)
        pair = head.pair_logits(model, first, second)
        assignment, _ = head.assignment_logits(model, batch)
        (pair.sum() + assignment.square().sum()).backward()
        grads = {n: p.grad for n, p in [*model.named_parameters(), *head.named_parameters()] if p.grad is not None}
        results[skip] = (pair, assignment, grads)
    for index in (0, 1):
        torch.testing.assert_close(results[True][index], results[False][index], atol=1e-5, rtol=1e-4)
    full, skipped = results[False][2], results[True][2]
    assert full.keys() == skipped.keys() and len(full) > 20
    for key in full:
        torch.testing.assert_close(skipped[key], full[key], atol=1e-5, rtol=1e-4, msg=key)
