"""Cold and warm start, measured: how long a process takes from nothing to its first image, what
warm-up compiled, whether the saved compile artifacts were hit, and whether any size compiles again
after warm-up. ``srpo-infer warmup`` prints this report; run it twice with the same ``cache_dir`` to
see a warm start (the second process shows compile-cache hits and no misses)."""

from __future__ import annotations

import time

from .compile import cache_counters, compiled_graphs


def warm_start_report(
    sizes: list[tuple[int, int]],
    check_sizes: list[tuple[int, int]] = (),
    accelerations: tuple[str, ...] = ("none",),
    **pipeline_options,
) -> dict:
    """Load a pipeline with ``pipeline_options``, warm it up at ``sizes``, then generate once at each
    of ``check_sizes`` (2 steps) and count the graphs compiled after warm-up (0 is the goal).

    >>> r = warm_start_report([(512, 512)], [(640, 512)], model="tiny-random", device="cpu", progress=False)
    >>> r["graphs_compiled_after_warmup"], sorted(r["check_seconds"])
    (0, ['640x512'])
    """
    from .loading import load_pipeline

    t0 = time.perf_counter()
    pipe = load_pipeline(**pipeline_options)
    load_s = time.perf_counter() - t0
    warmup = pipe.warmup(sizes, accelerations=accelerations)
    graphs = compiled_graphs()
    check = {}
    for width, height in check_sizes:
        t1 = time.perf_counter()
        for level in accelerations:
            pipe.generate(
                "check", width=width, height=height, seed=1, num_inference_steps=2, acceleration=level, progress=False
            )
        check[f"{width}x{height}"] = time.perf_counter() - t1
    return {
        "config": pipe.config.describe(),
        "optimizations": pipe.optimized.steps,
        "load_seconds": load_s,
        "warmup_seconds": warmup,
        # The first 2-step generation, compile (or cache load) included: the cold/warm start figure.
        "first_call_seconds": next(iter(warmup.values())),
        "graphs_compiled_by_warmup": graphs,
        "graphs_compiled_after_warmup": compiled_graphs() - graphs,
        "check_seconds": check,
        "compile_cache": cache_counters(),
        "cache_file": None if pipe.optimized.cache_file is None else str(pipe.optimized.cache_file),
    }
