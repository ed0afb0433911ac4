"""VQA v2: official files in, official accuracy and results JSON out, a shared answer-classifier head.

Protocol (recorded in every run): the answer vocabulary is the top-K normalised ``multiple_choice_answer`` strings of
the training split by frequency (ties alphabetical); targets are the official per-answer accuracies of each candidate
(the leave-one-out mean of min(1, matches/3) — 0.3/0.6/0.9/1.0 for 1/2/3/≥4 annotators); the loss is binary
cross-entropy over the vocabulary, summed over answers and averaged over questions (bottom-up-attention's
convention); predictions are the arg-max answer; scores come from ``tasks/vqa_eval.py`` (the official evaluator).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn

from vlbench.data.files import format_template, read_json, require_fields
from vlbench.errors import VlbenchError
from vlbench.models.base import Batch, GenerativeAnswerHead, encode_for
from vlbench.registry import TASKS
from vlbench.tasks.answers import AnswerVocab, SharedAnswerHead
from vlbench.tasks.base import EvalResult, Task, write_json_predictions
from vlbench.tasks.datasets import ExampleDataset, ImageRef, build_visual_reader
from vlbench.tasks.vqa_eval import evaluate_vqa, leave_one_out_accuracy, normalize_answer


@dataclass
class VQAExample:
    question_id: int
    image_id: int
    question: str
    image_path: Path
    question_type: str | None = None
    answer_type: str | None = None
    answers: list[str] | None = None  # the 10 raw annotator answers, when the split is annotated
    multiple_choice_answer: str | None = None


# The official files' fields this reader uses, with their JSON types (ids are numbers in VQA v2; text ids also work
# with an image template that takes them, e.g. ``{image_id}``).
QUESTION_FIELDS = {"question_id": (int, str), "image_id": (int, str), "question": str}
ANNOTATION_FIELDS = {
    "question_id": (int, str),
    "answers": list,
    "multiple_choice_answer": str,
    "question_type": str,
    "answer_type": str,
}


def _records(doc: object, key: str, path: Path) -> list:
    if not isinstance(doc, dict) or not isinstance(doc.get(key), list):
        raise VlbenchError(f"{path}: expected a JSON object with a list under {key!r} (official VQA v2 format)")
    return doc[key]


def read_vqa_split(root: Path, subtype: str, image_template: str) -> tuple[list[VQAExample], bool]:
    """Read ``v2_OpenEnded_mscoco_<subtype>_questions.json`` and, if present, ``v2_mscoco_<subtype>_annotations.json``.

    Returns (examples, annotated). Every referenced image must exist: a missing one is reported before training.
    """
    q_path = root / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
    a_path = root / f"v2_mscoco_{subtype}_annotations.json"
    questions = _records(read_json(q_path), "questions", q_path)
    annotations: dict[int, dict] = {}
    annotated = a_path.exists()
    if annotated:
        for i, ann in enumerate(_records(read_json(a_path), "annotations", a_path)):
            require_fields(ann, ANNOTATION_FIELDS, a_path, f"annotation #{i}")
            if not ann["answers"] or not all(
                isinstance(a, dict) and isinstance(a.get("answer"), str) for a in ann["answers"]
            ):
                raise VlbenchError(
                    f"{a_path}: annotation #{i} 'answers' must be a non-empty list of {{'answer': str, ...}}"
                )
            annotations[ann["question_id"]] = ann
    examples = []
    image_exists: dict[int, bool] = {}
    for i, q in enumerate(questions):
        require_fields(q, QUESTION_FIELDS, q_path, f"question #{i}")
        what = f"question {q['question_id']}"
        image_path = root / format_template(image_template, q_path, what, subtype=subtype, image_id=q["image_id"])
        if q["image_id"] not in image_exists:
            image_exists[q["image_id"]] = image_path.is_file()
        if not image_exists[q["image_id"]]:
            raise VlbenchError(
                f"{q_path}: question {q['question_id']} refers to image {q['image_id']}, "
                f"but {image_path} does not exist"
            )
        ann = annotations.get(q["question_id"])
        if annotated and ann is None:
            raise VlbenchError(f"{a_path}: no annotation for question {q['question_id']} of {q_path.name}")
        examples.append(
            VQAExample(
                question_id=q["question_id"],
                image_id=q["image_id"],
                question=q["question"],
                image_path=image_path,
                question_type=ann["question_type"] if ann else None,
                answer_type=ann["answer_type"] if ann else None,
                answers=[a["answer"] for a in ann["answers"]] if ann else None,
                multiple_choice_answer=ann["multiple_choice_answer"] if ann else None,
            )
        )
    if not examples:
        raise VlbenchError(f"{q_path}: no questions (an empty split)")
    return examples, annotated


class VQAAnswerVocab(AnswerVocab):
    """The answer vocabulary over normalised ``multiple_choice_answer`` strings, with official soft targets."""

    @classmethod
    def from_examples(cls, examples: list[VQAExample], top_k: int) -> VQAAnswerVocab:
        return cls.from_answers(
            (normalize_answer(ex.multiple_choice_answer) for ex in examples if ex.answers is not None), top_k
        )

    def soft_targets(self, answers: list[str]) -> dict[int, float]:
        """{answer index: official accuracy of predicting that answer} for the in-vocabulary candidates."""
        counts = Counter(normalize_answer(a) for a in answers)
        return {self.index[c]: leave_one_out_accuracy(k, len(answers)) for c, k in counts.items() if c in self.index}


@TASKS.register("vqa")
class VQATask(Task):
    head_kind = "answer_classifier"
    data_format = "vqav2"

    def __init__(self, cfg: DictConfig, data_cfg: DictConfig, data_root: Path, tokenizer, visual_input: str):
        super().__init__(cfg, data_cfg, data_root, tokenizer, visual_input)
        self._splits: dict[str, tuple[list[VQAExample], bool]] = {}
        train_examples, train_annotated = self._read("train")
        if not train_annotated:
            raise VlbenchError(f"{data_root}: the training split {self.files.splits.train} has no annotations file")
        self.vocab = VQAAnswerVocab.from_examples(train_examples, cfg.num_answers)
        types = sorted({ex.question_type for ex in train_examples})
        self.group_index = {t: i + 1 for i, t in enumerate(types)}  # 0: a type unseen in training
        self.visual = build_visual_reader(data_cfg, self.data_format, data_root, visual_input)
        self._datasets: dict[str, ExampleDataset] = {}

    @property
    def num_groups(self) -> int:
        return len(self.group_index) + 1

    def _read(self, split: str) -> tuple[list[VQAExample], bool]:
        if split not in self._splits:
            files = self.files
            if split not in files.splits:
                raise VlbenchError(
                    f"data.datasets.{self.data_format}.splits: no split named {split!r} (have {list(files.splits)})"
                )
            examples, annotated = read_vqa_split(self.data_root, files.splits[split], files.image_template)
            if self.data_cfg.limit_examples > 0:
                examples = examples[: self.data_cfg.limit_examples]
            self._splits[split] = (examples, annotated)
        return self._splits[split]

    def dataset(self, split: str) -> ExampleDataset:
        if split not in self._datasets:
            examples, annotated = self._read(split)
            self._datasets[split] = ExampleDataset(
                [ex.question for ex in examples],
                [[ImageRef(ex.image_path, str(ex.image_id))] for ex in examples],
                self.tokenizer,
                self.data_cfg.max_text_len,
                self.visual,
                targets=[self.vocab.soft_targets(ex.answers) for ex in examples] if annotated else None,
                collate_targets=self._collate_targets,
                group_ids=[self.group_index.get(ex.question_type or "", 0) for ex in examples],
            )
        return self._datasets[split]

    def _collate_targets(self, targets: list[dict[int, float]]) -> dict[str, torch.Tensor]:
        dense = torch.zeros(len(targets), len(self.vocab))
        for row, scores in enumerate(targets):
            for col, score in scores.items():
                dense[row, col] = score
        return {"targets": dense}

    def build_shared_head(self, hidden_size: int) -> nn.Module:
        return SharedAnswerHead(hidden_size, len(self.vocab), self.cfg.head_hidden_multiplier, self.cfg.head_dropout)

    @property
    def num_outputs(self) -> int:
        return len(self.vocab)

    def native_head_inputs(self) -> dict:
        """The candidate answers as [CLS] answer [SEP] token sequences, for generative heads (ALBEF's decoder)."""
        return {"answer_token_ids": self.tokenizer(list(self.vocab.answers))["input_ids"]}

    def forward(self, model: nn.Module, head: nn.Module, batch: Batch, step: int):
        """Classifier heads score the vocabulary from the joint encoding; a generative head returns its losses in
        training and its candidate scores (same shape as a classifier's logits) in evaluation."""
        if isinstance(head, GenerativeAnswerHead):
            return head.answer_losses(model, batch, step) if head.training else head.answer_scores(model, batch)
        return head(encode_for(model, head, batch), batch)

    def loss(self, outputs: torch.Tensor | dict[str, torch.Tensor], batch: Batch) -> torch.Tensor:
        if isinstance(outputs, dict):  # a generative head's own losses
            return sum(outputs.values())
        targets = batch["targets"]
        return F.binary_cross_entropy_with_logits(outputs.float(), targets, reduction="sum") / targets.shape[0]

    def loss_terms(self, outputs) -> dict[str, float]:
        return {k: float(v.detach()) for k, v in outputs.items()} if isinstance(outputs, dict) else {}

    def predict(self, logits: torch.Tensor, batch: Batch, split: str) -> list[dict]:
        examples = self._splits[split][0]
        best = logits.argmax(dim=-1).tolist()
        return [
            {"question_id": examples[i].question_id, "answer": self.vocab.answers[a]}
            for i, a in zip(batch["index"].tolist(), best, strict=True)
        ]

    def evaluate(self, split: str, predictions: list[dict]) -> EvalResult | None:
        examples, annotated = self._splits[split]
        if not annotated:
            return None
        by_qid = {p["question_id"]: p["answer"] for p in predictions}
        scores = evaluate_vqa(
            (
                {
                    "question_id": ex.question_id,
                    "question_type": ex.question_type,
                    "answer_type": ex.answer_type,
                    "answers": [{"answer": a} for a in ex.answers],
                }
                for ex in examples
            ),
            by_qid,
        )
        metrics = {"accuracy": scores.overall}
        metrics.update({f"accuracy/{k}": v for k, v in sorted(scores.per_answer_type.items())})
        return EvalResult(
            main_metric="accuracy",
            metrics=metrics,
            breakdown={
                "answer_type": dict(sorted(scores.per_answer_type.items())),
                "question_type": dict(sorted(scores.per_question_type.items())),
            },
            per_example={str(qid): acc for qid, acc in scores.per_question.items()},
        )

    def write_predictions(self, predictions: list[dict], path_stem: Path) -> Path:
        """The official results format: a JSON array of {"question_id", "answer"}."""
        return write_json_predictions(sorted(predictions, key=lambda p: p["question_id"]), path_stem)

    def describe(self) -> dict:
        return {
            "num_answers": len(self.vocab),
            "num_question_types": len(self.group_index),
            "answer_vocab_source": f"train ({self.files.splits.train}) multiple_choice_answer, top-K",
        }
