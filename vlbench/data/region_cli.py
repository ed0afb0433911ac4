"""`vlbench-data` subcommands for region features (registered by vlbench/data/cli.py).

vlbench-data extract-features --images DIR --out STORE [--boxes gt:SCENEGRAPHS.json | grid:K | file:BOXES.json]
                              [--backbone resnet50] [--image-size 448] [--batch-size 8] [--pretrained [PATH]]
                              [--no-channels-last]
vlbench-data convert-tsv TSV [TSV ...] --out STORE
vlbench-data bench-loader STORE [--samples 20000] [--make N] [--cold]

torch, timm and numpy are imported only when a command runs: `vlbench-data synth` must not pay their start-up.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

EXTRACTION_OPTIONS = (
    "backbone",
    "boxes",
    "image_size",
    "batch_size",
    "roi_size",
    "pretrained",
    "seed",
    "channels_last",
)


def extract_features_command(args: argparse.Namespace) -> None:
    import torch

    from vlbench.data.extract import ExtractionConfig, extract_features

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    given = {name: getattr(args, name) for name in EXTRACTION_OPTIONS if hasattr(args, name)}
    cfg = ExtractionConfig(**given, device=device)
    store = extract_features(args.images, args.out, cfg, workers=args.workers, progress=not args.no_progress)
    print(store.summary())


def convert_tsv_command(args: argparse.Namespace) -> None:
    from vlbench.data.butd_tsv import convert_tsv_to_store

    print(convert_tsv_to_store(args.tsv, args.out, progress=not args.no_progress).summary())


def bench_loader_command(args: argparse.Namespace) -> None:
    from vlbench.data.regions import RegionStore, benchmark_random_access, evict_from_page_cache, write_random_store

    if args.make and not Path(args.store).exists():
        write_random_store(args.store, args.make, args.boxes, args.dim)
    store = RegionStore(args.store, features_dtype=args.dtype)
    print(store.summary())
    rng = random.Random(args.seed)
    if args.cold:
        # Distinct keys: a repeated key would be served from the page cache the first read just filled.
        samples = min(args.samples, len(store))
        evict_from_page_cache(store)
        rate = benchmark_random_access(store, rng.sample(list(store), samples))
        cache = "cold (evicted with posix_fadvise DONTNEED; distinct keys)"
    else:
        samples = args.samples
        all_keys = list(store)
        keys = [rng.choice(all_keys) for _ in range(samples)]
        benchmark_random_access(store, sorted(set(keys)))  # warm-up: fill the page cache
        rate = benchmark_random_access(store, keys)
        cache = "warm"
    print(
        f"random access, 1 process: {rate:,.0f} samples/s ({samples} samples, features as {args.dtype} tensors, "
        f"page cache {cache})"
    )


def add_region_commands(sub: argparse._SubParsersAction) -> None:
    """Register extract-features, convert-tsv and bench-loader on vlbench-data's subparsers."""
    # Extraction options left out stay ExtractionConfig's defaults (named in the help; a test keeps them in sync).
    p = sub.add_parser(
        "extract-features",
        help="region features from images: timm backbone + RoIAlign over boxes",
        argument_default=argparse.SUPPRESS,
    )
    p.add_argument("--images", required=True, help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="store folder to create (an interrupted run resumes)")
    p.add_argument("--boxes", help="gt:SCENEGRAPHS.json | grid:K | file:BOXES.json (default grid:6)")
    p.add_argument("--backbone", help="a timm model name (default resnet50)")
    p.add_argument("--image-size", type=int, help="images are resized to N×N (default 448)")
    p.add_argument("--batch-size", type=int, help="(default 8)")
    p.add_argument("--roi-size", type=int, help="RoIAlign grid, averaged to one vector (default 7)")
    p.add_argument(
        "--pretrained",
        nargs="?",
        const="timm",
        metavar="PATH",
        help="local checkpoint file; bare --pretrained downloads timm's weights (default: random init, no download)",
    )
    p.add_argument("--seed", type=int, help="random init seed (default 0)")
    p.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="the CNN in NHWC memory order: faster, the same features up to float rounding (default true)",
    )
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (auto: cuda when available)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers decoding images")
    p.add_argument("--no-progress", action="store_true", default=False)
    p.set_defaults(func=extract_features_command)

    p = sub.add_parser("convert-tsv", help="convert BUTD/LXMERT .tsv region files into a store")
    p.add_argument("tsv", nargs="+")
    p.add_argument("--out", required=True, help="store folder to create")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=convert_tsv_command)

    p = sub.add_parser("bench-loader", help="random-access samples/s of a store from one process")
    p.add_argument("store")
    p.add_argument("--samples", type=int, default=20000)
    p.add_argument("--make", type=int, default=0, metavar="N", help="first write a random store of N images there")
    p.add_argument("--boxes", type=int, default=36, help="boxes per image for --make")
    p.add_argument("--dim", type=int, default=2048, help="feature dim for --make")
    p.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="features returned as")
    p.add_argument("--cold", action="store_true", help="evict the store from the page cache first (Linux)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=bench_loader_command)
