"""ALBEF initial weights from local files: the official key map round trip, BERT and timm ViT parity, position
embedding resampling, and the errors."""

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from tests.models.test_albef import CTX, make_batch, tiny_albef
from vlbench.errors import VlbenchError
from vlbench.models.albef import ALBEF
from vlbench.models.albef_checkpoint import to_official_state_dict
from vlbench.models.checkpoints import resample_pos_embed


def _save_official(model, path):
    torch.save({"model": to_official_state_dict(model), "epoch": 29}, path)  # the release wraps it in "model"
    return path


def _with(model, **overrides):
    cfg = OmegaConf.merge(model.cfg, overrides)
    return ALBEF(cfg, model.ctx)


def test_official_checkpoint_round_trip_restores_every_tensor(tmp_path):
    source = tiny_albef()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # differ from any fresh init
        source.queue_ptr.fill_(5)
    path = _save_official(source, tmp_path / "ALBEF.pth")
    official = to_official_state_dict(source)
    assert "text_encoder.bert.encoder.layer.1.crossattention.self.query.weight" in official  # fusion layer 0
    assert "visual_encoder_m.blocks.0.attn.qkv.weight" in official and "idx_queue" in official
    loaded = _with(tiny_albef(), init_checkpoint=str(path))
    ours, theirs = source.state_dict(), loaded.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), [k for k in ours if not torch.equal(ours[k], theirs[k])]


def test_official_checkpoint_at_another_resolution_is_resampled(tmp_path):
    source = tiny_albef()  # 32 px, patch 8: 4×4 grid
    path = _save_official(source, tmp_path / "ALBEF.pth")
    bigger = ALBEF(source.cfg, dataclasses.replace(CTX, image_size=48))  # 6×6 grid
    loaded = _with(bigger, init_checkpoint=str(path))
    assert loaded.online.visual_encoder.pos_embed.shape == (1, 37, 32)
    # the checkpoint's grid, resampled (not a fresh initialisation), and the other weights as saved
    expected = resample_pos_embed(source.online.visual_encoder.pos_embed.detach(), 37)
    assert torch.allclose(loaded.online.visual_encoder.pos_embed, expected, atol=1e-6)
    theirs, ours = source.state_dict(), loaded.state_dict()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs if not k.endswith("pos_embed"))
    batch = make_batch()
    batch["pixel_values"] = torch.randn(4, 3, 48, 48)
    assert loaded.encode(batch).pooled.shape == (4, 32)


def test_position_embedding_resampling_keeps_the_original_size_exact():
    pos = torch.randn(1, 17, 8)
    assert torch.equal(resample_pos_embed(pos, 17), pos)
    up = resample_pos_embed(pos, 37)
    assert up.shape == (1, 37, 8) and torch.equal(up[:, :1], pos[:, :1])  # [CLS] untouched
    # a model evaluated at its own size after loading its own weights computes the same outputs
    model = tiny_albef().eval()
    same = tiny_albef().eval()
    same.load_state_dict(model.adapt_checkpoint(model.state_dict()))
    batch = make_batch()
    assert torch.equal(model.encode(batch).pooled, same.encode(batch).pooled)
    with pytest.raises(VlbenchError, match="square grid"):
        resample_pos_embed(torch.randn(1, 18, 8), 37)


def test_official_checkpoint_errors_name_the_keys(tmp_path):
    state = to_official_state_dict(tiny_albef())
    del state["text_encoder.bert.encoder.layer.0.output.dense.weight"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(VlbenchError, match="1 tensors missing.*layer.0.output.dense.weight"):
        _with(tiny_albef(), init_checkpoint=str(tmp_path / "partial.pth"))
    state = to_official_state_dict(tiny_albef())
    state["text_encoder.bert.encoder.layer.7.output.dense.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "deeper.pth")
    with pytest.raises(VlbenchError, match="no place in ALBEF.*layer.7"):
        _with(tiny_albef(), init_checkpoint=str(tmp_path / "deeper.pth"))
    with pytest.raises(VlbenchError, match="no such file"):
        _with(tiny_albef(), init_checkpoint=str(tmp_path / "nowhere.pth"))


def test_bert_weights_give_bert_outputs(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)  # fmt: skip
    torch.manual_seed(5)
    bert = BertForMaskedLM(config).eval()
    bert.save_pretrained(tmp_path / "bert")  # a user's local copy: a directory with model.safetensors
    model = _with(tiny_albef(), bert_init=str(tmp_path / "bert")).eval()
    batch = make_batch()
    expected = bert.bert(batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
    ours = model.online.text_encoder(batch["input_ids"], batch["attention_mask"])  # text_layers = 1
    real = batch["attention_mask"].bool()
    assert torch.allclose(ours[real], expected.hidden_states[1][real], atol=1e-5)
    fusion_query = model.online.fusion_encoder.layer[0].attention.query.weight
    assert torch.equal(fusion_query, bert.bert.encoder.layer[1].attention.self.query.weight)
    assert torch.equal(model.online.mlm_head.dense.weight, bert.cls.predictions.transform.dense.weight)
    assert torch.equal(model.momentum_model.text_encoder.embeddings.word_embeddings.weight,
                       model.online.text_encoder.embeddings.word_embeddings.weight)  # fmt: skip
    with pytest.raises(VlbenchError, match="has 3 layers; model.text_layers \\+ fusion_layers need 4"):
        _with(tiny_albef(), bert_init=str(tmp_path / "bert"), text_layers=2, fusion_layers=2)


def test_timm_vit_weights_give_timm_outputs(tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(6)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=10).eval()
    torch.save(vit.state_dict(), tmp_path / "deit.pth")  # with its classifier head, which is not used
    model = _with(tiny_albef(), vit_init=str(tmp_path / "deit.pth")).eval()
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.allclose(model.online.visual_encoder.forward_features(pixels), vit.forward_features(pixels), atol=1e-6)
    deeper = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    torch.save(deeper.state_dict(), tmp_path / "deeper.pth")
    with pytest.raises(VlbenchError, match="not a ViT of this shape"):
        _with(tiny_albef(), vit_init=str(tmp_path / "deeper.pth"))
