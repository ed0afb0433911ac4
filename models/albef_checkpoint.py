"""ALBEF weights from local files: the official release's key layout, BERT (transformers) and timm ViT checkpoints.

The official checkpoint (salesforce/ALBEF ``ALBEF.pth``, ``{"model": state_dict}``) names modules as its code does;
the map below turns them into ours. Documented key map (``{i}``: layer index, ``T`` = ``model.text_layers``):

- ``visual_encoder.*`` (timm ViT names) → ``online.visual_encoder.*``
- ``text_encoder.bert.embeddings.*`` → ``online.text_encoder.embeddings.*``
- ``text_encoder.bert.encoder.layer.{i}.*``: i < T → ``online.text_encoder.encoder.layer.{i}.*``;
  i ≥ T → ``online.fusion_encoder.layer.{i-T}.*``; inside a layer ``attention.self.{query,key,value}`` →
  ``attention.*``, ``attention.output.*`` → ``attention_output.*``, ``crossattention.self.*`` →
  ``crossattention.*``, ``crossattention.output.*`` → ``crossattention_output.*``, ``intermediate.dense`` →
  ``intermediate``, ``output.*`` → ``output.*``
- ``text_encoder.cls.predictions.transform.*`` → ``online.mlm_head.*``; ``….predictions.bias`` / ``.decoder.weight``
  → ``online.mlm_head.decoder.bias`` / ``.weight`` (tied to the word embeddings)
- ``vision_proj``, ``text_proj`` → ``online.vision_proj``, ``online.text_proj``
- ``visual_encoder_m``, ``text_encoder_m``, ``vision_proj_m``, ``text_proj_m`` → the same under ``momentum_model.``
- ``itm_head``, ``temp``, ``image_queue``, ``text_queue``, ``queue_ptr`` → the same; ``idx_queue`` → ``id_queue``

Position embeddings are resampled to our image size (pre-training 256 px → fine-tuning 384 px). A BERT checkpoint
(``model.bert_init``) fills the text encoder with BERT's first T layers and the fusion layers' self-attention and
feed-forward with the next ones (their cross-attention stays initialised), as ALBEF starts from BERT-base; a timm ViT
checkpoint (``model.vit_init``, e.g. DeiT) fills the image encoder. The momentum towers start as copies of the online
ones unless the checkpoint has its own.
"""

from __future__ import annotations

import torch
from torch import nn

from vlbench.errors import VlbenchError
from vlbench.models.checkpoints import (
    WB,
    attention_block_pairs,
    bert_layer_pairs,
    read_state_dict,
    resample_pos_embed,
)

_EMBEDDINGS = (
    "word_embeddings.weight",
    "position_embeddings.weight",
    "token_type_embeddings.weight",
    "LayerNorm.weight",
    "LayerNorm.bias",
)
IGNORED = ("position_ids",)  # buffers of transformers' embeddings, not weights


def _text_pairs(ref: str, ours: str, text_layers: int, fusion_layers: int) -> list[tuple[str, str]]:
    """A BertForMaskedLM with fusion layers (ALBEF's ``text_encoder``) → our text encoder, fusion encoder, MLM head."""
    pairs = [(f"{ref}.bert.embeddings.{n}", f"{ours}.text_encoder.embeddings.{n}") for n in _EMBEDDINGS]
    for i in range(text_layers):
        pairs += bert_layer_pairs(f"{ref}.bert.encoder.layer.{i}", f"{ours}.text_encoder.encoder.layer.{i}")
    for j in range(fusion_layers):
        layer_ref, layer_ours = f"{ref}.bert.encoder.layer.{text_layers + j}", f"{ours}.fusion_encoder.layer.{j}"
        pairs += bert_layer_pairs(layer_ref, layer_ours) + attention_block_pairs(layer_ref, layer_ours)
    pairs += [
        (f"{ref}.cls.predictions.transform.{s}.{p}", f"{ours}.mlm_head.{s}.{p}")
        for s in ("dense", "LayerNorm")
        for p in WB
    ]
    pairs += [
        (f"{ref}.cls.predictions.bias", f"{ours}.mlm_head.decoder.bias"),
        (f"{ref}.cls.predictions.decoder.weight", f"{ours}.mlm_head.decoder.weight"),
    ]
    return pairs


def albef_key_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """Every (official key, our key) for this model's sizes."""
    cfg = model.cfg
    pairs = []
    for suffix, ours in (("", "online"), ("_m", "momentum_model")):
        vit = getattr(model, ours).visual_encoder.state_dict()
        pairs += [(f"visual_encoder{suffix}.{k}", f"{ours}.visual_encoder.{k}") for k in vit]
        pairs += _text_pairs(f"text_encoder{suffix}", ours, cfg.text_layers, cfg.fusion_layers)
        pairs += [(f"{proj}{suffix}.{p}", f"{ours}.{proj}.{p}") for proj in ("vision_proj", "text_proj") for p in WB]
    pairs += [(f"itm_head.{p}", f"itm_head.{p}") for p in WB]
    pairs += [(k, k) for k in ("temp", "image_queue", "text_queue", "queue_ptr")] + [("idx_queue", "id_queue")]
    return pairs


