"""Our BERT layer and text encoder equal transformers' BERT number for number; masks and the ViT behave."""

import pytest
import torch
from transformers import BertConfig, BertModel

from vlbench.models.base import TextSizes
from vlbench.models.layers import TextEncoder, TransformerLayer, build_vit

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
