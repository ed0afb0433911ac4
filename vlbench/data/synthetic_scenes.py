"""The synthetic world's objects: parameters, scene sampling, rendering, scene graphs and the helpers every format's
writer shares (relations, referents, number words, byte-stable file writing).

Why one module: every format (VQA v2, GQA, NLVR2, Karpathy captions) describes the same kind of scene, so a model
pre-trained on one format's images and words transfers to another's; the writers differ only in what they ask.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 215, 40),
    "purple": (150, 50, 190),
    "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.28, "large": 0.44}  # radius as a fraction of a grid cell
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
REL_PHRASE = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


@dataclass(frozen=True)
class SyntheticConfig:
    """Parameters of the world; their hash names the cache directory. Split sizes are keyed by vlbench's split
    names (train/val/test; Karpathy adds restval); each format's writer maps them to the dataset's own names."""

    seed: int = 0
    image_size: int = 64
    grid_size: int = 4
    min_objects: int = 2
    max_objects: int = 5
    # VQA v2
    images: dict[str, int] = field(default_factory=lambda: {"train": 3000, "val": 300, "test": 600})
    questions_per_image: int = 5
    noisy_annotator_rate: float = 0.12
    # GQA (balanced questions, with their entailed questions on the same image)
    gqa_images: dict[str, int] = field(default_factory=lambda: {"train": 3000, "val": 300, "test": 600})
    gqa_questions_per_image: int = 5
    # NLVR2: sentences per split, each paired with several image pairs
    nlvr2_sentences: dict[str, int] = field(default_factory=lambda: {"train": 2500, "val": 200, "test": 300})
    nlvr2_pairs_per_sentence: int = 4
    # Karpathy caption splits (+ LXMERT-style pre-training files)
    karpathy_images: dict[str, int] = field(
        default_factory=lambda: {"train": 2000, "restval": 100, "val": 200, "test": 200}
    )
    captions_per_image: int = 5


@dataclass
class SceneObject:
    object_id: int
    shape: str
    color: str
    size: str
    cx: float  # centre, pixels
    cy: float
    radius: float

    @property
    def box(self) -> list[float]:
        """COCO/GQA-style [x, y, w, h]."""
        r = self.radius
        return [round(self.cx - r, 2), round(self.cy - r, 2), round(2 * r, 2), round(2 * r, 2)]


def relation(a: SceneObject, b: SceneObject) -> str | None:
    """The dominant spatial relation of a to b, or None when the two are too close to tell."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if max(abs(dx), abs(dy)) < 4 or abs(abs(dx) - abs(dy)) < 4:  # overlapping or diagonal: ambiguous
        return None
    if abs(dx) >= abs(dy):
        return "left of" if dx < 0 else "right of"
    return "above" if dy < 0 else "below"


def related_pairs(objects: list[SceneObject]) -> list[tuple[SceneObject, SceneObject, str]]:
    """Every ordered pair whose relation is unambiguous, with that relation."""
    pairs = []
    for a in objects:
        for b in objects:
            if a is not b and (rel := relation(a, b)) is not None:
                pairs.append((a, b, rel))
    return pairs


