"""Our BERT layer and text encoder equal transformers' BERT number for number; masks and the ViT behave."""

import pytest
import torch
from transformers import BertConfig, BertModel

from vlbench.models.base import TextSizes
from vlbench.models.layers import (
    TextEncoder,
    TransformerLayer,
    build_vit,
    checkpoint_transformer_blocks,
    transformer_block_types,
)

SIZES = TextSizes(hidden_size=32, num_heads=4, intermediate_size=64, dropout=0.0, max_position_embeddings=20)


def bert_to_ours(key: str) -> str:
    """transformers BertModel key → our TextEncoder key (the same tensors, flatter names)."""
    return (
        key.replace("attention.self.", "attention.")
        .replace("attention.output.", "attention_output.")
        .replace("intermediate.dense.", "intermediate.")
    )


@pytest.fixture
def bert_and_ours():
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=20,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        attn_implementation="eager",
    )
    bert = BertModel(config, add_pooling_layer=False).eval()
    ours = TextEncoder(50, SIZES, num_layers=2).eval()
    state = {bert_to_ours(k): v for k, v in bert.state_dict().items() if "position_ids" not in k}
    missing, unexpected = ours.load_state_dict(state, strict=True)
    assert not missing and not unexpected
    return bert, ours


def test_text_encoder_matches_transformers_bert(bert_and_ours):
    bert, ours = bert_and_ours
    ids = torch.randint(0, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        expected = bert(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = ours(ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(actual[valid], expected[valid], atol=1e-5, rtol=1e-4)


def test_padding_does_not_change_real_tokens():
    torch.manual_seed(0)
    layer = TransformerLayer(SIZES).eval()
    x = torch.randn(1, 5, 32)
    padded = torch.cat([x, torch.randn(1, 3, 32)], dim=1)
    mask = torch.tensor([[1] * 5 + [0] * 3])
    with torch.no_grad():
        torch.testing.assert_close(layer(padded, mask)[:, :5], layer(x, torch.ones(1, 5)), atol=1e-5, rtol=1e-4)


def test_cross_attention_reads_the_context_and_respects_its_mask():
    torch.manual_seed(0)
    layer = TransformerLayer(SIZES, cross_attention_size=16).eval()
    x, ctx = torch.randn(2, 4, 32), torch.randn(2, 6, 16)
    ctx_mask = torch.tensor([[1, 1, 1, 0, 0, 0]] * 2)
    with torch.no_grad():
        out = layer(x, None, ctx, ctx_mask)
        changed_masked = ctx.clone()
        changed_masked[:, 3:] += 5.0
        torch.testing.assert_close(layer(x, None, changed_masked, ctx_mask), out)
        changed_visible = ctx.clone()
        changed_visible[:, 0] += 5.0
        assert not torch.allclose(layer(x, None, changed_visible, ctx_mask), out)
    with pytest.raises(ValueError, match="context"):
        layer(x)


def test_vit_returns_cls_plus_patch_tokens():
    vit = build_vit(32, 8, 32, depth=1, num_heads=2)
    tokens = vit.forward_features(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 1 + 16, 32)
    with pytest.raises(ValueError, match="multiple"):
        build_vit(30, 8, 32, depth=1, num_heads=2)


def _albef_with_dropout():
    from tests.models.test_albef import make_batch, tiny_albef

    text = {"hidden_size": 32, "num_heads": 2, "intermediate_size": 64, "dropout": 0.1, "max_position_embeddings": 16}
    return tiny_albef(text=text), make_batch()


def _lxmert_with_dropout():
    from tests.models.test_lxmert import make_batch, tiny_lxmert

    return tiny_lxmert(text={"dropout": 0.1}), make_batch()


# ALBEF's blocks: ViT, text and fusion block, each with its momentum copy; LXMERT's: 2 + 1 + 2 × 2 BERT layers
@pytest.mark.parametrize(
    ("build", "blocks"), [(_albef_with_dropout, 6), (_lxmert_with_dropout, 7)], ids=["albef", "lxmert"]
)
def test_activation_checkpointing_changes_no_number_and_recomputes_every_block(build, blocks):
    """One pre-training step (dropout on, the same seed) with and without: the same loss and gradients, and every
    block that ran with gradients runs again in backward (its first sub-module's forward hook fires twice)."""
    plain, batch = build()
    checkpointed, _ = build()
    assert checkpoint_transformer_blocks(checkpointed) == blocks
    assert checkpointed.state_dict().keys() == plain.state_dict().keys()

    def step(model) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[int], list[int]]:
        in_backward, forward_calls, backward_calls = [False], {}, {}

        def count(module, args, output):
            calls = backward_calls if in_backward[0] else forward_calls
            if in_backward[0] or torch.is_grad_enabled():
                calls[module] = calls.get(module, 0) + 1

        firsts = [next(m.children()) for m in model.modules() if isinstance(m, transformer_block_types())]
        hooks = [first.register_forward_hook(count) for first in firsts]
        model.train()
        torch.manual_seed(7)
        loss = sum(model.pretrain_losses(batch, step=0).values())
        in_backward[0] = True
        loss.backward()
        for hook in hooks:
            hook.remove()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        forwards, recomputed = ([calls.get(f, 0) for f in firsts] for calls in (forward_calls, backward_calls))
        return loss.detach(), grads, forwards, recomputed

    plain_loss, plain_grads, plain_forwards, plain_recomputed = step(plain)
    loss, grads, forwards, recomputed = step(checkpointed)
    torch.testing.assert_close(loss, plain_loss, atol=1e-6, rtol=0)
    assert grads.keys() == plain_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], atol=1e-6, rtol=0, msg=name)
    assert forwards == plain_forwards and sum(forwards) > 0
    assert not any(plain_recomputed)  # without checkpointing nothing runs in backward
    assert recomputed == forwards  # with it, each forward with gradients once more


def test_activation_checkpointing_is_off_in_evaluation_and_without_gradients():
    torch.manual_seed(0)
    layer = TransformerLayer(SIZES)
    assert checkpoint_transformer_blocks(layer) == 1
    calls = []
    layer.attention.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 5, 32, requires_grad=True)
    with torch.no_grad():
        layer(x)
    layer.eval()
    layer(x).sum().backward()
    assert len(calls) == 2  # no recomputation in either
    layer.train()
    layer(x).sum().backward()
    assert len(calls) == 4
