"""The bench's result record (what ``bench.json`` holds)."""

from __future__ import annotations

import datetime
import platform

import torch

from .configs import PROMPT, SEED, BenchArgs, skipped_configs


def record(args: BenchArgs, device: torch.device, dtype: torch.dtype, load_s: float, rows: list[dict]) -> dict:
    """The result record: the rows with their speed-ups over the baseline, and what they were measured
    on (device, versions, prompt, seed) and with."""
    base_times = {
        r["setting"]: r["seconds_per_image"] for r in rows if r.get("config") == "diffusers" and "error" not in r
    }
    for r in rows:
        if r.get("setting") in base_times and "seconds_per_image" in r:
            r["speedup_vs_baseline"] = base_times[r["setting"]] / r["seconds_per_image"]
    return dict(
        benchmark="pipeline",
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        model=args.model,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        dtype=str(dtype).replace("torch.", ""),
        versions=versions(),
        repeats=args.repeats,
        context_parallel=args.context_parallel,  # processes per image (GPUs), the baseline excepted
        load_seconds=load_s,
        prompt=PROMPT,
        seed=SEED,
        note="random weights: speeds are real; deviations, images and how often the step cache skips are "
        "not representative of SRPO (a trained model's residuals evolve differently)"
        if args.model in ("tiny-random", "full-random")
        else "",
        skipped=skipped_configs(args.configs, device),
        rows=rows,
    )


def versions() -> dict:
    """The versions of the packages the numbers depend on."""
    import diffusers
    import transformers

    versions = dict(
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
    )
    for name in ("triton", "torchao", "optimum.quanto"):
        try:
            module = __import__(name, fromlist=["__version__"])
            versions[name] = getattr(module, "__version__", "?")
        except ImportError:
            versions[name] = None
    if torch.cuda.is_available():
        versions["cuda"] = torch.version.cuda
    return versions
