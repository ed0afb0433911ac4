"""GQA (balanced questions): official files in, official eval.py scores and predictions JSON out.

Protocol (recorded in every run): the answer vocabulary is the top-K exact answer strings of the training split
(GQA compares answers by exact string equality: no normalisation); the shared head is the VQA one (2-layer MLP over
the pooled joint encoding) trained with softmax cross-entropy on the single gold answer (questions whose answer is
outside the vocabulary are not trained on, and count as wrong when scored); predictions are the arg-max answer;
scores come from ``tasks/gqa_eval.py`` (a mirror of the official eval.py): accuracy over balanced questions,
binary/open, per structural and semantic type, per length and reasoning steps, distribution, and:
- consistency over the entailed questions *that are in the balanced file*: the official number needs predictions for
  ``<split>_all_questions.json`` (most entailed questions are unbalanced), which we do not predict, so ours is the
  balanced subset's and cannot equal the official figure on real GQA (on the synthetic world every entailed question
  is balanced, so there it is complete);
- validity and plausibility when the folder holds the split's ``<split>_choices.json`` (eval.py's
  ``{tier}_choices.json``); without it they are not reported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from vlbench.data.files import format_template, read_json, require_fields
from vlbench.errors import VlbenchError
from vlbench.models.base import Batch
from vlbench.registry import TASKS
from vlbench.tasks.answers import AnswerVocab, SharedAnswerHead
from vlbench.tasks.base import EvalResult, Task, write_json_predictions
from vlbench.tasks.datasets import ExampleDataset, ImageRef, build_visual_reader
from vlbench.tasks.gqa_eval import evaluate_gqa

IGNORE = -100


@dataclass
class GQASplit:
    question_ids: list[str]
    questions: dict[str, dict]  # the official records, as read (the evaluator needs types, entailed, programs)
    image_paths: list[Path]


def read_gqa_split(root: Path, subtype: str, image_template: str) -> GQASplit:
    """Read ``<subtype>_balanced_questions.json``; every question's image must exist (reported before training)."""
    path = root / f"{subtype}_balanced_questions.json"
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise VlbenchError(f"{path}: expected a JSON object keyed by question id (official GQA format)")
    ids, paths, checked = [], [], {}
    for qid, q in doc.items():
        require_fields(q, {"imageId": str, "question": str, "answer": str}, path, f"question {qid}")
        image_path = root / format_template(
            image_template, path, f"question {qid}", subtype=subtype, image_id=q["imageId"]
        )
        if q["imageId"] not in checked:
            checked[q["imageId"]] = image_path.is_file()
        if not checked[q["imageId"]]:
            raise VlbenchError(
                f"{path}: question {qid} refers to image {q['imageId']}, but {image_path} does not exist"
            )
        ids.append(qid)
        paths.append(image_path)
    if not ids:
        raise VlbenchError(f"{path}: no questions (an empty split)")
    return GQASplit(ids, doc, paths)


def read_gqa_choices(root: Path, subtype: str) -> dict[str, dict] | None:
    """``<subtype>_choices.json`` — per question its ``valid`` and ``plausible`` answers — or None when absent."""
    path = root / f"{subtype}_choices.json"
    if not path.is_file():
        return None
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise VlbenchError(f"{path}: expected a JSON object keyed by question id (official GQA choices format)")
    for qid, choice in doc.items():
        require_fields(choice, {"valid": list, "plausible": list}, path, f"question {qid}")
    return doc