def to_official_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Our ALBEF's weights in the official layout (for exporting, and for the importer's round-trip test)."""
    ours = model.state_dict()
    return {ref: ours[key].clone() for ref, key in albef_key_pairs(model) if key in ours}


def _assign(model: nn.Module, converted: dict[str, torch.Tensor], what: str) -> None:
    """Copy converted tensors in, resampling ViT position embeddings; shapes must fit."""
    ours = model.state_dict()
    wrong = []
    with torch.no_grad():
        for key, value in converted.items():
            if key.endswith("visual_encoder.pos_embed"):
                value = resample_pos_embed(value, ours[key].shape[1])
            if key.endswith("_queue") and value.shape != ours[key].shape:
                continue  # a queue of another size (model.queue_size): ours starts fresh
            if value.shape != ours[key].shape:
                wrong.append(f"{key} {tuple(value.shape)} vs {tuple(ours[key].shape)}")
                continue
            ours[key].copy_(value)
    if wrong:
        raise VlbenchError(f"{what}: shapes differ from this model's (check model sizes): {', '.join(wrong[:8])}")


def load_official_checkpoint(model: nn.Module, path: str) -> None:
    """The official ALBEF checkpoint into ``model``: every online tower tensor must be there; the momentum towers,
    ITM head and queues are loaded when present (momentum copies the online towers otherwise)."""
    what = "model.init_checkpoint"
    state = read_state_dict(path, what)
    mapping = dict(albef_key_pairs(model))
    unknown = sorted(k for k in state if k not in mapping and not k.endswith(IGNORED))
    if unknown:
        raise VlbenchError(f"{what}={path}: {len(unknown)} keys with no place in ALBEF: {', '.join(unknown[:10])}")
    required = [ref for ref, ours in mapping.items() if ours.startswith("online.") and "decoder.weight" not in ours]
    missing = [ref for ref in required if ref not in state]
    if missing:
        raise VlbenchError(
            f"{what}={path}: {len(missing)} tensors missing (check model.text_layers/fusion_layers/vit_depth): "
            + ", ".join(missing[:10])
        )
    _assign(model, {mapping[k]: v for k, v in state.items() if k in mapping}, f"{what}={path}")
    if not any(k.startswith(("visual_encoder_m.", "text_encoder_m.")) for k in state):
        model.momentum_model.load_state_dict(model.online.state_dict())


def load_bert_weights(model: nn.Module, path: str) -> int:
    """A transformers BERT checkpoint (``BertModel``/``BertForMaskedLM``, a file or a saved directory) into the
    online text side; returns how many tensors were used. Layers beyond text + fusion are not used."""
    what = "model.bert_init"
    state = read_state_dict(path, what)
    state = {k if k.startswith(("bert.", "cls.")) else f"bert.{k}": v for k, v in state.items()}
    cfg = model.cfg
    layers = cfg.text_layers + cfg.fusion_layers
    found = {int(k.split(".")[3]) for k in state if k.startswith("bert.encoder.layer.")}
    if len(found) < layers:
        raise VlbenchError(f"{what}={path}: has {len(found)} layers; model.text_layers + fusion_layers need {layers}")
    mapping = {
        ref.removeprefix("text_encoder."): ours
        for ref, ours in _text_pairs("text_encoder", "online", cfg.text_layers, cfg.fusion_layers)
    }
    mapping = {ref: ours for ref, ours in mapping.items() if ".crossattention" not in ref}
    missing = [ref for ref, ours in mapping.items() if ref not in state and not ref.startswith("cls.")]
    if missing:
        raise VlbenchError(f"{what}={path}: {len(missing)} BERT tensors missing: {', '.join(missing[:10])}")
    _assign(model, {ours: state[ref] for ref, ours in mapping.items() if ref in state}, f"{what}={path}")
    return sum(1 for ref in mapping if ref in state)


def load_vit_weights(model: nn.Module, path: str) -> int:
    """A timm ViT checkpoint (e.g. DeiT-B/16) into the online image encoder; its classifier head is not used."""
    what = "model.vit_init"
    state = read_state_dict(path, what)
    ours = model.online.visual_encoder.state_dict()
    unused_ok = ("head.", "fc_norm.", "head_dist.")
    unknown = sorted(k for k in state if k not in ours and not k.startswith(unused_ok))
    missing = sorted(k for k in ours if k not in state)
    if unknown or missing:
        raise VlbenchError(
            f"{what}={path}: not a ViT of this shape (missing {missing[:6]}, unexpected {unknown[:6]}; "
            "check model.vit_depth/vit_hidden_size/vit_patch_size)"
        )
    _assign(model, {f"online.visual_encoder.{k}": v for k, v in state.items() if k in ours}, f"{what}={path}")
    return len(ours)
