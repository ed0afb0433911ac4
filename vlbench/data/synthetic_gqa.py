"""The synthetic world in GQA's balanced format: questions with reasoning programs, structural/semantic types,
entailed questions on the same image, and scene graphs.

Why clusters: GQA's consistency score needs, for each question, the questions its answer entails. Most families ask
a primary question about one fact (the red object's shape, the circle's colour, where two objects lie, which colours
are present) and, on the same image and in the same split, questions that fact decides (verify / choose / exist
forms). A question lists the others of its cluster as ``entailed`` only when its own answer decides the fact (a query,
a choice, a "yes" to a verify; not a "no", which leaves the fact open).

Balance (GQA balances answers per question group): every yes/no template asks for the answer it has given least so
far and skips an image where that answer is impossible; open templates are uniform by construction (attributes are
drawn uniformly), and choose/compare questions name the right option first or second at random. A question-only model
therefore stays near the per-template prior. Every question is ``isBalanced``: the files are GQA's balanced files.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from vlbench.data.synthetic_scenes import (
    COLORS,
    OPPOSITE,
    REL_PHRASE,
    SHAPES,
    SceneObject,
    SyntheticConfig,
    dump_json,
    plural,
    related_pairs,
    render,
    sample_scene,
    save_png,
    scene_graph,
    scene_words,
    unique,
    words_of,
)

FORMAT_VERSION = 1
SPLITS = {"train": "train", "val": "val", "test": "testdev"}  # vlbench split → GQA's file prefix
REL_ANSWER = {"left of": "left", "right of": "right", "above": "above", "below": "below"}
CHOICE_PHRASE = {  # "Is A <phrase> B?" with the true relation named first or second
    ("left of", "right of"): "to the left or to the right of",
    ("right of", "left of"): "to the right or to the left of",
    ("above", "below"): "above or below",
    ("below", "above"): "below or above",
}


@dataclass(frozen=True)
class Template:
    """One detailed question type: GQA's structural and semantic type, the question and its full answers."""

    structural: str  # verify | query | choose | logical | compare
    semantic: str  # obj | attr | rel | cat | global
    question: str
    full_answers: dict[str, str]  # "yes" / "no" for binary templates, "open" otherwise


TEMPLATES: dict[str, Template] = {
    "queryShape": Template(
        "query", "cat", "What shape is the {color} object?", {"open": "The {color} object is a {shape}."}
    ),
    "verifyShape": Template(
        "verify",
        "cat",
        "Is the {color} object a {shape}?",
        {"yes": "Yes, the {color} object is a {shape}.", "no": "No, the {color} object is a {truth}."},
    ),
    "chooseShape": Template(
        "choose", "cat", "Is the {color} object a {shape} or a {shape2}?", {"open": "The {color} object is a {truth}."}
    ),
    "queryColor": Template("query", "attr", "What color is the {shape}?", {"open": "The {shape} is {color}."}),
    "verifyColor": Template(
        "verify",
        "attr",
        "Is the {shape} {color}?",
        {"yes": "Yes, the {shape} is {color}.", "no": "No, the {shape} is {truth}."},
    ),
    "chooseColor": Template(
        "choose", "attr", "Is the {shape} {color} or {color2}?", {"open": "The {shape} is {truth}."}
    ),
    "existAttrObj": Template(
        "verify",
        "obj",
        "Is there a {color} {shape}?",
        {"yes": "Yes, there is a {color} {shape}.", "no": "No, there are no {color} {shapes}."},
    ),
    "existColor": Template(
        "verify",
        "obj",
        "Is there a {color} object?",
        {"yes": "Yes, there is a {color} object.", "no": "No, there are no {color} objects."},
    ),
    "existAnd": Template(
        "logical",
        "obj",
        "Is there a {color} object and a {color2} object?",
        {"yes": "Yes, there is a {color} object and a {color2} object.", "no": "No, there is no {missing} object."},
    ),
    "existOr": Template(
        "logical",
        "obj",
        "Is there a {color} object or a {color2} object?",
        {"yes": "Yes, there is a {present} object.", "no": "No, there are no {color} or {color2} objects."},
    ),
    "chooseRel": Template(
        "choose",
        "rel",
        "Is the {color} object {options} the {color2} object?",
        {"open": "The {color} object is {truth} the {color2} object."},
    ),
    "verifyRel": Template(
        "verify",
        "rel",
        "Is the {color} object {rel} the {color2} object?",
        {
            "yes": "Yes, the {color} object is {rel} the {color2} object.",
            "no": "No, the {color} object is {truth} the {color2} object.",
        },
    ),
    "sameColor": Template(
        "compare",
        "attr",
        "Are the {shape} and the {shape2} the same color?",
        {
            "yes": "Yes, the {shape} and the {shape2} are the same color.",
            "no": "No, the {shape} is {color} and the {shape2} is {color2}.",
        },
    ),
    "sameShape": Template(
        "compare",
        "attr",
        "Are the {color} object and the {color2} object the same shape?",
        {
            "yes": "Yes, both are {shapes}.",
            "no": "No, the {color} object is a {shape} and the {color2} object is a {shape2}.",
        },
    ),
    "sameSize": Template(
        "compare",
        "attr",
        "Are the {color} object and the {color2} object the same size?",
        {
            "yes": "Yes, both are {size}.",
            "no": "No, the {color} object is {size} and the {color2} object is {size2}.",
        },
    ),
    "compareSize": Template(
        "compare", "attr", "Which is {degree}, the {shape} or the {shape2}?", {"open": "The {truth} is {degree}."}
    ),
}
DEGREES = ("larger", "smaller")


