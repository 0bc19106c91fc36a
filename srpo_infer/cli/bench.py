"""``srpo-infer bench``: diffusers against our pipeline, one optimization at a time (see
:mod:`srpo_infer.bench`); rows printed as they land, reports kept current."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .options import DefaultsHelp, rank, sizes


def add_parser(sub) -> None:
    from ..bench import CPU_DEFAULTS, CPU_DEFAULTS_SECONDS, CPU_SMOKE, GPU_DEFAULTS

    gpu, cpu = GPU_DEFAULTS, CPU_DEFAULTS
    b = sub.add_parser(
        "bench",
        help="benchmark diffusers vs our pipeline, one optimization at a time (JSON, Markdown, PNG)",
        description="Runs stock diffusers FluxPipeline (baseline) and our pipeline with each optimization "
        "added one at a time, on the same weights, prompt and seed, in one process. On a GPU: the whole "
        "table at the real settings. On a CPU: " + ", ".join(c.name for c in CPU_SMOKE) + f" on the tiny "
        f"model at {' '.join(cpu.sizes)}, {cpu.steps} steps ({CPU_DEFAULTS_SECONDS} s on an idle 2-core machine).",
        formatter_class=DefaultsHelp,
    )
    b.add_argument(
        "--model",
        default=None,
        help="full-random (FLUX.1-dev sizes, random, GPU), tiny-random, or real weights "
        "[default: full-random on CUDA, tiny-random on CPU]",
    )
    b.add_argument("--base", default=None, help="base components for real weights [default: FLUX.1-dev]")
    b.add_argument("--device", default=None, help="cpu, cuda … [default: cuda if available]")
    b.add_argument(
        "--sizes",
        nargs="+",
        default=None,
        help=f"WIDTHxHEIGHT … [default: {' '.join(gpu.sizes)} on a GPU, {' '.join(cpu.sizes)} on a CPU]",
    )
    b.add_argument(
        "--steps",
        type=int,
        default=None,
        help=f"denoising steps per image [default: {gpu.steps} on a GPU, {cpu.steps} on a CPU]",
    )
    b.add_argument(
        "--official",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also run the official SRPO setting: 1024x1024, 50 steps [default: on a GPU only]",
    )
    b.add_argument(
        "--configs",
        nargs="+",
        default=None,
        help="these configurations, in this order (put diffusers first: deviations are measured "
        "against it) [default: the device's whole table]",
    )
    b.add_argument(
        "--config-timeout",
        type=float,
        default=None,
        help="seconds per configuration (all its sizes); past it the configuration becomes an error "
        "row and the next one runs [default: no limit]",
    )
    b.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed runs per setting, after one warm-up [default: {gpu.repeats} on a GPU, {cpu.repeats} on a CPU]",
    )
    b.add_argument("--compile-backend", default="inductor", help="torch.compile backend for compiled configs")
    b.add_argument(
        "--context-parallel",
        type=int,
        default=1,
        help="split each image over this many processes (GPUs) in every configuration but the "
        "diffusers baseline; run under torchrun --nproc-per-node N (rank 0 reports)",
    )
    b.add_argument(
        "--out",
        default=None,
        help="folder for bench.json, bench.md, bench.png [default: a new folder in the system's temp "
        "directory, printed at the end]",
    )


def run_command(args: argparse.Namespace) -> int:
    from ..bench import (
        CPU_DEFAULTS,
        GPU_DEFAULTS,
        BenchArgs,
        Setting,
        markdown_header,
        markdown_notes,
        markdown_row,
        run_benchmark,
        skipped_configs,
        write_reports,
    )
    from ..config import resolve_device

    on_gpu = resolve_device(args.device).type == "cuda"
    defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    steps = args.steps if args.steps is not None else defaults.steps
    settings = [Setting(w, h, steps) for w, h in sizes(args.sizes or list(defaults.sizes), "--sizes")]
    if args.official if args.official is not None else defaults.official:
        settings.append(Setting(1024, 1024, 50))
    model = args.model or ("full-random" if on_gpu else "tiny-random")
    leader = rank() == 0  # with --context-parallel every rank benchmarks; rank 0 alone reports
    out = Path(args.out) if args.out or not leader else Path(tempfile.mkdtemp(prefix="srpo-bench-"))

    def on_row(row: dict, partial: dict) -> None:  # print each row as it lands; keep the reports current
        if leader:
            print(markdown_row(row), flush=True)
            write_reports(partial, out)

    if args.context_parallel < 1:
        raise ValueError(f"--context-parallel must be >= 1, got {args.context_parallel}")
    if leader:
        for name, why in skipped_configs(args.configs, resolve_device(args.device)).items():
            print(f"skipping {name}: {why}", file=sys.stderr)
        print(markdown_header(), flush=True)
    result = run_benchmark(
        BenchArgs(
            model=model,
            base=args.base,
            device=args.device,
            settings=settings,
            configs=args.configs,
            repeats=args.repeats or defaults.repeats,
            compile_backend=args.compile_backend,
            config_timeout=args.config_timeout,
            context_parallel=args.context_parallel,
        ),
        on_row=on_row,
    )
    if not leader:
        return 0
    paths = write_reports(result, out)
    print()  # the rows were printed as they landed: the notes below them, then where the reports are
    print("\n".join(markdown_notes(result)))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0
