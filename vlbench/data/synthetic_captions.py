"""The synthetic world as a captioned image set: Karpathy's ``dataset_coco.json`` splits (for retrieval and
captioning) plus the LXMERT-style pre-training files (captions and VQA questions per image, object and attribute
vocabularies, scene graphs with ground-truth boxes for region features).

Why five styles: each image's captions describe it differently (a plain list, sizes, counts, one spatial relation,
objects grouped by shape), in a fresh random order, but nearly every caption names each object's colour and shape, so
a caption picks out its image among thousands and retrieval is learnable. Test images never appear in the LXMERT files,
so pre-training does not see the retrieval test set.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

from vlbench.data.synthetic_scenes import (
    COLORS,
    NUMBER_WORDS,
    REL_PHRASE,
    SHAPES,
    SIZES,
    SceneObject,
    SyntheticConfig,
    coco_filename,
    dump_json,
    join_words,
    plural,
    related_pairs,
    render,
    sample_scene,
    save_png,
    scene_graph,
    scene_words,
    words_of,
)
from vlbench.data.synthetic_vqa import sample_questions

FORMAT_VERSION = 1
# Karpathy's splits: train images come from COCO train2014, restval/val/test from val2014.
SPLIT_FILEPATHS = {"train": "train2014", "restval": "val2014", "val": "val2014", "test": "val2014"}
LXMERT_FILES = {"train": "lxmert_train.json", "restval": "lxmert_train.json", "val": "lxmert_val.json"}

LIST_PREFIXES = ("{objects}", "a picture of {objects}", "an image with {objects}", "there is {objects}")
SIZED = ("{objects}", "{objects} on a gray background")
COUNTED = ("{number} shapes: {objects}", "{number} objects: {objects}")
RELATED = "{a} {rel} {b}"
RELATED_REST = ("{caption}, with {objects}", "{caption} and {number} other shapes")
GROUPED = ("{number} {color} {shapes}", "{number} {shapes} in {colors}")


def _noun_phrase(o: SceneObject, sized: bool = False) -> str:
    return f"a {o.size} {o.color} {o.shape}" if sized else f"a {o.color} {o.shape}"


def _shuffled(rng: random.Random, objects: list[SceneObject]) -> list[SceneObject]:
    return rng.sample(objects, len(objects))


def caption_list(rng: random.Random, objects: list[SceneObject]) -> str:
    return rng.choice(LIST_PREFIXES).format(objects=join_words([_noun_phrase(o) for o in _shuffled(rng, objects)]))


def caption_sizes(rng: random.Random, objects: list[SceneObject]) -> str:
    return rng.choice(SIZED).format(objects=join_words([_noun_phrase(o, True) for o in _shuffled(rng, objects)]))


def caption_count(rng: random.Random, objects: list[SceneObject]) -> str:
    phrases = join_words([_noun_phrase(o) for o in _shuffled(rng, objects)])
    return rng.choice(COUNTED).format(number=NUMBER_WORDS[len(objects)], objects=phrases)


def caption_relation(rng: random.Random, objects: list[SceneObject]) -> str:
    """One spatial relation, then the other objects (named when few, counted when many)."""
    pairs = related_pairs(objects)
    if not pairs:
        return caption_grouped(rng, objects)
    a, b, rel = rng.choice(pairs)
    caption = RELATED.format(a=_noun_phrase(a), rel=REL_PHRASE[rel], b=_noun_phrase(b))
    rest = [o for o in _shuffled(rng, objects) if o is not a and o is not b]
    if not rest:
        return caption
    template = RELATED_REST[0] if len(rest) <= 2 else RELATED_REST[1]
    return template.format(
        caption=caption, objects=join_words([_noun_phrase(o) for o in rest]), number=NUMBER_WORDS[len(rest)]
    )


def caption_grouped(rng: random.Random, objects: list[SceneObject]) -> str:
    """Objects grouped by shape: 'two circles in red and blue, a green triangle'."""
    groups = []
    for shape in rng.sample(SHAPES, len(SHAPES)):
        members = [o for o in objects if o.shape == shape]
        colors = sorted({o.color for o in members}, key=list(COLORS).index)
        if len(members) == 1:
            groups.append(_noun_phrase(members[0]))
        elif len(colors) == 1:
            groups.append(GROUPED[0].format(number=NUMBER_WORDS[len(members)], color=colors[0], shapes=plural(shape)))
        elif members:
            rng.shuffle(colors)
            groups.append(
                GROUPED[1].format(number=NUMBER_WORDS[len(members)], shapes=plural(shape), colors=join_words(colors))
            )
    return join_words(groups)


CAPTION_STYLES = (caption_list, caption_sizes, caption_count, caption_relation, caption_grouped)


def sample_captions(rng: random.Random, objects: list[SceneObject], n: int) -> list[str]:
    """``n`` captions, the styles in a random order (cycled when ``n`` exceeds their number). A caption that repeats
    an earlier one is redrawn, with the next styles (in small scenes two styles can coincide)."""
    styles = rng.sample(CAPTION_STYLES, len(CAPTION_STYLES))
    captions: list[str] = []
    for i in range(n):
        for attempt in range(10):
            text = styles[(i + attempt) % len(styles)](rng, objects)
            text = text[0].upper() + text[1:] + "."
            if text not in captions:
                break
        captions.append(text)
    return captions


def caption_tokens(raw: str) -> list[str]:
    """Karpathy's ``tokens``: lower-cased words, punctuation dropped."""
    return re.findall(r"[a-z0-9]+", raw.lower())