def sample_scene(rng: random.Random, cfg: SyntheticConfig) -> list[SceneObject]:
    """Objects in distinct cells of a ``grid_size``² grid (small jitter), attributes drawn uniformly.

    Why a grid: at the default 64 px / 4×4 grid each object covers whole 8-px ViT patches, so a model trained from
    scratch on CPU can learn shapes in minutes; uniform attributes keep every answer unpredictable from the text.
    """
    n = rng.randint(cfg.min_objects, cfg.max_objects)
    cell = cfg.image_size / cfg.grid_size
    cells = rng.sample(range(cfg.grid_size * cfg.grid_size), n)
    objects = []
    for i, c in enumerate(cells):
        size = rng.choice(list(SIZES))
        r = SIZES[size] * cell
        jitter = cell / 2 - r - 0.5
        cx = (c % cfg.grid_size + 0.5) * cell + rng.uniform(-jitter, jitter)
        cy = (c // cfg.grid_size + 0.5) * cell + rng.uniform(-jitter, jitter)
        objects.append(SceneObject(i, rng.choice(SHAPES), rng.choice(list(COLORS)), size, cx, cy, r))
    return objects


def render(objects: list[SceneObject], size: int, rng: random.Random) -> Image.Image:
    """Flat shapes on a lightly textured background (texture so that pixels are not trivially separable)."""
    base = 200 + rng.randint(-15, 15)
    img = Image.new("RGB", (size, size), (base, base, base))
    draw = ImageDraw.Draw(img)
    for _ in range(size // 4):  # a few faint speckles
        x, y = rng.randrange(size), rng.randrange(size)
        g = base + rng.randint(-25, 25)
        draw.point((x, y), fill=(g, g, g))
    for o in objects:
        fill = COLORS[o.color]
        x0, y0, x1, y1 = o.cx - o.radius, o.cy - o.radius, o.cx + o.radius, o.cy + o.radius
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "square":
            s = o.radius * 0.85
            draw.rectangle((o.cx - s, o.cy - s, o.cx + s, o.cy + s), fill=fill)
        else:
            draw.polygon([(o.cx, y0), (x1, y1), (x0, y1)], fill=fill)
    return img


def save_png(image: Image.Image, path: Path) -> None:
    """PNG: lossless, so the same parameters give byte-identical images."""
    image.save(path, format="PNG")


def scene_graph(objects: list[SceneObject], image_size: int) -> dict:
    """GQA-like scene graph: objects with name, box, attributes and outgoing relations."""
    graph_objects = {}
    for o in objects:
        x, y, w, h = o.box
        rels = []
        for other in objects:
            if other is o:
                continue
            rel = relation(o, other)
            if rel is not None:
                rels.append({"name": rel, "object": str(other.object_id)})
        graph_objects[str(o.object_id)] = {
            "name": o.shape,
            "x": x,
            "y": y,
            "w": w,
            "h": h,
            "attributes": [o.color, o.size],
            "relations": rels,
        }
    return {"width": image_size, "height": image_size, "objects": graph_objects}


def coco_filename(subtype: str, image_id: int) -> str:
    """COCO-style file name, as the real VQA v2 / Karpathy images are named (PNG here: lossless, byte-stable)."""
    return f"COCO_{subtype}_{image_id:012d}.png"


def unique(objects: list[SceneObject], key) -> list[SceneObject]:
    """The objects whose ``key`` no other object shares: the ones a definite referent ("the red object") can name."""
    counts: dict = {}
    for o in objects:
        counts[key(o)] = counts.get(key(o), 0) + 1
    return [o for o in objects if counts[key(o)] == 1]


def plural(shape: str) -> str:
    return shape + "s"


def count_phrase(n: int, shape: str) -> str:
    """'one circle', 'three squares'."""
    return f"{NUMBER_WORDS[n]} {shape if n == 1 else plural(shape)}"


def join_words(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def words_of(*texts: str) -> set[str]:
    """The lower-cased words and punctuation marks of template texts, ``{placeholders}`` left out: what the word-level
    tokenizer (BERT normaliser + pre-tokenizer) will see, so a format's vocabulary follows from its templates."""
    words: set[str] = set()
    for text in texts:
        words |= set(re.findall(r"\w+|[^\w\s]", re.sub(r"\{[^}]*\}", " ", text).lower()))
    return words


def scene_words() -> set[str]:
    """The fillers every format's templates draw from: colours, shapes (and plurals), sizes, relations, numbers."""
    words = set(COLORS) | set(SHAPES) | {plural(s) for s in SHAPES} | set(SIZES) | set(NUMBER_WORDS)
    words |= words_of(*RELATIONS, *REL_PHRASE.values())
    return words | {str(i) for i in range(11)}


def dump_json(path: Path, obj) -> None:
    """Compact JSON with the caller's key order: byte-identical for the same content."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, separators=(",", ":"))


def dump_json_lines(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, separators=(",", ":")) + "\n")