@TASKS.register("gqa")
class GQATask(Task):
    head_kind = "answer_classifier"
    data_format = "gqa"

    def __init__(self, cfg: DictConfig, data_cfg: DictConfig, data_root: Path, tokenizer, visual_input: str):
        super().__init__(cfg, data_cfg, data_root, tokenizer, visual_input)
        self._splits: dict[str, GQASplit] = {}
        train = self._read("train")
        self.vocab = AnswerVocab.from_answers(
            (train.questions[q]["answer"] for q in train.question_ids), cfg.num_answers
        )
        detailed = sorted({self._detailed_type(q) for q in train.questions.values()})
        self.group_index = {t: i + 1 for i, t in enumerate(detailed)}  # prior groups for the blind baselines
        self.visual = build_visual_reader(data_cfg, self.data_format, data_root, visual_input)
        self._datasets: dict[str, ExampleDataset] = {}

    @staticmethod
    def _detailed_type(question: dict) -> str:
        return str(question.get("types", {}).get("detailed", ""))

    @property
    def num_groups(self) -> int:
        return len(self.group_index) + 1

    @property
    def num_outputs(self) -> int:
        return len(self.vocab)

    def _read(self, split: str) -> GQASplit:
        if split not in self._splits:
            files = self.files
            if split not in files.splits:
                raise VlbenchError(f"data.datasets.gqa.splits: no split named {split!r} (have {list(files.splits)})")
            gqa_split = read_gqa_split(self.data_root, files.splits[split], files.image_template)
            if self.data_cfg.limit_examples > 0:
                gqa_split.question_ids = gqa_split.question_ids[: self.data_cfg.limit_examples]
                gqa_split.image_paths = gqa_split.image_paths[: self.data_cfg.limit_examples]
            self._splits[split] = gqa_split
        return self._splits[split]

    def dataset(self, split: str) -> ExampleDataset:
        if split not in self._datasets:
            data = self._read(split)
            records = [data.questions[q] for q in data.question_ids]
            self._datasets[split] = ExampleDataset(
                [r["question"] for r in records],
                [[ImageRef(p, str(r["imageId"]))] for p, r in zip(data.image_paths, records, strict=True)],
                self.tokenizer,
                self.data_cfg.max_text_len,
                self.visual,
                targets=[self.vocab.index.get(r["answer"], IGNORE) for r in records],
                collate_targets=lambda t: {"labels": torch.tensor(t, dtype=torch.long)},
                group_ids=[self.group_index.get(self._detailed_type(r), 0) for r in records],
            )
        return self._datasets[split]

    def build_shared_head(self, hidden_size: int) -> nn.Module:
        return SharedAnswerHead(hidden_size, len(self.vocab), self.cfg.head_hidden_multiplier, self.cfg.head_dropout)

    def loss(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        labels = batch["labels"]
        if (labels == IGNORE).all():  # a batch of out-of-vocabulary answers: nothing to learn, keep the graph
            return logits.sum() * 0.0
        return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE)

    def predict(self, logits: torch.Tensor, batch: Batch, split: str) -> list[dict]:
        ids = self._splits[split].question_ids
        best = logits.argmax(dim=-1).tolist()
        return [
            {"questionId": ids[i], "prediction": self.vocab.answers[a]}
            for i, a in zip(batch["index"].tolist(), best, strict=True)
        ]

    def evaluate(self, split: str, predictions: list[dict]) -> EvalResult | None:
        data = self._splits[split]
        by_qid = {p["questionId"]: p["prediction"] for p in predictions}
        scored = {q: data.questions[q] for q in data.question_ids}
        subtype = self.files.splits[split]
        choices = read_gqa_choices(self.data_root, subtype)
        if choices is not None and (missing := next((q for q in scored if q not in choices), None)) is not None:
            raise VlbenchError(f"{self.data_root / f'{subtype}_choices.json'}: no choices for question {missing}")
        scores = evaluate_gqa(scored, by_qid, choices)
        metrics = {k: v for k, v in scores.metrics.items() if v is not None}
        for group in ("structural", "semantic"):
            metrics.update({f"accuracy/{k}": v for k, v in sorted(scores.breakdown[group].items())})
        breakdown = {group: {str(k): v for k, v in values.items()} for group, values in scores.breakdown.items()}
        per_example = {str(q): float(by_qid.get(q) == scored[q]["answer"]) for q in scored}
        return EvalResult(main_metric="accuracy", metrics=metrics, breakdown=breakdown, per_example=per_example)

    def write_predictions(self, predictions: list[dict], path_stem: Path) -> Path:
        """The official format: a JSON array of {"questionId", "prediction"}."""
        return write_json_predictions(sorted(predictions, key=lambda p: p["questionId"]), path_stem)

    def describe(self) -> dict:
        return {
            "num_answers": len(self.vocab),
            "answer_vocab_source": f"train ({self.files.splits.train}) answers, exact strings, top-K",
            "loss": "softmax cross-entropy on the gold answer",
        }