@dataclass
class GqaQuestion:
    detailed: str  # a key of TEMPLATES
    question: str
    answer: str
    full_answer: str
    program: list[dict]
    global_group: str | None  # the answer group GQA's distribution score compares within (None: binary)
    local_group: str
    decides_fact: bool  # its answer decides its cluster's fact, so it entails the cluster's other questions


@dataclass
class Program:
    """A GQA ``semantic`` program: steps {operation, argument, dependencies}."""

    steps: list[dict] = field(default_factory=list)

    def add(self, operation: str, argument: str, *dependencies: int) -> int:
        self.steps.append({"operation": operation, "argument": argument, "dependencies": list(dependencies)})
        return len(self.steps) - 1

    def select_color(self, objects: list[SceneObject], color: str) -> int:
        """ "the red object": every object, filtered by colour."""
        return self.add("filter color", color, self.add("select", f"object ({_ids(objects)})"))

    def select_shape(self, objects: list[SceneObject], shape: str) -> int:
        return self.add("select", f"{shape} ({_ids([o for o in objects if o.shape == shape])})")


def _ids(objects: list[SceneObject]) -> str:
    return ",".join(str(o.object_id) for o in objects) or "-"  # GQA writes "-" when nothing matches


def make(
    detailed: str,
    answer: str,
    program: Program,
    local: str,
    decides_fact: bool = True,
    global_group: str | None = None,
    **fields: str,
) -> GqaQuestion:
    template = TEMPLATES[detailed]
    full = template.full_answers.get(answer, template.full_answers.get("open"))
    return GqaQuestion(
        detailed,
        template.question.format(**fields),
        answer,
        full.format(**fields),
        program.steps,
        global_group,
        f"{detailed}_{local}",
        decides_fact,
    )


