"""Pre-training: the model's own objectives on the caption corpus (Karpathy-format captions), each logged.

Protocol (recorded in every run): examples are (image, caption) pairs of Karpathy train (+ restval); the loss is the
weighted sum of the model's ``pretrain_losses`` (weights ``task.loss_weights``, 1.0 by default; ALBEF: ITC + ITM +
MLM); validation reports each objective's mean loss on the val pairs — computed in eval mode (no momentum or queue
updates) under a fixed seed, so MLM masks and ITM negatives are the same at every evaluation and the training RNG is
untouched — and, when the model has unimodal embeddings, zero-shot ITC retrieval recalls on the val images. The
checkpoint is chosen by the summed validation loss (lower is better).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from tqdm.auto import tqdm

from vlbench.data.files import read_json, require_keys
from vlbench.errors import VlbenchError
from vlbench.models.base import Batch
from vlbench.registry import TASKS
from vlbench.tasks.answers import AnswerVocab
from vlbench.tasks.base import EvalContext, EvalResult, to_device, write_json_predictions
from vlbench.tasks.datasets import ExampleDataset
from vlbench.tasks.retrieval import CaptionCorpusTask, score_retrieval
from vlbench.tasks.retrieval_eval import retrieval_recalls

EVAL_SEED = 1234  # fixed masks/negatives for validation: comparable across evaluations and runs


class NoHead(nn.Module):
    """Pre-training trains the model's own objectives: there is no task head."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("the pretrain task has no head")


def read_lxmert_questions(root: Path, names: list[str]) -> list[tuple[str, str, dict[str, float]]]:
    """(image id, question, {answer: score}) from LXMERT-format pre-training files (``mscoco_train.json`` shape:
    a list of {img_id, sentf: {source: [sentences]}, labelf: {source: [{answer: score}]}}); questions are the
    sentences of every source that has labels."""
    questions = []
    for name in names:
        path = root / name
        doc = read_json(path)
        if not isinstance(doc, list):
            raise VlbenchError(f"{path}: expected a JSON list of {{img_id, sentf, labelf}} (LXMERT format)")
        for i, entry in enumerate(doc):
            require_keys(entry, ("img_id", "sentf"), path, f"entry #{i}")
            for source, labels in entry.get("labelf", {}).items():
                sentences = entry["sentf"].get(source, [])
                if len(sentences) != len(labels):
                    raise VlbenchError(
                        f"{path}: entry #{i} ({entry['img_id']}) has {len(sentences)} {source} sentences but "
                        f"{len(labels)} label sets"
                    )
                questions += [(entry["img_id"], q, dict(a)) for q, a in zip(sentences, labels, strict=True)]
    return questions


