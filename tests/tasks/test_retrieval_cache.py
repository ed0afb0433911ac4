"""Retrieval's ITM scoring from cached unimodal tokens equals scoring each pair from raw inputs."""

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
    from tests.models.test_lxmert import tiny_lxmert

    model = tiny_lxmert().eval()
    visual = {"region_features": torch.randn(2, 3, 147), "region_boxes": torch.rand(2, 3, 4)}
    ctx = EvalContext(device=torch.device("cpu"), batch_size=4)
    assert not cache_unimodal_tokens(model, visual, {"input_ids": torch.ones(2, 3, dtype=torch.long)}, ctx)