class AnswerBalancer:
    """Counts each template's answers; a binary template asks for the one it has given least (ties: the rng)."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.counts: dict[str, Counter] = {}

    def want(self, detailed: str) -> str:
        counts = self.counts.get(detailed, Counter())
        low = min(counts["yes"], counts["no"])
        return self.rng.choice([a for a in ("yes", "no") if counts[a] == low])

    def record(self, q: GqaQuestion) -> None:
        self.counts.setdefault(q.detailed, Counter())[q.answer] += 1


def _other(rng: random.Random, options, value: str) -> str:
    return rng.choice([x for x in options if x != value])


def _in_random_order(rng: random.Random, a, b) -> tuple:
    return (a, b) if rng.random() < 0.5 else (b, a)


def cluster_shape(rng: random.Random, objects: list[SceneObject], balance: AnswerBalancer) -> list[GqaQuestion] | None:
    """'What shape is the red object?' and what it decides: verify, choose, exist."""
    candidates = unique(objects, lambda o: o.color)
    if not candidates:
        return None
    o = rng.choice(candidates)
    c, s = o.color, o.shape
    p = Program()
    p.add("query", "name", p.select_color(objects, c))
    primary = make("queryShape", s, p, c, global_group="shape", color=c, shape=s)
    want = balance.want("verifyShape")
    v = s if want == "yes" else _other(rng, SHAPES, s)
    p = Program()
    p.add("verify name", v, p.select_color(objects, c))
    verify = make("verifyShape", want, p, c, decides_fact=want == "yes", color=c, shape=v, truth=s)
    a, b = _in_random_order(rng, s, _other(rng, SHAPES, s))
    p = Program()
    p.add("choose name", f"{a}|{b}", p.select_color(objects, c))
    choose = make("chooseShape", s, p, c, global_group="shape", color=c, shape=a, shape2=b, truth=s)
    want = balance.want("existAttrObj")
    v = s if want == "yes" else _other(rng, SHAPES, s)  # "no" holds: the red object is the only red one
    p = Program()
    p.add("exist", "?", p.add("filter color", c, p.select_shape(objects, v)))
    exist = make("existAttrObj", want, p, f"{c}_{v}", decides_fact=False, color=c, shape=v, shapes=plural(v))
    entailed = [verify, choose, exist]
    rng.shuffle(entailed)
    return [primary, *entailed]


def cluster_color(rng: random.Random, objects: list[SceneObject], balance: AnswerBalancer) -> list[GqaQuestion] | None:
    """'What color is the circle?' and what it decides: verify, choose, exist."""
    candidates = unique(objects, lambda o: o.shape)
    if not candidates:
        return None
    o = rng.choice(candidates)
    c, s = o.color, o.shape
    p = Program()
    p.add("query", "color", p.select_shape(objects, s))
    primary = make("queryColor", c, p, s, global_group="color", color=c, shape=s)
    want = balance.want("verifyColor")
    v = c if want == "yes" else _other(rng, COLORS, c)
    p = Program()
    p.add("verify color", v, p.select_shape(objects, s))
    verify = make("verifyColor", want, p, s, decides_fact=want == "yes", color=v, shape=s, truth=c)
    a, b = _in_random_order(rng, c, _other(rng, COLORS, c))
    p = Program()
    p.add("choose color", f"{a}|{b}", p.select_shape(objects, s))
    choose = make("chooseColor", c, p, s, global_group="color", color=a, color2=b, shape=s, truth=c)
    want = balance.want("existAttrObj")
    v = c if want == "yes" else _other(rng, COLORS, c)  # "no" holds: the circle is the only circle
    p = Program()
    p.add("exist", "?", p.add("filter color", v, p.select_shape(objects, s)))
    exist = make("existAttrObj", want, p, f"{v}_{s}", decides_fact=False, color=v, shape=s, shapes=plural(s))
    entailed = [verify, choose, exist]
    rng.shuffle(entailed)
    return [primary, *entailed]


def _relation_choice(objects, a: SceneObject, b: SceneObject, rel: str, rng: random.Random) -> GqaQuestion:
    first, second = _in_random_order(rng, rel, OPPOSITE[rel])
    p = Program()
    ia, ib = p.select_color(objects, a.color), p.select_color(objects, b.color)
    p.add("choose rel", f"{REL_ANSWER[first]}|{REL_ANSWER[second]}", ia, ib)
    return make(
        "chooseRel",
        REL_ANSWER[rel],
        p,
        f"{a.color}_{b.color}",
        global_group="position",
        color=a.color,
        color2=b.color,
        options=CHOICE_PHRASE[(first, second)],
        truth=REL_PHRASE[rel],
    )


def cluster_relation(
    rng: random.Random, objects: list[SceneObject], balance: AnswerBalancer
) -> list[GqaQuestion] | None:
    """'Is the red object to the left or to the right of the blue object?', the same choice seen from the other
    object, and a verify question on the same axis (its "no" names the opposite relation, so it is decided too)."""
    pairs = related_pairs(unique(objects, lambda o: o.color))
    if not pairs:
        return None
    a, b, rel = rng.choice(pairs)
    primary = _relation_choice(objects, a, b, rel, rng)
    mirrored = _relation_choice(objects, b, a, OPPOSITE[rel], rng)
    want = balance.want("verifyRel")
    subject, other, truth = (a, b, rel) if rng.random() < 0.5 else (b, a, OPPOSITE[rel])
    asked = truth if want == "yes" else OPPOSITE[truth]
    p = Program()
    p.add("verify rel", REL_ANSWER[asked], p.select_color(objects, subject.color), p.select_color(objects, other.color))
    verify = make(
        "verifyRel",
        want,
        p,
        f"{subject.color}_{other.color}",
        color=subject.color,
        color2=other.color,
        rel=REL_PHRASE[asked],
        truth=REL_PHRASE[truth],
    )
    entailed = [mirrored, verify]
    rng.shuffle(entailed)
    return [primary, *entailed]


def _exist_color(objects: list[SceneObject], color: str, decides_fact: bool = False) -> GqaQuestion:
    answer = "yes" if any(o.color == color for o in objects) else "no"
    p = Program()
    p.add("exist", "?", p.select_color(objects, color))
    return make("existColor", answer, p, color, decides_fact=decides_fact, color=color)


def single_exist_color(
    rng: random.Random, objects: list[SceneObject], balance: AnswerBalancer
) -> list[GqaQuestion] | None:
    present = sorted({o.color for o in objects})
    pool = present if balance.want("existColor") == "yes" else [c for c in COLORS if c not in present]
    return [_exist_color(objects, rng.choice(pool))] if pool else None


def cluster_logical(
    rng: random.Random, objects: list[SceneObject], balance: AnswerBalancer
) -> list[GqaQuestion] | None:
    """'Is there a red object and/or a blue object?'. A "yes" to and (a "no" to or) decides both colours' existence,
    so it entails the two exist questions."""
    detailed = rng.choice(("existAnd", "existOr"))
    want = balance.want(detailed)
    present = sorted({o.color for o in objects})
    absent = [c for c in COLORS if c not in present]
    both_present = detailed == "existAnd" and want == "yes"
    none_present = detailed == "existOr" and want == "no"
    if both_present:
        kinds = [(present, present)]
    elif none_present:
        kinds = [(absent, absent)]
    elif detailed == "existAnd":  # "no": at least one is missing
        kinds = [(present, absent), (absent, present), (absent, absent)]
    else:  # or, "yes": at least one is there
        kinds = [(present, absent), (absent, present), (present, present)]
    kinds = [(x, y) for x, y in kinds if x and y and (x is not y or len(x) >= 2)]
    if not kinds:
        return None
    first_pool, second_pool = rng.choice(kinds)
    c1 = rng.choice(first_pool)
    c2 = rng.choice([c for c in second_pool if c != c1])
    p = Program()
    e1 = p.add("exist", "?", p.select_color(objects, c1))
    e2 = p.add("exist", "?", p.select_color(objects, c2))
    p.add("and" if detailed == "existAnd" else "or", "", e1, e2)
    decides = both_present or none_present
    fields = {"color": c1, "color2": c2, "missing": c1 if c1 in absent else c2, "present": c1 if c1 in present else c2}
    primary = make(detailed, want, p, f"{c1}_{c2}", decides_fact=decides, **fields)
    return [primary, _exist_color(objects, c1), _exist_color(objects, c2)] if decides else [primary]


SAME_ATTRIBUTE = {  # detailed type → (the attribute that names the two objects, the attribute compared)
    "sameColor": ("shape", "color"),
    "sameShape": ("color", "shape"),
    "sameSize": ("color", "size"),
}


def single_compare_same(
    rng: random.Random, objects: list[SceneObject], balance: AnswerBalancer
) -> list[GqaQuestion] | None:
    """'Are the circle and the square the same color?', 'Are the red object and the blue object the same shape?'
    (or size)."""
    detailed = rng.choice(list(SAME_ATTRIBUTE))
    want = balance.want(detailed)
    named, compared = SAME_ATTRIBUTE[detailed]
    candidates = unique(objects, lambda o: getattr(o, named))
    pairs = [
        (a, b)
        for i, a in enumerate(candidates)
        for b in candidates[i + 1 :]
        if (getattr(a, compared) == getattr(b, compared)) == (want == "yes")
    ]
    if not pairs:
        return None
    a, b = _in_random_order(rng, *rng.choice(pairs))
    p = Program()
    select = p.select_shape if named == "shape" else p.select_color
    p.add(f"same {compared}", "", select(objects, getattr(a, named)), select(objects, getattr(b, named)))
    fields = {"shape": a.shape, "shape2": b.shape, "color": a.color, "color2": b.color, "size": a.size, "size2": b.size}
    local = f"{getattr(a, named)}_{getattr(b, named)}"
    return [make(detailed, want, p, local, decides_fact=False, shapes=plural(a.shape), **fields)]


def single_compare_size(
    rng: random.Random, objects: list[SceneObject], balance: AnswerBalancer
) -> list[GqaQuestion] | None:
    """'Which is larger, the circle or the square?' (the answer is one of the two named shapes)."""
    candidates = unique(objects, lambda o: o.shape)
    pairs = [(a, b) for i, a in enumerate(candidates) for b in candidates[i + 1 :] if a.size != b.size]
    if not pairs:
        return None
    a, b = _in_random_order(rng, *rng.choice(pairs))
    degree = rng.choice(DEGREES)
    larger, smaller = (a, b) if a.size == "large" else (b, a)
    truth = (larger if degree == "larger" else smaller).shape
    p = Program()
    p.add(
        f"choose {degree}", f"{a.shape}|{b.shape}", p.select_shape(objects, a.shape), p.select_shape(objects, b.shape)
    )
    return [
        make(
            "compareSize",
            truth,
            p,
            f"{a.shape}_{b.shape}",
            decides_fact=False,
            degree=degree,
            shape=a.shape,
            shape2=b.shape,
            truth=truth,
        )
    ]


FAMILIES = (
    cluster_shape,
    cluster_color,
    cluster_relation,
    cluster_logical,
    single_exist_color,
    single_compare_same,
    single_compare_size,
)


def sample_image_questions(
    rng: random.Random, objects: list[SceneObject], n: int, balance: AnswerBalancer
) -> list[list[GqaQuestion]]:
    """Clusters of questions for one image, ``n`` questions in all (a cluster cut short keeps its primary)."""
    clusters: list[list[GqaQuestion]] = []
    texts: set[str] = set()
    count, attempts = 0, 0
    while count < n and attempts < 50:
        attempts += 1
        cluster = rng.choice(FAMILIES)(rng, objects, balance)
        if cluster is None or any(q.question in texts for q in cluster):
            continue
        cluster = cluster[: n - count]
        for q in cluster:
            balance.record(q)
            texts.add(q.question)
        clusters.append(cluster)
        count += len(cluster)
    return clusters


def question_record(image_id: str, q: GqaQuestion, qid: str, cluster_ids: list[str]) -> dict:
    template = TEMPLATES[q.detailed]
    return {
        "imageId": image_id,
        "question": q.question,
        "answer": q.answer,
        "fullAnswer": q.full_answer,
        "isBalanced": True,
        "types": {"structural": template.structural, "semantic": template.semantic, "detailed": q.detailed},
        "entailed": [other for other in cluster_ids if other != qid] if q.decides_fact else [],
        "equivalent": [qid],
        "groups": {"global": q.global_group, "local": q.local_group},
        "semantic": q.program,
        "annotations": {"question": {}, "answer": {}, "fullAnswer": {}},
    }


def write_gqa(cfg: SyntheticConfig, out_dir: Path) -> None:
    """images/<imageId>.png, {train,val,testdev}_balanced_questions.json and {split}_sceneGraphs.json."""
    rng = random.Random(f"{cfg.seed}:gqa")
    balance = AnswerBalancer(rng)
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    image_number = 0
    for split, name in SPLITS.items():
        questions: dict[str, dict] = {}
        graphs: dict[str, dict] = {}
        for _ in range(cfg.gqa_images.get(split, 0)):
            image_number += 1
            image_id = str(image_number)
            objects = sample_scene(rng, cfg)
            save_png(render(objects, cfg.image_size, rng), image_dir / f"{image_id}.png")
            graphs[image_id] = scene_graph(objects, cfg.image_size)
            k = 0
            for cluster in sample_image_questions(rng, objects, cfg.gqa_questions_per_image, balance):
                ids = [str(image_number * 1000 + k + i) for i in range(len(cluster))]
                for q, qid in zip(cluster, ids, strict=True):
                    questions[qid] = question_record(image_id, q, qid, ids)
                k += len(cluster)
        dump_json(out_dir / f"{name}_balanced_questions.json", questions)
        dump_json(out_dir / f"{name}_sceneGraphs.json", graphs)


def vocabulary() -> set[str]:
    """Every word of the questions, answers and full answers."""
    texts = [t.question for t in TEMPLATES.values()] + [a for t in TEMPLATES.values() for a in t.full_answers.values()]
    texts += list(CHOICE_PHRASE.values())
    return scene_words() | words_of(*texts) | set(REL_ANSWER.values()) | set(DEGREES) | {"yes", "no", "object"}