@TASKS.register("pretrain")
class PretrainTask(CaptionCorpusTask):
    head_kind = "pretrain"
    shardable_evaluation = False  # predict_split needs the whole split

    def __init__(self, cfg: DictConfig, data_cfg: DictConfig, data_root: Path, tokenizer, visual_input: str):
        super().__init__(cfg, data_cfg, data_root, tokenizer, visual_input)
        self._results: dict[str, dict[str, float]] = {}
        self.use_qa = cfg.qa == "on"
        self.answers: AnswerVocab | None = None

    def configure_for_model(self, model_cls: type) -> None:
        """``task.qa=auto``: add the QA pairs when the model has an image-QA objective (LXMERT)."""
        if self.cfg.qa == "auto":
            self.use_qa = bool(getattr(model_cls, "pretrain_uses_qa", False))

    def _questions(self, split: str) -> list[tuple[str, str, dict[str, float]]]:
        """The split's QA pairs; only training must have them (a split without files is evaluated on captions)."""
        names = list(self.cfg.qa_files.get(split, []))
        if not names and split == "train":
            raise VlbenchError("task.qa_files.train: no LXMERT-format QA files named for training (task.qa=on)")
        return read_lxmert_questions(self.data_root, names)

    def dataset(self, split: str) -> ExampleDataset:
        if not self.use_qa:
            return super().dataset(split)
        if split not in self._datasets:
            if self.answers is None:  # the answer table: top-K answers of the training questions
                train_answers = (a for _, _, labels in self._questions("train") for a in labels)
                self.answers = AnswerVocab.from_answers(train_answers, self.cfg.num_qa_answers)
            images = self.images(split)
            by_stem = {im.ref.path.stem: index for index, im in enumerate(images)}
            texts, refs, targets = [], [], []
            for index, image in enumerate(images):
                for caption in image.captions:
                    texts.append(caption)
                    refs.append([image.ref])
                    targets.append((index, None))
            for img_id, question, labels in self._questions(split):
                index = by_stem.get(img_id, by_stem.get(str(img_id)))
                if index is None:  # a question about an image outside this split (or a limited split)
                    continue
                scores = {self.answers.index[a]: float(v) for a, v in labels.items() if a in self.answers.index}
                texts.append(question)
                refs.append([images[index].ref])
                targets.append((index, scores or None))
            self._datasets[split] = ExampleDataset(
                texts, refs, self.tokenizer, self.data_cfg.max_text_len, self.visual, targets, self._collate_qa
            )
        return self._datasets[split]

    def _collate_qa(self, targets: list[tuple[int, dict[int, float] | None]]) -> dict[str, torch.Tensor]:
        """``image_ids``; ``qa_targets`` (B, answers) soft scores and ``qa_mask`` (B,): which rows are answerable."""
        dense = torch.zeros(len(targets), len(self.answers))
        for row, (_, scores) in enumerate(targets):
            for col, score in (scores or {}).items():
                dense[row, col] = score
        return {
            "image_ids": torch.tensor([index for index, _ in targets], dtype=torch.long),
            "qa_targets": dense,
            "qa_mask": torch.tensor([scores is not None for _, scores in targets]),
        }

    @property
    def num_outputs(self) -> int:
        return 0

    def build_shared_head(self, hidden_size: int) -> nn.Module:
        return NoHead()

    def forward(self, model: nn.Module, head: nn.Module, batch: Batch, step: int) -> dict[str, torch.Tensor]:
        try:
            return model.pretrain_losses(batch, step)
        except NotImplementedError as e:
            raise VlbenchError(f"task=pretrain: {e}") from e

    def loss(self, outputs: dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        weights = self.cfg.loss_weights
        return sum(float(weights.get(name, 1.0)) * value for name, value in outputs.items())

    @torch.no_grad()
    def predict_split(self, net: nn.Module, split: str, ctx: EvalContext) -> list[dict]:
        sums: dict[str, float] = {}
        batches = 0
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(EVAL_SEED)
            for batch in tqdm(
                ctx.loader(self.dataset(split)), desc=f"eval {split}", leave=False, disable=not ctx.progress
            ):
                batch = to_device(batch, ctx.device)
                if batch["input_ids"].shape[0] < 2:  # ITM needs a negative in the batch
                    continue
                with ctx.autocast():
                    outputs = net(batch)
                for name, value in outputs.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
                batches += 1
        if batches == 0:
            raise VlbenchError(f"task=pretrain: split {split!r} has fewer than 2 captions to evaluate on")
        metrics = {f"loss/{name}": total / batches for name, total in sums.items()}
        weights = self.cfg.loss_weights
        metrics["loss"] = sum(float(weights.get(name, 1.0)) * total / batches for name, total in sums.items())
        if self.cfg.zero_shot_retrieval:
            metrics.update(self._zero_shot(net.model, split, ctx))
        self._results[split] = metrics
        return [{"split": split, **metrics}]

    def _zero_shot(self, model: nn.Module, split: str, ctx: EvalContext) -> dict[str, float]:
        eval_set, visual_batch, text_batch = self.eval_inputs(split)
        probe = to_device({k: v[:1] for k, v in visual_batch.items()}, ctx.device)
        if not probe or model.embed_image(probe) is None:
            return {}
        sims, _ = score_retrieval(model, None, visual_batch, text_batch, ctx, "itc", 0, len(eval_set.images))
        return {f"zero_shot/{k}": v for k, v in retrieval_recalls(sims, eval_set.txt2img).items()}

    def evaluate(self, split: str, predictions: list[dict]) -> EvalResult | None:
        return EvalResult(main_metric="loss", metrics=self._results[split], higher_is_better=False)

    def write_predictions(self, predictions: list[dict], path_stem: Path) -> Path:
        """Pre-training has no official prediction format: the split's per-objective scores, as JSON."""
        return write_json_predictions(predictions, path_stem)

    def describe(self) -> dict:
        described = {
            "loss_weights": dict(self.cfg.loss_weights),
            "corpus": "Karpathy-format captions (train + restval)",
        }
        if self.use_qa:
            described |= {
                "qa_files": {k: list(v) for k, v in self.cfg.qa_files.items()},
                "num_qa_answers": len(self.answers or []),
            }
        return described
