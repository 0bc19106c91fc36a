"""``srpo-infer warmup``: compile for the given sizes, save the compile cache, report cold and warm starts."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..request import ACCELERATIONS
from .options import DefaultsHelp, add_load_options, load_options, rank, sizes


def add_parser(sub) -> None:
    w = sub.add_parser(
        "warmup",
        help="compile for the given sizes, save the compile cache, print a cold/warm start report",
        description="Loads the pipeline with torch.compile, warms it up at --sizes (saving the compiled "
        "artifacts to --cache-dir, so later processes start warm), then generates once at each of "
        "--check-sizes and counts the graphs compiled after warm-up. Prints the report as JSON. Run it "
        "twice: the second process shows compile-cache hits instead of misses.",
        formatter_class=DefaultsHelp,
    )
    w.add_argument("--sizes", nargs="+", default=["1024x768"], help="WIDTHxHEIGHT sizes to warm up")
    w.add_argument("--check-sizes", nargs="*", default=[], help="WIDTHxHEIGHT sizes to generate after warm-up")
    w.add_argument(
        "--acceleration",
        nargs="+",
        default=["none"],
        choices=list(ACCELERATIONS),
        help="step-caching levels to warm up",
    )
    w.add_argument("--out", default=None, help="also write the JSON report to this file")
    add_load_options(w, defaults={"compile": True})


def run_command(args: argparse.Namespace) -> int:
    from ..warm_start import warm_start_report

    options = {**load_options(args), "progress": False}
    report = warm_start_report(
        sizes(args.sizes, "--sizes"), sizes(args.check_sizes, "--check-sizes"), tuple(args.acceleration), **options
    )
    if rank() != 0:  # with --context-parallel every rank warms up; rank 0 reports
        return 0
    text = json.dumps(report, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0
