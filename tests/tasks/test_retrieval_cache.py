"""Retrieval's ITM scoring from cached unimodal tokens equals scoring each pair from raw inputs."""

import copy

import pytest
import torch

from tests.models.test_albef import make_batch, tiny_albef
from vlbench.tasks.base import EvalContext
from vlbench.tasks.retrieval import cache_unimodal_tokens, score_retrieval


def test_cached_itm_scores_equal_per_pair_encoding():
    model = tiny_albef().eval()
    texts = make_batch(batch_size=7)
    visual = {"pixel_values": torch.randn(5, 3, 32, 32)}
    text = {"input_ids": texts["input_ids"], "attention_mask": texts["attention_mask"]}
    ctx = EvalContext(device=torch.device("cpu"), batch_size=4)
    direct, _ = score_retrieval(model, model.match_scores, dict(visual), dict(text), ctx, "itm", 0, 5)
    itc, _ = score_retrieval(model, model.match_scores, dict(visual), dict(text), ctx, "itc", 0, 5)
    assert cache_unimodal_tokens(model, visual, text, ctx)
    assert visual["image_tokens"].shape[0] == 5 and text["text_tokens"].shape[:2] == (7, 8)
    cached, _ = score_retrieval(model, model.match_scores_from_tokens, visual, text, ctx, "itm", 0, 5)
    assert direct.shape == (5, 7) and torch.allclose(direct, cached, atol=1e-5)
    # ITC top-k then ITM rerank from the cache: k = all pairs gives every pair's ITM score
    reranked, _ = score_retrieval(model, model.match_scores_from_tokens, visual, text, ctx, "itc_itm", 7, 5)
    assert torch.allclose(reranked, cached, atol=1e-5)
    # k = 2: each image keeps its 2 best texts by ITC (i2t), each text its 2 best images (t2i), scored by ITM
    i2t, t2i = score_retrieval(model, model.match_scores_from_tokens, visual, text, ctx, "itc_itm", 2, 5)
    kept_i2t = torch.zeros(5, 7, dtype=torch.bool).scatter_(1, itc.topk(2, dim=1).indices, True)
    kept_t2i = torch.zeros(7, 5, dtype=torch.bool).scatter_(1, itc.T.topk(2, dim=1).indices, True).T
    assert torch.equal(i2t.isfinite(), kept_i2t) and torch.equal(t2i.isfinite(), kept_t2i)
    assert torch.allclose(i2t[kept_i2t], cached[kept_i2t], atol=1e-5)
    assert torch.allclose(t2i[kept_t2i], cached[kept_t2i], atol=1e-5)


def test_models_without_unimodal_tokens_are_not_cached():
    from tests.models.test_unimo3 import tiny_unimo3

    model = tiny_unimo3(retrieval_cache=False).eval()
    visual = {"pixel_values": torch.randn(2, 3, 32, 32)}
    ctx = EvalContext(device=torch.device("cpu"), batch_size=4)
    assert not cache_unimodal_tokens(model, visual, {"input_ids": torch.ones(2, 3, dtype=torch.long)}, ctx)
    assert "pixel_values" in visual and set(visual) == {"pixel_values"}


def _model_and_batch(name: str):
    if name == "albef":
        return tiny_albef().eval(), make_batch(batch_size=4)
    if name == "lxmert":
        from tests.models.test_lxmert import make_batch as lxmert_batch
        from tests.models.test_lxmert import tiny_lxmert

        return tiny_lxmert().eval(), lxmert_batch(batch_size=4)
    if name == "pixelbert":
        from tests.models.test_pixelbert import make_batch as pixelbert_batch
        from tests.models.test_pixelbert import tiny_pixelbert

        return tiny_pixelbert().eval(), pixelbert_batch(batch_size=4)
    from tests.models.test_unimo3 import make_batch as unimo3_batch
    from tests.models.test_unimo3 import tiny_unimo3

    return tiny_unimo3().eval(), unimo3_batch(batch_size=4)


