"""Tokenizers: the dataset's own ``tokenizer.json`` (synthetic world) or a BERT tokenizer from a local path/hub name."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

from vlbench.errors import VlbenchError


def load_tokenizer(spec: str, data_root: Path) -> PreTrainedTokenizerFast:
    """``auto``: ``<data_root>/tokenizer.json``. Otherwise a local directory or hub name, read from local files only
    (set HF_HUB_OFFLINE=0 and download it yourself beforehand: vlbench never downloads at run time)."""
    if spec == "auto":
        path = data_root / "tokenizer.json"
        if not path.exists():
            raise VlbenchError(f"{path}: no tokenizer.json in the data root; set data.tokenizer=<path or name>")
        try:
            return PreTrainedTokenizerFast(
                tokenizer_file=str(path),
                pad_token="[PAD]",
                unk_token="[UNK]",
                cls_token="[CLS]",
                sep_token="[SEP]",
                mask_token="[MASK]",
            )
        except Exception as e:  # the Rust parser raises a bare Exception ("... at line 2 column 0")
            reason = " ".join(str(e).split())
            raise VlbenchError(f"{path}: not a readable tokenizer file ({reason}; expected HF tokenizers' JSON)") from e
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(spec, local_files_only=True, use_fast=True)
    except (OSError, ValueError) as e:
        raise VlbenchError(
            f"data.tokenizer={spec!r}: not found locally (expected a tokenizer directory or a cached "
            "hub name; nothing is downloaded at run time)"
        ) from e
