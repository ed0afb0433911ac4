"""The synthetic world in NLVR2's format: a statement about a pair of images, True or False, each statement used with
several image pairs.

Why several pairs per statement: NLVR2's consistency score groups the examples of one statement (identifiers equal
once the pair index is blanked out) and counts a group only when every pair is right. Each statement's pairs are half
True, half False (an odd one drawn at random), so the statement alone predicts nothing; a pair is found by sampling
scenes until the statement has the wanted truth value. Statements compare counts, attributes and positions across the
two images, so the model must look at both.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from vlbench.data.synthetic_scenes import (
    COLORS,
    NUMBER_WORDS,
    REL_PHRASE,
    RELATIONS,
    SHAPES,
    SIZES,
    SceneObject,
    SyntheticConfig,
    count_phrase,
    dump_json,
    dump_json_lines,
    plural,
    related_pairs,
    render,
    sample_scene,
    save_png,
    scene_graph,
    scene_words,
    words_of,
)

FORMAT_VERSION = 3  # 2: scene graphs per image; 3: colour-referent templates, weighted
SPLITS = {"train": "train", "val": "dev", "test": "test1"}  # vlbench split → NLVR2's file and identifier prefix
SIDES = ("left", "right")
MAX_ATTEMPTS = 2000  # scene pairs tried for one wanted label before the statement is redrawn
TRAIN_DIRECTORIES = 100  # NLVR2's train images are spread over directories 0–99 (the ``directory`` field)

TEMPLATES = {
    "colorExists": "The {side} image contains a {color} object.",
    "bothColor": "Both images contain a {color} object.",
    "colorCount": "The {side} image contains exactly {number} {color} {noun}.",
    "moreColor": "There are more {color} objects in the {side} image than in the {other} image.",
    "bothContain": "Both images contain a {color} {shape}.",
    "exactCount": "The {side} image contains exactly {count}.",
    "oneContains": "Exactly one image contains a {size} {shape}.",
    "totalColor": "The two images contain exactly {number} {color} {noun} in total.",
    "moreObjects": "The {side} image contains more objects than the {other} image.",
    "sameCount": "Both images contain the same number of {shapes}.",
    "relation": "The {side} image contains a {color} object {rel} a {color2} object.",
}
# Colour-referent statements (the first four) are drawn more often: they exercise the grounding a model trained from
# scratch learns first (colour word → region, as the VQA world's questions), so the task is learnable in CPU minutes;
# the others keep shapes, sizes, totals and relations in the mix.
TEMPLATE_WEIGHTS = {name: (3 if i < 4 else 1) for i, name in enumerate(TEMPLATES)}


def _count(objects: list[SceneObject], **attributes: str) -> int:
    return sum(all(getattr(o, k) == v for k, v in attributes.items()) for o in objects)


@dataclass(frozen=True)
class Statement:
    """One sentence: a template and its parameters (each template reads the ones it names)."""

    template: str
    side: str  # the image a one-sided template names ("the left image")
    color: str
    color2: str
    shape: str
    size: str
    number: int
    rel: str

    @property
    def text(self) -> str:
        return TEMPLATES[self.template].format(
            side=self.side,
            other=SIDES[1 - SIDES.index(self.side)],
            color=self.color,
            color2=self.color2,
            shape=self.shape,
            shapes=plural(self.shape),
            size=self.size,
            count=count_phrase(self.number, self.shape),
            number=NUMBER_WORDS[self.number],
            noun="object" if self.number == 1 else "objects",
            rel=REL_PHRASE[self.rel],
        )

    def holds(self, left: list[SceneObject], right: list[SceneObject]) -> bool:
        named, other = (left, right) if self.side == "left" else (right, left)
        t = self.template
        if t == "colorExists":
            return _count(named, color=self.color) > 0
        if t == "bothColor":
            return all(_count(scene, color=self.color) for scene in (left, right))
        if t == "colorCount":
            return _count(named, color=self.color) == self.number
        if t == "moreColor":
            return _count(named, color=self.color) > _count(other, color=self.color)
        if t == "bothContain":
            return all(_count(scene, color=self.color, shape=self.shape) for scene in (left, right))
        if t == "exactCount":
            return _count(named, shape=self.shape) == self.number
        if t == "oneContains":
            return (_count(left, size=self.size, shape=self.shape) > 0) != (
                _count(right, size=self.size, shape=self.shape) > 0
            )
        if t == "totalColor":
            return _count(left, color=self.color) + _count(right, color=self.color) == self.number
        if t == "moreObjects":
            return len(named) > len(other)
        if t == "sameCount":
            return _count(left, shape=self.shape) == _count(right, shape=self.shape)
        return any(
            a.color == self.color and b.color == self.color2 and r == self.rel for a, b, r in related_pairs(named)
        )


def draw_statement(rng: random.Random) -> Statement:
    """Template by ``TEMPLATE_WEIGHTS``, parameters uniformly (numbers 1–3: neither rare nor near-certain)."""
    template = rng.choices(list(TEMPLATE_WEIGHTS), weights=list(TEMPLATE_WEIGHTS.values()))[0]
    color, color2 = rng.sample(list(COLORS), 2)
    return Statement(
        template,
        side=rng.choice(SIDES),
        color=color,
        color2=color2,
        shape=rng.choice(SHAPES),
        size=rng.choice(list(SIZES)),
        number=rng.randint(1, 3),
        rel=rng.choice(RELATIONS),
    )


def balanced_labels(rng: random.Random, k: int) -> list[bool]:
    labels = [True] * (k // 2) + [False] * (k // 2) + ([rng.random() < 0.5] if k % 2 else [])
    rng.shuffle(labels)
    return labels


def sample_pairs(
    rng: random.Random, cfg: SyntheticConfig, statement: Statement, labels: list[bool]
) -> list[tuple[list[SceneObject], list[SceneObject]]] | None:
    """One (left, right) scene pair per wanted label, or None when some label is out of reach for these parameters."""
    pairs = []
    for label in labels:
        for _ in range(MAX_ATTEMPTS):
            left, right = sample_scene(rng, cfg), sample_scene(rng, cfg)
            if statement.holds(left, right) == label:
                pairs.append((left, right))
                break
        else:
            return None
    return pairs


def write_nlvr2(cfg: SyntheticConfig, out_dir: Path) -> None:
    """{train,dev,test1}.json (JSON lines), images/<split>/<split>-<set>-<pair>-img{0,1}.png and a scene graph per
    image ({split}_sceneGraphs.json keyed by image name: the ground-truth boxes region features are extracted over)."""
    rng = random.Random(f"{cfg.seed}:nlvr2")
    k = cfg.nlvr2_pairs_per_sentence
    for split, name in SPLITS.items():
        image_dir = out_dir / "images" / name
        image_dir.mkdir(parents=True, exist_ok=True)
        rows, graphs = [], {}
        for set_index in range(cfg.nlvr2_sentences.get(split, 0)):
            labels = balanced_labels(rng, k)
            for _ in range(20):
                statement = draw_statement(rng)
                pairs = sample_pairs(rng, cfg, statement, labels)
                if pairs is not None:
                    break
            else:
                raise RuntimeError(f"synthetic NLVR2: no statement reachable with {cfg}")
            for pair_index, ((left, right), label) in enumerate(zip(pairs, labels, strict=True)):
                pair_id = f"{name}-{set_index}-{pair_index}"
                for image_index, scene in enumerate((left, right)):
                    save_png(render(scene, cfg.image_size, rng), image_dir / f"{pair_id}-img{image_index}.png")
                    graphs[f"{pair_id}-img{image_index}"] = scene_graph(scene, cfg.image_size)
                row = {"identifier": f"{pair_id}-0", "sentence": statement.text, "label": str(label)}
                if name == "train":
                    row["directory"] = set_index % TRAIN_DIRECTORIES
                rows.append({**row, "synthetic_template": statement.template})
        dump_json_lines(out_dir / f"{name}.json", rows)
        dump_json(out_dir / f"{name}_sceneGraphs.json", graphs)  # ground-truth boxes, keyed by image name


def vocabulary() -> set[str]:
    return scene_words() | words_of(*TEMPLATES.values()) | {"object", "objects"}
