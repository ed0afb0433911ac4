"""Reading reference checkpoints from local files: key-map helpers shared by the importers (LXMERT, ALBEF).

Nothing here downloads: every path is a user's local file.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from vlbench.errors import VlbenchError
from vlbench.safe_load import read_checkpoint

WB = ("weight", "bias")


def bert_layer_pairs(
    ref: str,
    ours: str,
    attention: str = "attention.self",
    attention_output: str = "attention.output",
    intermediate: str = "intermediate.dense",
    output: str = "output",
) -> list[tuple[str, str]]:
    """(reference key, our key) for one BERT layer (our ``TransformerLayer``) whose sub-modules the reference names
    as given (defaults: BERT's own names)."""
    pairs = attention_block_pairs(ref, ours, attention, attention_output, "attention", "attention_output")
    pairs += [(f"{ref}.{output}.{sub}.{p}", f"{ours}.output.{sub}.{p}") for sub in ("dense", "LayerNorm") for p in WB]
    pairs += [(f"{ref}.{intermediate}.{p}", f"{ours}.intermediate.{p}") for p in WB]
    return pairs


def attention_block_pairs(
    ref: str,
    ours: str,
    ref_attention: str = "crossattention.self",
    ref_output: str = "crossattention.output",
    our_attention: str = "crossattention",
    our_output: str = "crossattention_output",
) -> list[tuple[str, str]]:
    """An attention block (query/key/value, then dense + LayerNorm) → ours; defaults: the cross-attention of BERT's
    fusion layers (ALBEF); LXMERT's cross-modality layers name theirs ``visual_attention.att``/``.output``."""
    pairs = [
        (f"{ref}.{ref_attention}.{proj}.{p}", f"{ours}.{our_attention}.{proj}.{p}")
        for proj in ("query", "key", "value")
        for p in WB
    ]
    pairs += [
        (f"{ref}.{ref_output}.{sub}.{p}", f"{ours}.{our_output}.{sub}.{p}")
        for sub in ("dense", "LayerNorm")
        for p in WB
    ]
    return pairs


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a local ``.safetensors`` or torch file (also a directory holding ``model.safetensors`` or
    ``pytorch_model.bin``); a training checkpoint's ``{"model": ...}`` / ``{"state_dict": ...}`` is unwrapped.

    Reference checkpoints come from anywhere: torch files are read with ``weights_only=True`` (vlbench.safe_load), so
    a pickle that would run code is refused, and every failure is one line starting ``<what>=<path>``."""
    path = Path(path).expanduser()
    if path.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            raise VlbenchError(f"{what}={path}: a directory without model.safetensors or pytorch_model.bin")
    if not path.is_file():
        raise VlbenchError(f"{what}={path}: no such file")
    state = read_checkpoint(path, f"{what}={path}")  # torch files as data only: a pickle with code is refused
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VlbenchError(f"{what}={path}: expected a state dict (name → tensor)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def resample_vit_pos_embeds(
    state_dict: dict[str, torch.Tensor], ours: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``state_dict`` with every ``visual_encoder.pos_embed`` resampled to the grid of the same key in ``ours`` (a
    model's own state dict): the ``adapt_checkpoint`` of ViT models fine-tuned at another image size."""
    return {
        k: resample_pos_embed(v, ours[k].shape[1]) if k.endswith("visual_encoder.pos_embed") and k in ours else v
        for k, v in state_dict.items()
    }


def resample_pos_embed(pos_embed: torch.Tensor, target_tokens: int, prefix_tokens: int = 1) -> torch.Tensor:
    """A ViT's (1, prefix + H·W, D) position embeddings bicubically resampled to another square grid (fine-tuning at
    a higher resolution than pre-training, as ALBEF's 256 → 384 px); unchanged when the grid already fits."""
    from timm.layers import resample_abs_pos_embed

    if pos_embed.shape[1] == target_tokens:
        return pos_embed
    old_side = math.isqrt(pos_embed.shape[1] - prefix_tokens)
    new_side = math.isqrt(target_tokens - prefix_tokens)
    if old_side**2 + prefix_tokens != pos_embed.shape[1] or new_side**2 + prefix_tokens != target_tokens:
        raise VlbenchError(f"position embeddings of {pos_embed.shape[1]} tokens: not a square grid plus [CLS]")
    return resample_abs_pos_embed(
        pos_embed, new_size=[new_side, new_side], old_size=[old_side, old_side], num_prefix_tokens=prefix_tokens
    )
