"""Step time and host time per denoising step, with and without CUDA graphs (issue 42), on one GPU.

For each setting (compile scope × ``cuda_graphs``), a pipeline is loaded and warmed up at the size, then
one request runs ``--steps`` steps. Around every step, the loop's own callbacks take three clocks:
``should_stop`` (before the step: the GPU is synchronised, time t0), ``on_step`` (after it: t1 when the
host has enqueued the step, then a synchronise, t2). Host time per step = t1 - t0 (what the host spends
launching a step's work); step time = t2 - t0. Medians over the steps after the first. The results file
is rewritten after every setting, so a run cut short keeps what it measured.

    python benchmarks/cuda_graphs.py --model full-random --size 1440x512 --out cuda-graphs.json

On a CPU (``--model tiny-random``) it runs the same plumbing with CUDA graphs off whatever is asked:
a dry run, not a measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

SETTINGS = (("regional", False), ("regional", True), ("full", True), ("full", False))


def measure(model: str, scope: str, graphs: bool, width: int, height: int, steps: int, backend: str) -> dict:
    import srpo_infer
    from srpo_infer import GenerationRequest

    pipe = srpo_infer.load_pipeline(
        model, progress=False, compile=True, compile_scope=scope, cuda_graphs=graphs, compile_backend=backend
    )
    t_load = time.perf_counter()
    pipe.warmup([(width, height)])
    warmup_s = time.perf_counter() - t_load
    device = pipe.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    starts, host, total = [], [], []

    def before() -> bool:
        sync()
        starts.append(time.perf_counter())
        return False

    def after(step: int, latents: torch.Tensor) -> None:
        enqueued = time.perf_counter()
        sync()
        host.append(enqueued - starts[-1])
        total.append(time.perf_counter() - starts[-1])

    req = GenerationRequest("a lighthouse at dusk", width, height, seed=1, num_inference_steps=steps)
    pipe.run(req, should_stop=before, on_step=after)
    later = slice(1, None) if steps > 1 else slice(None)
    row = {
        "scope": scope,
        "cuda_graphs": pipe.config.cuda_graphs,
        "asked_cuda_graphs": graphs,
        "warmup_s": round(warmup_s, 2),
        "step_ms": round(1000 * statistics.median(total[later]), 2),
        "host_ms_per_step": round(1000 * statistics.median(host[later]), 2),
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }
    del pipe
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="full-random")
    parser.add_argument("--size", default="1440x512", help="WIDTHxHEIGHT (default: the hosted API's headline)")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (eager: a CPU dry run)")
    parser.add_argument("--settings", nargs="*", default=[f"{s}:{int(g)}" for s, g in SETTINGS])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    report = {"model": args.model, "size": args.size, "steps": args.steps, "torch": torch.__version__, "rows": []}
    if torch.cuda.is_available():
        report["gpu"] = torch.cuda.get_device_name()
    for setting in args.settings:
        scope, graphs = setting.split(":")
        try:
            row = measure(args.model, scope, graphs == "1", width, height, args.steps, args.backend)
        except Exception as exc:  # one setting failing must not lose the others
            row = {"scope": scope, "asked_cuda_graphs": graphs == "1", "error": f"{type(exc).__name__}: {exc}"[:500]}
        report["rows"].append(row)
        args.out.write_text(json.dumps(report, indent=2))
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
