"""`vlbench-data`: generate the synthetic world, inspect VQA v2-format files, extract or convert region features.

vlbench-data synth [--format vqav2|gqa|nlvr2|karpathy|all] [--out DIR] [--seed 0] [--image-size 64] [--train N ...]
vlbench-data inspect ROOT [--subtype val2014]
vlbench-data extract-features | convert-tsv | bench-loader   (region features: see vlbench/data/region_cli.py)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

from vlbench.data.region_cli import add_region_commands
from vlbench.data.synthetic import FORMATS, SPLIT_SUBTYPES, SyntheticConfig, ensure_world, write_world
from vlbench.errors import VlbenchError


def synth(args: argparse.Namespace) -> None:
    formats = list(FORMATS) if args.format == "all" else [args.format]
    cfg = dataclasses.replace(
        SyntheticConfig(), seed=args.seed, image_size=args.image_size, questions_per_image=args.questions_per_image
    )
    sizes = {split: n for split in ("train", "val", "test") if (n := getattr(args, split)) is not None}
    for data_format in formats:  # the split sizes given apply to every format generated
        field = FORMATS[data_format].sizes
        cfg = dataclasses.replace(cfg, **{field: {**getattr(cfg, field), **sizes}})
    for data_format in formats:
        if args.out is None:
            path = ensure_world(cfg, data_format)
        else:
            path = Path(args.out) / data_format
            if path.exists() and any(path.iterdir()):
                raise VlbenchError(f"--out {args.out}: {data_format}/ exists and is not empty")
            tmp = path.with_name(f".partial-{data_format}")
            shutil.rmtree(tmp, ignore_errors=True)
            write_world(cfg, data_format, tmp)
            if path.exists():
                path.rmdir()
            tmp.rename(path)
        print(path)


def inspect(args: argparse.Namespace) -> None:
    root = Path(args.root)
    subtypes = [args.subtype] if args.subtype else list(SPLIT_SUBTYPES.values())
    from vlbench.data.files import read_json

    for subtype in subtypes:
        q_path = root / f"v2_OpenEnded_mscoco_{subtype}_questions.json"
        a_path = root / f"v2_mscoco_{subtype}_annotations.json"
        if not q_path.exists():
            print(f"{subtype}: no questions file ({q_path.name})")
            continue
        questions = read_json(q_path)["questions"]
        print(f"{subtype}: {len(questions)} questions on {len({q['image_id'] for q in questions})} images")
        if not a_path.exists():
            print("  (no annotations)")
            continue
        annotations = read_json(a_path)["annotations"]
        answer_types = Counter(a["answer_type"] for a in annotations)
        question_types = Counter(a["question_type"] for a in annotations)
        answers = Counter(a["multiple_choice_answer"] for a in annotations)
        disagree = sum(len({x["answer"] for x in a["answers"]}) > 1 for a in annotations) / max(1, len(annotations))
        print("  answer types:   " + ", ".join(f"{k} {v}" for k, v in answer_types.most_common()))
        print("  question types: " + ", ".join(f"{k!r} {v}" for k, v in question_types.most_common(10)))
        print(f"  distinct answers: {len(answers)}; most common: {json.dumps(answers.most_common(8))}")
        print(f"  annotators disagree on {100 * disagree:.1f}% of questions")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vlbench-data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="generate the synthetic world (into the cache, or --out)")
    defaults = SyntheticConfig()
    p.add_argument("--format", choices=[*FORMATS, "all"], default="vqav2", help="which format's folder (default vqav2)")
    p.add_argument("--out", default=None, help="write <out>/<format>/ (default: the cache dir keyed by parameters)")
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--image-size", type=int, default=defaults.image_size)
    p.add_argument("--questions-per-image", type=int, default=defaults.questions_per_image, help="VQA v2")
    for split in ("train", "val", "test"):
        p.add_argument(f"--{split}", type=int, default=None, help=f"{split} size (images; NLVR2: sentences)")
    p.set_defaults(func=synth)
    p = sub.add_parser("inspect", help="summarise VQA v2-format files in a directory")
    p.add_argument("root")
    p.add_argument("--subtype", default=None, help="e.g. train2014 (default: every split)")
    p.set_defaults(func=inspect)
    add_region_commands(sub)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except VlbenchError as e:
        print(f"vlbench-data: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
