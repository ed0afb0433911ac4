"""The synthetic world: one deterministic scene generator, written on demand in each dataset format.

Why a synthetic world: a new user (and CI) must be able to run the product's main job with no download. Layout:
``<cache>/synthetic/world-<hash>/<format>/`` for format in ``vqav2``, ``gqa``, ``nlvr2``, ``karpathy``; a format's
folder is generated on first use (and only it: a VQA run never pays for NLVR2's images). Each folder is
self-contained (its own rendered images and official-format files) and holds the same ``tokenizer.json``: one
word-level vocabulary over every word any format can emit, so a checkpoint pre-trained on captions transfers to VQA.

Each format draws from its own ``random.Random`` stream (VQA: ``Random(seed)``, the others
``Random(f"{seed}:<format>")``), so adding or changing one format never changes another's files. Images are PNGs
written by PIL, JSON is written with a fixed key order: the same parameters give byte-identical files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vlbench.data import synthetic_captions, synthetic_gqa, synthetic_nlvr2, synthetic_vqa
from vlbench.data.synthetic_scenes import SyntheticConfig, dump_json
from vlbench.data.synthetic_vqa import SPLIT_SUBTYPES
from vlbench.errors import VlbenchError

__all__ = [
    "FORMATS",
    "GENERATOR_VERSION",
    "SPLIT_SUBTYPES",
    "SyntheticConfig",
    "default_cache_root",
    "ensure_world",
    "world_fingerprint",
    "world_vocabulary",
    "write_world",
]

GENERATOR_VERSION = 2  # 2: one folder per format, generated lazily (1: VQA v2 files at the world's root)


@dataclass(frozen=True)
class FormatWriter:
    write: Callable[[SyntheticConfig, Path], None]  # writes the format's images and files into a folder
    version: int  # the format's own content version (bump it when that format's files change)
    vocabulary: Callable[[], set[str]]  # every word the format's texts can use
    sizes: str  # the SyntheticConfig field holding its split sizes


FORMATS: dict[str, FormatWriter] = {
    "vqav2": FormatWriter(synthetic_vqa.write_vqav2, synthetic_vqa.FORMAT_VERSION, synthetic_vqa.vocabulary, "images"),
    "gqa": FormatWriter(synthetic_gqa.write_gqa, synthetic_gqa.FORMAT_VERSION, synthetic_gqa.vocabulary, "gqa_images"),
    "nlvr2": FormatWriter(
        synthetic_nlvr2.write_nlvr2, synthetic_nlvr2.FORMAT_VERSION, synthetic_nlvr2.vocabulary, "nlvr2_sentences"
    ),
    "karpathy": FormatWriter(
        synthetic_captions.write_karpathy,
        synthetic_captions.FORMAT_VERSION,
        synthetic_captions.vocabulary,
        "karpathy_images",
    ),
}


def world_fingerprint(cfg: SyntheticConfig) -> str:
    """Hash of the parameters and every generator version: names the world's cache directory."""
    versions = {name: writer.version for name, writer in FORMATS.items()}
    payload = json.dumps(
        {"version": GENERATOR_VERSION, "format_versions": versions, **dataclasses.asdict(cfg)}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def world_vocabulary() -> list[str]:
    """Every word any format's questions, answers, statements and captions can use (the union, so one tokenizer
    serves every format)."""
    words: set[str] = set()
    for writer in FORMATS.values():
        words |= writer.vocabulary()
    return sorted(words)


def write_tokenizer(out_dir: Path) -> None:
    """A word-level tokenizer with BERT's normaliser and special tokens, built from the world's closed vocabulary."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {tok: i for i, tok in enumerate(specials + world_vocabulary())}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.save(str(out_dir / "tokenizer.json"))


def _writer(data_format: str) -> FormatWriter:
    if data_format not in FORMATS:
        raise VlbenchError(f"synthetic world: no format {data_format!r} (it has {', '.join(FORMATS)})")
    return FORMATS[data_format]


def write_world(cfg: SyntheticConfig, data_format: str, out_dir: Path) -> None:
    """Write one format's folder: its images and files, the shared tokenizer, then ``world.json`` (last: marks the
    folder complete)."""
    writer = _writer(data_format)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer.write(cfg, out_dir)
    write_tokenizer(out_dir)
    meta = {"generator_version": GENERATOR_VERSION, "format": data_format, "format_version": writer.version}
    dump_json(out_dir / "world.json", {**meta, **dataclasses.asdict(cfg)})


def default_cache_root() -> Path:
    return Path(os.environ.get("VLBENCH_CACHE", Path.home() / ".cache" / "vlbench"))


def ensure_world(cfg: SyntheticConfig, data_format: str, cache_root: Path | None = None) -> Path:
    """Return one format's folder of the world, generating that format on first use. Written to a temp dir and
    renamed: never partial, and concurrent callers keep whichever copy landed first."""
    _writer(data_format)
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    world = root / "synthetic" / f"world-{world_fingerprint(cfg)}"
    target = world / data_format
    if (target / "world.json").exists():
        return target
    world.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".partial-{data_format}-", dir=world))
    try:
        write_world(cfg, data_format, tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first: keep theirs
            if not (target / "world.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