def write_karpathy(cfg: SyntheticConfig, out_dir: Path) -> None:
    """dataset_coco.json, images/<filepath>/<filename>, lxmert_{train,val}.json, objects_vocab.txt,
    attributes_vocab.txt and sceneGraphs.json (every image)."""
    rng = random.Random(f"{cfg.seed}:karpathy")
    images, graphs = [], {}
    lxmert: dict[str, list[dict]] = {name: [] for name in LXMERT_FILES.values()}
    cocoid, sentid = 0, 0
    for split, filepath in SPLIT_FILEPATHS.items():
        image_dir = out_dir / "images" / filepath
        image_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(cfg.karpathy_images.get(split, 0)):
            cocoid += 1
            objects = sample_scene(rng, cfg)
            filename = coco_filename(filepath, cocoid)
            save_png(render(objects, cfg.image_size, rng), image_dir / filename)
            graphs[str(cocoid)] = scene_graph(objects, cfg.image_size)
            captions = sample_captions(rng, objects, cfg.captions_per_image)
            sentids = list(range(sentid, sentid + len(captions)))
            sentid += len(captions)
            imgid = len(images)
            images.append(
                {
                    "filepath": filepath,
                    "filename": filename,
                    "imgid": imgid,
                    "split": split,
                    "sentids": sentids,
                    "cocoid": cocoid,
                    "sentences": [
                        {"raw": raw, "tokens": caption_tokens(raw), "imgid": imgid, "sentid": s}
                        for raw, s in zip(captions, sentids, strict=True)
                    ],
                }
            )
            questions = sample_questions(rng, objects, cfg.questions_per_image)
            if split in LXMERT_FILES:
                lxmert[LXMERT_FILES[split]].append(
                    {
                        "img_id": filename.removesuffix(".png"),
                        "sentf": {"mscoco": captions, "vqa": [q.text for q in questions]},
                        "labelf": {"vqa": [{q.answer: 1.0} for q in questions]},
                    }
                )
    dump_json(out_dir / "dataset_coco.json", {"dataset": "coco", "images": images})
    for name, rows in lxmert.items():
        dump_json(out_dir / name, rows)
    (out_dir / "objects_vocab.txt").write_text("".join(f"{s}\n" for s in SHAPES))
    (out_dir / "attributes_vocab.txt").write_text("".join(f"{a}\n" for a in [*COLORS, *SIZES]))
    dump_json(out_dir / "sceneGraphs.json", graphs)


def vocabulary() -> set[str]:
    """Every word of the captions (LXMERT's VQA questions are the VQA format's)."""
    texts = [*LIST_PREFIXES, *SIZED, *COUNTED, RELATED, *RELATED_REST, *GROUPED]
    return scene_words() | words_of(*texts) | {"a", "and", ",", "."}
