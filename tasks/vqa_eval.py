"""The official VQA v2 evaluation, mirrored: GT-Vision-Lab/VQA ``vqaEval.py`` at commit a013f00 ("Fixed processing
answers bug"). Our numbers must equal the official script's on the same predictions, so its quirks are kept:

- the period regex ``(?!<=\\d)(\\.)(?!\\d)`` is a look-*ahead* for the literal "<=" (not a look-behind), and
  ``re.sub`` gets ``re.UNICODE`` (32) as its *count* argument, so at most 32 periods are removed;
- punctuation/digit/article processing is applied (to the 10 answers and the prediction) only when the 10
  ground-truth answers are not all identical;
- accuracy is the mean over the 10 leave-one-out subsets of min(1, matches among the other 9 / 3), summed in the
  answers' order (so equal to the script's float to the last bit, not only up to rounding);
- percentages are rounded as Python 2's ``round`` (the script's interpreter) does: exact halves away from zero
  (Python 3's ``round`` takes them to even: 3.125 → 3.12 instead of the script's 3.13).
The answer-id comparison the script uses to leave one answer out is replaced by leaving out by position, which is
the same for real data (answer ids are unique within a question).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from functools import lru_cache

CONTRACTIONS = {
    "aint": "ain't",
    "arent": "aren't",
    "cant": "can't",
    "couldve": "could've",
    "couldnt": "couldn't",
    "couldn'tve": "couldn't've",
    "couldnt've": "couldn't've",
    "didnt": "didn't",
    "doesnt": "doesn't",
    "dont": "don't",
    "hadnt": "hadn't",
    "hadnt've": "hadn't've",
    "hadn'tve": "hadn't've",
    "hasnt": "hasn't",
    "havent": "haven't",
    "hed": "he'd",
    "hed've": "he'd've",
    "he'dve": "he'd've",
    "hes": "he's",
    "howd": "how'd",
    "howll": "how'll",
    "hows": "how's",
    "Id've": "I'd've",
    "I'dve": "I'd've",
    "Im": "I'm",
    "Ive": "I've",
    "isnt": "isn't",
    "itd": "it'd",
    "itd've": "it'd've",
    "it'dve": "it'd've",
    "itll": "it'll",
    "let's": "let's",
    "maam": "ma'am",
    "mightnt": "mightn't",
    "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've",
    "mightve": "might've",
    "mustnt": "mustn't",
    "mustve": "must've",
    "neednt": "needn't",
    "notve": "not've",
    "oclock": "o'clock",
    "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at",
    "shant": "shan't",
    "shed've": "she'd've",
    "she'dve": "she'd've",
    "she's": "she's",
    "shouldve": "should've",
    "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll",
    "somebodys": "somebody's",
    "someoned": "someone'd",
    "someoned've": "someone'd've",
    "someone'dve": "someone'd've",
    "someonell": "someone'll",
    "someones": "someone's",
    "somethingd": "something'd",
    "somethingd've": "something'd've",
    "something'dve": "something'd've",
    "somethingll": "something'll",
    "thats": "that's",
    "thered": "there'd",
    "thered've": "there'd've",
    "there'dve": "there'd've",
    "therere": "there're",
    "theres": "there's",
    "theyd": "they'd",
    "theyd've": "they'd've",
    "they'dve": "they'd've",
    "theyll": "they'll",
    "theyre": "they're",
    "theyve": "they've",
    "twas": "'twas",
    "wasnt": "wasn't",
    "wed've": "we'd've",
    "we'dve": "we'd've",
    "weve": "we've",
    "werent": "weren't",
    "whatll": "what'll",
    "whatre": "what're",
    "whats": "what's",
    "whatve": "what've",
    "whens": "when's",
    "whered": "where'd",
    "wheres": "where's",
    "whereve": "where've",
    "whod": "who'd",
    "whod've": "who'd've",
    "who'dve": "who'd've",
    "wholl": "who'll",
    "whos": "who's",
    "whove": "who've",
    "whyll": "why'll",
    "whyre": "why're",
    "whys": "why's",
    "wont": "won't",
    "wouldve": "would've",
    "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've",
    "yall": "y'all",
    "yall'll": "y'all'll",
    "y'allll": "y'all'll",
    "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've",
    "youd": "you'd",
    "youd've": "you'd've",
    "you'dve": "you'd've",
    "youll": "you'll",
    "youre": "you're",
    "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_PERIOD_STRIP_COUNT = int(re.UNICODE)  # the official script passes re.UNICODE positionally, i.e. as `count`


def clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


@lru_cache(maxsize=1 << 16)  # pure and called for every annotator answer; real answer strings repeat a lot
def process_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, _PERIOD_STRIP_COUNT)


@lru_cache(maxsize=1 << 16)
def process_digit_article(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The full normalisation (whitespace, punctuation, digits/articles): used for answer vocabularies and targets."""
    return process_digit_article(process_punctuation(clean_whitespace(text)))


def leave_one_out_accuracy(matches: int, total: int) -> float:
    """Mean over the `total` leave-one-out subsets of min(1, matches among the others / 3), when `matches` of the
    `total` answers equal the prediction: leaving out a matching answer leaves matches − 1, any other leaves matches."""
    return (matches * min(1.0, (matches - 1) / 3) + (total - matches) * min(1.0, matches / 3)) / total


def question_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """Accuracy of one prediction against its ground-truth answers, exactly as the official evaluator computes it:
    the leave-one-out terms summed in the answers' order (``leave_one_out_accuracy`` is the same up to the last bit)."""
    gts = [clean_whitespace(a) for a in gt_answers]
    pred = clean_whitespace(prediction)
    if len(set(gts)) > 1:
        gts = [process_digit_article(process_punctuation(a)) for a in gts]
        pred = process_digit_article(process_punctuation(pred))
    matched = [a == pred for a in gts]
    matches = sum(matched)
    return sum(min(1.0, (matches - left_out) / 3) for left_out in matched) / len(matched)


def round_like_python2(value: float, digits: int = 2) -> float:
    """The official script's ``round`` (Python 2): the float's exact value to ``digits`` decimals, halves away from
    zero."""
    return float(Decimal(value).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


@dataclass
class VQAScores:
    overall: float  # percent, rounded to 2 decimals like the official script
    per_question_type: dict[str, float]
    per_answer_type: dict[str, float]
    per_question: dict[int, float]  # unrounded accuracy in [0, 1]


def evaluate_vqa(annotations: Iterable[Mapping], predictions: Mapping[int, str]) -> VQAScores:
    """Score predictions {question_id: answer} against official annotation records (every question must be
    predicted, as the official evaluator requires)."""
    per_question: dict[int, float] = {}
    by_qtype: dict[str, list[float]] = {}
    by_atype: dict[str, list[float]] = {}
    for ann in annotations:
        qid = ann["question_id"]
        if qid not in predictions:
            raise KeyError(f"no prediction for question {qid}")
        acc = question_accuracy(predictions[qid], [a["answer"] for a in ann["answers"]])
        per_question[qid] = acc
        by_qtype.setdefault(ann["question_type"], []).append(acc)
        by_atype.setdefault(ann["answer_type"], []).append(acc)
    if not per_question:
        raise ValueError("no annotated questions to evaluate")

    def pct(values: list[float]) -> float:
        return round_like_python2(100 * sum(values) / len(values))

    return VQAScores(
        overall=pct(list(per_question.values())),
        per_question_type={k: pct(v) for k, v in by_qtype.items()},
        per_answer_type={k: pct(v) for k, v in by_atype.items()},
        per_question=per_question,
    )