@pytest.mark.parametrize("name", ["albef", "lxmert", "pixelbert", "unimo3"])
@torch.no_grad()
def test_every_model_encodes_pairs_from_cached_tokens_as_from_raw_inputs(name):
    """The shared retrieval head scores pairs from ``encode_from_tokens`` over per-image and per-caption caches: it must
    be ``encode`` of the raw pairs (pooled output and tokens), for mismatched pairs too."""
    model, batch = _model_and_batch(name)
    text_keys = ("input_ids", "attention_mask")
    images = {k: v for k, v in batch.items() if k not in text_keys}
    texts = {k: batch[k] for k in text_keys}
    image_tokens, text_tokens = model.unimodal_tokens(images), model.unimodal_tokens(texts)
    assert image_tokens and text_tokens.keys().isdisjoint(image_tokens)
    image_index, text_index = torch.tensor([0, 1, 2, 3, 3, 0]), torch.tensor([0, 1, 2, 3, 0, 2])
    raw = {**{k: v[image_index] for k, v in images.items()}, **{k: v[text_index] for k, v in texts.items()}}
    cached = {  # without the raw inputs the tokens replace: encode_from_tokens must not read them
        **{k: v for k, v in raw.items() if k not in model.inputs_replaced_by_tokens},
        **{k: v[image_index] for k, v in image_tokens.items()},
        **{k: v[text_index] for k, v in text_tokens.items()},
    }
    direct, from_cache = model.encode(raw), model.encode_from_tokens(cached)
    torch.testing.assert_close(from_cache.pooled, direct.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_cache.tokens, direct.tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model.match_scores_from_tokens(cached), model.match_scores(raw), atol=1e-5, rtol=1e-5)


def _matching_loss_and_grads(model, batch, cached: bool, seed: int = 3):
    from vlbench.tasks.retrieval import SharedMatchHead, shared_matching_loss

    torch.manual_seed(0)
    head = SharedMatchHead(model.hidden_size, dropout=0.0)
    model.zero_grad()
    if cached:

        def encode(pairs):
            raise AssertionError("the cached path encodes no pair from its raw inputs")

        model.encode = encode
    else:
        model.unimodal_tokens = lambda inputs: None  # the per-pair path: every pair encoded from its raw inputs
    torch.manual_seed(seed)  # the same negatives both ways
    loss = shared_matching_loss(model, head, batch)["itm"]
    loss.backward()
    model.__dict__.pop("unimodal_tokens", None)
    model.__dict__.pop("encode", None)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("name", ["albef", "lxmert", "unimo3"])
def test_shared_matching_loss_from_cached_tokens_equals_encoding_every_pair(name):
    """Retrieval fine-tuning with the shared head encodes each image and caption of the batch once and fuses its
    positive and negative pairs: the same loss and gradients as encoding all 3 × B pairs (tiny presets: no dropout,
    no BatchNorm), so it is a speed-up, not another objective."""
    model, batch = _model_and_batch(name)
    model.train()
    batch = {**batch, "image_ids": torch.arange(4), "group_ids": torch.arange(4)}
    loss, grads = _matching_loss_and_grads(model, batch, cached=True)
    direct_loss, direct_grads = _matching_loss_and_grads(model, batch, cached=False)
    torch.testing.assert_close(loss, direct_loss, atol=1e-6, rtol=1e-5)
    assert grads.keys() == direct_grads.keys() and len(grads) > 10
    for key in grads:
        torch.testing.assert_close(grads[key], direct_grads[key], atol=1e-6, rtol=1e-4, msg=key)


def test_pixelbert_matching_runs_its_cnn_once_per_image_of_the_batch():
    """Pixel-BERT's CNN (BatchNorm in training) sees the batch's images once, not each image as often as it was drawn
    into pairs: its running statistics move as after one forward pass over the batch; in evaluation mode (fixed
    statistics) the loss and gradients equal those of encoding every pair."""
    from tests.models.test_pixelbert import make_batch as pixelbert_batch
    from tests.models.test_pixelbert import tiny_pixelbert

    model, batch = tiny_pixelbert(), pixelbert_batch(batch_size=4)
    batch = {**batch, "group_ids": torch.arange(4)}
    expected = copy.deepcopy(model).train()
    expected.pixel_tokens(batch["pixel_values"], sample=False)
    model.train()
    _matching_loss_and_grads(model, batch, cached=True)
    running = {k: v for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}
    assert running
    for key, value in running.items():
        torch.testing.assert_close(value, expected.state_dict()[key], msg=key)
    model.eval()
    loss, grads = _matching_loss_and_grads(model, batch, cached=True)
    direct_loss, direct_grads = _matching_loss_and_grads(model, batch, cached=False)
    torch.testing.assert_close(loss, direct_loss, atol=1e-6, rtol=1e-5)
    for key in grads:
        torch.testing.assert_close(grads[key], direct_grads[key], atol=1e-6, rtol=1e-4, msg=key)
