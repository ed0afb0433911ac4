"""Image–text retrieval on Karpathy splits (COCO 5K / Flickr30K 1K test): Recall@1/5/10 both ways, mean, RSUM.

Protocol (recorded in every run):
- Training examples are (image, caption) pairs, every caption of the split (Karpathy train + restval by default).
- ``head=native`` trains the model's own retrieval objectives (ALBEF: ITC with momentum distillation + ITM with
  hard negatives, every caption of an image a positive) and scores with the model's ITC embeddings and ITM head.
- ``head=shared`` (the controlled comparison, any model): a 2-way ITM classifier over the pooled joint encoding,
  trained on each pair plus one random negative text per image and one random negative image per text.
- Scoring (``task.scoring``): ``itc`` (cosine of unimodal embeddings), ``itm`` (the matching score of every
  image–text pair, batched: n_images × n_texts forward passes), or ``itc_itm`` (ALBEF's: ITC for all pairs, then
  each query's ``rerank_k`` best candidates rescored by ITM); ``auto`` picks ``itc_itm`` with ``head=native`` when
  the model has unimodal embeddings (its own objectives train them), ``itm`` otherwise (the shared head trains no
  embeddings, so ITC candidates would be random). Recalls come from ``tasks/retrieval_eval.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from vlbench.data.files import format_template, read_json, require_fields
from vlbench.errors import VlbenchError
from vlbench.models.base import Batch, JointEncoding, ModelObjectives, VisionLanguageModel, encode_for
from vlbench.models.layers import MLPClassifier
from vlbench.registry import TASKS
from vlbench.tasks.base import EvalContext, EvalResult, Task, pad_sequences, to_device, write_json_predictions
from vlbench.tasks.datasets import VISUAL_KEYS, ExampleDataset, ImageRef, VisualReader, build_visual_reader
from vlbench.tasks.retrieval_eval import chance_recalls, itm_rerank, retrieval_recalls


@dataclass
class CaptionedImage:
    image_id: str
    ref: ImageRef
    captions: list[str]


def read_karpathy_split(root: Path, splits: list[str], image_template: str) -> list[CaptionedImage]:
    """Images of ``dataset_*.json`` (Karpathy's format) whose ``split`` is one of ``splits``, with their captions."""
    candidates = sorted(root.glob("dataset_*.json"))
    if not candidates:
        raise VlbenchError(f"{root}: no dataset_*.json (Karpathy split file, e.g. dataset_coco.json)")
    path = candidates[0]
    doc = read_json(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise VlbenchError(f"{path}: expected a JSON object with a list under 'images' (Karpathy format)")
    images = []
    for i, record in enumerate(doc["images"]):
        require_fields(record, {"filename": str, "split": str, "sentences": list}, path, f"image #{i}")
        if record["split"] not in splits:
            continue
        fields = {"filepath": record.get("filepath", ""), "filename": record["filename"], "subtype": record["split"]}
        image_path = root / format_template(image_template, path, f"image #{i}", **fields)
        if not image_path.is_file():
            raise VlbenchError(f"{path}: image #{i} ({record['filename']}) needs {image_path}, which does not exist")
        captions = [s["raw"] for s in record["sentences"] if isinstance(s, dict) and isinstance(s.get("raw"), str)]
        if not captions:
            raise VlbenchError(f"{path}: image #{i} ({record['filename']}) has no sentences with 'raw' text")
        image_id = str(record.get("cocoid", record.get("imgid", record["filename"])))
        images.append(CaptionedImage(image_id, ImageRef(image_path, image_id), captions))
    if not images:
        raise VlbenchError(f"{path}: no images in split(s) {splits} (an empty split)")
    return images


def caption_pairs(
    images: list[CaptionedImage], tokenizer, max_text_len: int, visual: VisualReader
) -> tuple[ExampleDataset, list[int]]:
    """One example per caption, carrying its image's index as ``image_ids``; returns (dataset, caption → image)."""
    texts, refs, owners = [], [], []
    for index, image in enumerate(images):
        for caption in image.captions:
            texts.append(caption)
            refs.append([image.ref])
            owners.append(index)
    dataset = ExampleDataset(
        texts,
        refs,
        tokenizer,
        max_text_len,
        visual,
        targets=owners,
        collate_targets=lambda ids: {"image_ids": torch.tensor(ids, dtype=torch.long)},
    )
    return dataset, owners


class SharedMatchHead(nn.Module):
    """The shared ITM head: matched / not matched from the pooled joint encoding (logit 1 = match)."""

    reads_pooled_only = True

    def __init__(self, hidden_size: int, dropout: float):
        super().__init__()
        self.classifier = MLPClassifier(hidden_size, hidden_size * 2, 2, dropout)

    def forward(self, encoding, batch: Batch) -> torch.Tensor:
        return self.classifier(encoding.pooled)


def _pair_batch(
    batch: Batch, image_index: torch.Tensor, text_index: torch.Tensor, skip: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Rows pairing image ``image_index[r]`` with text ``text_index[r]`` of the same batch (without ``skip``)."""
    pairs = {}
    for key, value in batch.items():
        if key in skip:
            continue
        if key in ("input_ids", "attention_mask"):
            pairs[key] = value[text_index]
        elif key in VISUAL_KEYS:
            pairs[key] = value[image_index]
    pairs["group_ids"] = batch["group_ids"][text_index]
    return pairs


def encode_pairs(
    model: nn.Module, head: nn.Module, batch: Batch, image_index: torch.Tensor, text_index: torch.Tensor
) -> JointEncoding:
    """The joint encoding of pairs (image ``image_index[r]``, text ``text_index[r]``) of a batch, as ``head`` reads
    it (``encode_for``). A model with ``unimodal_tokens`` encodes each image and text of the batch once and fuses per
    pair, as ALBEF's reference does for its ITM negatives (they index the batch's unimodal embeddings); others encode
    every pair. The unimodal encoders then see each image once: their BatchNorm statistics (Pixel-BERT's CNN) are the
    batch's, not weighted by how often an image was drawn, and an image's pairs share its dropout masks."""
    images = {k: v for k, v in batch.items() if k in VISUAL_KEYS}
    image_tokens = model.unimodal_tokens(images) if images else None
    if image_tokens is None:
        return encode_for(model, head, _pair_batch(batch, image_index, text_index))
    text_tokens = model.unimodal_tokens({k: batch[k] for k in ("input_ids", "attention_mask")}) or {}
    pairs = _pair_batch(batch, image_index, text_index, skip=model.inputs_replaced_by_tokens)
    pairs.update({name: tokens[image_index] for name, tokens in image_tokens.items()})
    pairs.update({name: tokens[text_index] for name, tokens in text_tokens.items()})
    return encode_for(model, head, pairs, from_tokens=True)


def shared_matching_loss(model: nn.Module, head: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    """ITM cross-entropy over each pair, a random other-image text per image, and a random other image per text
    (of this process's batch, drawn from the step's generator: the same draws on a GPU as on the CPU)."""
    ids = batch["image_ids"]
    size = ids.shape[0]
    rows = torch.arange(size, device=ids.device)
    different = ids.view(-1, 1) != ids.view(1, -1)
    weights = different.float()
    weights[weights.sum(dim=1) == 0] = 1.0 - torch.eye(size, device=ids.device)[weights.sum(dim=1) == 0]
    shard = model.batch_shard(size)
    neg_text = shard.choose(weights).squeeze(1)
    neg_image = shard.choose(weights).squeeze(1)
    image_index = torch.cat([rows, rows, neg_image])
    text_index = torch.cat([rows, neg_text, rows])
    logits = head(encode_pairs(model, head, batch, image_index, text_index), batch)
    labels = torch.cat([torch.ones(size), torch.zeros(2 * size)]).long().to(logits.device)
    return {"itm": F.cross_entropy(logits.float(), labels)}


@dataclass
class EvalSet:
    """The unique images and all captions of a split: what retrieval ranks."""

    images: list[CaptionedImage]
    texts: list[str]
    txt2img: list[int]


def encode_eval_set(eval_set: EvalSet, tokenizer, max_text_len: int, visual: VisualReader) -> tuple[dict, dict]:
    """Collated visual inputs of every image and tokenised texts of every caption (kept in memory for scoring)."""
    visual_batch = visual.collate([visual.load(image.ref) for image in eval_set.images])
    ids = tokenizer(eval_set.texts, truncation=True, max_length=max_text_len)["input_ids"]
    input_ids, attention_mask = pad_sequences(ids, tokenizer.pad_token_id)
    return visual_batch, {"input_ids": input_ids, "attention_mask": attention_mask}


@torch.no_grad()
def cache_unimodal_tokens(model: nn.Module, visual_batch: dict, text_batch: dict, ctx: EvalContext) -> bool:
    """Add the model's unimodal token encodings of every image and caption to the batches (CPU), once; False when
    the model has none. ITM scoring then gathers them per pair instead of re-encoding (the reference does the same)."""
    probe = to_device({k: v[:1] for k, v in visual_batch.items()}, ctx.device)
    if not probe or model.unimodal_tokens(probe) is None:
        return False
    for batch in (visual_batch, text_batch):
        count = next(iter(batch.values())).shape[0]
        chunks: dict[str, list[torch.Tensor]] = {}
        for start in range(0, count, ctx.batch_size):
            rows = to_device({k: v[start : start + ctx.batch_size] for k, v in batch.items()}, ctx.device)
            with ctx.autocast():
                for name, tokens in model.unimodal_tokens(rows).items():
                    chunks.setdefault(name, []).append(tokens.float().cpu())
        batch.update({name: torch.cat(parts) for name, parts in chunks.items()})
    return True


@torch.no_grad()
def score_retrieval(
    model: nn.Module,
    match_fn,
    visual_batch: dict,
    text_batch: dict,
    ctx: EvalContext,
    scoring: str,
    rerank_k: int,
    n_images: int,
    unused_by_pairs: tuple[str, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor]:
    """(i2t, t2i) score matrices (n_images, n_texts) under ``scoring``; ``match_fn(pair batch) → (P,)`` for ITM.

    ``visual_batch`` is empty for models that eat no image (blind baselines): their scores then depend on text only.
    ``unused_by_pairs``: inputs ``match_fn`` does not read (raw pixels once their tokens are cached), not gathered
    into pair batches — at 256 pairs of 64 px images that copy was 15–25 % of Pixel-BERT tiny's scoring time.
    """
    n_texts = text_batch["input_ids"].shape[0]

    def rows(batch: dict, index: torch.Tensor, skip: tuple[str, ...] = ()) -> dict:
        return to_device({k: v[index] for k, v in batch.items() if k not in skip}, ctx.device)

    def itm_score(image_index: torch.Tensor, text_index: torch.Tensor) -> torch.Tensor:
        pairs = {**rows(visual_batch, image_index, unused_by_pairs), **rows(text_batch, text_index, unused_by_pairs)}
        pairs["group_ids"] = torch.zeros(len(text_index), dtype=torch.long, device=ctx.device)
        with ctx.autocast():
            return match_fn(pairs).float().cpu()

    if scoring in ("itc", "itc_itm"):

        def embed_all(embed, batch: dict, count: int) -> torch.Tensor:
            chunks = []
            for start in range(0, count, ctx.batch_size):
                with ctx.autocast():
                    chunks.append(embed(rows(batch, torch.arange(start, min(start + ctx.batch_size, count)))).float())
            return torch.cat(chunks).cpu()

        image_emb = embed_all(model.embed_image, visual_batch, n_images)
        text_emb = embed_all(model.embed_text, text_batch, n_texts)
        sims = image_emb @ text_emb.t()
        if scoring == "itc":
            return sims, sims
        return itm_rerank(sims, itm_score, min(rerank_k, max(n_images, n_texts)), batch_size=ctx.batch_size)
    # itm: every pair
    scores = torch.empty(n_images, n_texts)
    pairs = torch.cartesian_prod(torch.arange(n_images), torch.arange(n_texts))
    for start in tqdm(range(0, len(pairs), ctx.batch_size), desc="itm pairs", leave=False, disable=not ctx.progress):
        chunk = pairs[start : start + ctx.batch_size]
        scores[chunk[:, 0], chunk[:, 1]] = itm_score(chunk[:, 0], chunk[:, 1])
    return scores, scores


class CaptionCorpusTask(Task):
    """Tasks over Karpathy-format captions (retrieval, pre-training): images per split, one example per caption."""

    data_format = "karpathy"

    def __init__(self, cfg: DictConfig, data_cfg: DictConfig, data_root: Path, tokenizer, visual_input: str):
        super().__init__(cfg, data_cfg, data_root, tokenizer, visual_input)
        self.visual = build_visual_reader(data_cfg, self.data_format, data_root, visual_input)
        self._images: dict[str, list[CaptionedImage]] = {}
        self._datasets: dict[str, ExampleDataset] = {}
        self.images("train")

    def images(self, split: str) -> list[CaptionedImage]:
        """The split's images (train adds Karpathy's restval when ``task.include_restval``)."""
        if split not in self._images:
            files = self.files
            if split not in files.splits:
                raise VlbenchError(
                    f"data.datasets.{self.data_format}.splits: no split named {split!r} (have {list(files.splits)})"
                )
            names = [files.splits[split]] + (["restval"] if split == "train" and self.cfg.include_restval else [])
            images = read_karpathy_split(self.data_root, names, files.image_template)
            if self.data_cfg.limit_examples > 0:
                images = images[: self.data_cfg.limit_examples]
            self._images[split] = images
        return self._images[split]

    def dataset(self, split: str) -> ExampleDataset:
        if split not in self._datasets:
            self._datasets[split] = caption_pairs(
                self.images(split), self.tokenizer, self.data_cfg.max_text_len, self.visual
            )[0]
        return self._datasets[split]

    def eval_inputs(self, split: str) -> tuple[EvalSet, dict, dict]:
        """The split as retrieval ranks it (unique images, every caption) with its collated inputs."""
        images = self.images(split)
        eval_set = EvalSet(
            images, [c for im in images for c in im.captions], [i for i, im in enumerate(images) for _ in im.captions]
        )
        visual_batch, text_batch = encode_eval_set(eval_set, self.tokenizer, self.data_cfg.max_text_len, self.visual)
        return eval_set, visual_batch, text_batch

    def loss_terms(self, outputs: dict[str, torch.Tensor]) -> dict[str, float]:
        return {name: float(value.detach()) for name, value in outputs.items()}


@TASKS.register("retrieval")
class RetrievalTask(CaptionCorpusTask):
    head_kind = "image_text_matcher"
    shardable_evaluation = False  # predict_split needs the whole split

    def __init__(self, cfg: DictConfig, data_cfg: DictConfig, data_root: Path, tokenizer, visual_input: str):
        if cfg.scoring not in ("auto", "itc", "itm", "itc_itm"):
            raise VlbenchError(f"task.scoring={cfg.scoring!r}: expected auto, itc, itm or itc_itm")
        super().__init__(cfg, data_cfg, data_root, tokenizer, visual_input)
        self._scores: dict[str, tuple[torch.Tensor, torch.Tensor, list[int], str]] = {}

    @property
    def num_outputs(self) -> int:
        return 2

    def build_shared_head(self, hidden_size: int) -> nn.Module:
        return SharedMatchHead(hidden_size, self.cfg.head_dropout)

    def forward(self, model: nn.Module, head: nn.Module, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        if isinstance(head, ModelObjectives):
            return model.retrieval_losses(batch, step)
        return shared_matching_loss(model, head, batch)

    def loss(self, outputs: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        return sum(outputs.values())

    def _scoring_for(
        self, model: nn.Module, native: bool, visual_batch: dict, device: str | torch.device = "cpu"
    ) -> str:
        probe = to_device({k: v[:1] for k, v in visual_batch.items()}, device)  # one image: does it embed?
        has_itc = bool(probe) and model.embed_image(probe) is not None
        has_itm = not native or type(model).match_scores is not VisionLanguageModel.match_scores
        if self.cfg.scoring == "auto":  # ITC is trained only by the model's own objectives (head=native)
            if native and has_itc:
                return "itc_itm" if has_itm else "itc"
            return "itm"
        if self.cfg.scoring in ("itc", "itc_itm") and not has_itc:
            raise VlbenchError(f"task.scoring={self.cfg.scoring}: the model has no unimodal embeddings; use itm")
        return self.cfg.scoring

    @torch.no_grad()
    def predict_split(self, net: nn.Module, split: str, ctx: EvalContext) -> list[dict]:
        eval_set, visual_batch, text_batch = self.eval_inputs(split)
        images = eval_set.images
        model, head = net.model, net.head
        native = isinstance(head, ModelObjectives)
        scoring = self._scoring_for(model, native, visual_batch, ctx.device)
        # only the fusion runs per pair when the model's images and captions can be encoded once (cached)
        cached = scoring != "itc" and cache_unimodal_tokens(model, visual_batch, text_batch, ctx)
        if native and cached:

            def match_fn(pairs):
                return model.match_scores_from_tokens(pairs)
        elif native:

            def match_fn(pairs):
                return model.match_scores(pairs)
        elif cached:

            def match_fn(pairs):
                return head(encode_for(model, head, pairs, from_tokens=True), pairs)[:, 1]
        else:

            def match_fn(pairs):
                return head(encode_for(model, head, pairs), pairs)[:, 1]

        unused = model.inputs_replaced_by_tokens if cached else ()
        i2t, t2i = score_retrieval(
            model, match_fn, visual_batch, text_batch, ctx, scoring, self.cfg.rerank_k, len(images), unused
        )
        self._scores[split] = (i2t, t2i, eval_set.txt2img, scoring)
        top = 10
        predictions = [
            {"image_id": image.image_id, "texts": i2t[i].topk(min(top, i2t.shape[1])).indices.tolist()}
            for i, image in enumerate(images)
        ]
        predictions += [
            {"text": t, "images": [images[j].image_id for j in t2i[:, t].topk(min(top, t2i.shape[0])).indices.tolist()]}
            for t in range(len(eval_set.texts))
        ]
        return predictions

    def evaluate(self, split: str, predictions: list[dict]) -> EvalResult | None:
        i2t, t2i, txt2img, _ = self._scores[split]
        metrics = retrieval_recalls(i2t, txt2img, sims_t2i=t2i)
        return EvalResult(main_metric="mean_recall", metrics=metrics)

    def floor(self, split: str) -> dict:
        """Chance: the expected recalls of a random ranking of this split (its images and their caption counts)."""
        images = self.images(split)
        value = chance_recalls([len(image.captions) for image in images])["mean_recall"]
        return {"name": "chance: a random ranking", "metric": "mean_recall", "value": value, "split": split,
                "examples": len(images)}  # fmt: skip

    def write_predictions(self, predictions: list[dict], path_stem: Path) -> Path:
        """Top-10 rankings: per image its caption indices (in split order), per caption its image ids."""
        return write_json_predictions(predictions, path_stem)

    def describe(self) -> dict:
        return {"scoring": self.cfg.scoring, "rerank_k": self.cfg.rerank_k, "include_restval": self.cfg.include_restval}
