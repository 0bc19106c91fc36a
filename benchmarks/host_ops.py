"""Host work per denoising step at FLUX.1 depth, counted on a CPU: the aten ops one transformer call
dispatches (each one a kernel launch or more on a GPU), eager, after the first step of a request.

The transformer has FLUX.1's 19 double and 38 single blocks at the tiny model's widths, so the counts
are FLUX.1's (op counts do not depend on widths); no GPU time is measured or implied. Also counted:
the ops each part of the model adds (blocks, embedders, the rotary embedding, the step cache's hooks).

    python benchmarks/host_ops.py --out benchmarks/results/cpu-2026-12-07/host-ops.md
"""

from __future__ import annotations

import argparse
import collections
import platform
import subprocess
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

STEPS = 4
PARTS = ("pos_embed", "time_text_embed", "context_embedder", "x_embedder", "norm_out", "proj_out")


class OpCounter(TorchDispatchMode):
    """Counts aten ops, per transformer call and per named part of the model."""

    def __init__(self):
        super().__init__()
        self.total = 0
        self.by_part: collections.Counter = collections.Counter()
        self.part: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.total += 1
        self.by_part[self.part[-1] if self.part else "other"] += 1
        return func(*args, **(kwargs or {}))


def flux_depth_pipeline(**options):
    """An SRPOPipeline over the tiny components, its transformer at FLUX.1's depth (19 + 38 blocks)."""
    from diffusers import FluxTransformer2DModel

    from srpo_infer.config import PipelineConfig
    from srpo_infer.loading import assemble_pipeline
    from srpo_infer.tiny import TINY_TRANSFORMER_CONFIG, build_tiny_base

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**{**TINY_TRANSFORMER_CONFIG, "num_layers": 19, "num_single_layers": 38})
    config = PipelineConfig(model="tiny-random", device="cpu", progress=False, **options).resolved()
    return assemble_pipeline({**build_tiny_base(), "transformer": transformer.eval()}, config)


def count_step_ops(pipe, threshold: float | None) -> tuple[int, collections.Counter, int]:
    """Ops of one transformer call after the first step (median over the later steps), by part."""
    from srpo_infer import GenerationRequest

    counter = OpCounter()
    transformer = pipe.flux.transformer
    handles = []
    for name in PARTS:
        module = getattr(transformer, name)
        handles.append(module.register_forward_pre_hook(lambda m, a, name=name: counter.part.append(name)))
        handles.append(module.register_forward_hook(lambda m, a, o: counter.part.pop() and None))
    for kind, blocks in (
        ("double blocks", transformer.transformer_blocks),
        ("single blocks", transformer.single_transformer_blocks),
    ):
        for block in blocks:
            handles.append(block.register_forward_pre_hook(lambda m, a, kind=kind: counter.part.append(kind)))
            handles.append(block.register_forward_hook(lambda m, a, o: counter.part.pop() and None))
    per_call, parts = [], []
    handles.append(transformer.register_forward_pre_hook(lambda m, a: per_call.append(counter.total)))

    def after(m, a, o):
        per_call[-1] = counter.total - per_call[-1]
        parts.append(counter.by_part.copy())
        counter.by_part.clear()

    handles.append(transformer.register_forward_hook(after))
    req = GenerationRequest("a lighthouse at dusk", 512, 512, seed=1, num_inference_steps=STEPS)
    try:
        with counter:
            result = pipe.run(req, cache_threshold=threshold)
    finally:
        for handle in handles:
            handle.remove()
    later = sorted(range(1, len(per_call)), key=lambda i: per_call[i])
    middle = later[len(later) // 2]
    return per_call[middle], parts[middle], result.transformer_evaluations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the table here (markdown)")
    args = parser.parse_args()
    pipe = flux_depth_pipeline()  # eager: a dispatch mode cannot count inside compiled graphs
    rows = []
    for label, threshold in (("acceleration none", None), ("a skipped step (threshold 1e9)", 1e9)):
        total, parts, evaluations = count_step_ops(pipe, threshold)
        rows.append((label, total, parts, evaluations))
    # A server with --lora-dir: a slot on every attention projection, a request naming no LoRA.
    attention = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj")
    layers = [
        f"transformer.{name}"
        for name, _ in pipe.flux.transformer.named_modules()
        if name.endswith(attention) and "blocks." in name
    ]
    total, parts, evaluations = count_step_ops(flux_depth_pipeline(lora_slot=tuple(layers)), None)
    rows.append((f"acceleration none, a LoRA slot on {len(layers)} layers", total, parts, evaluations))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        f"# Ops per transformer call at FLUX.1 depth (19 + 38 blocks), eager, steps 2–{STEPS} (median)",
        "",
        f"commit {commit}; torch {torch.__version__}; Python {platform.python_version()}; {platform.machine()}",
        "",
        "| step | aten ops | " + " | ".join(sorted({p for r in rows for p in r[2]})) + " |",
        "|---|---|" + "---|" * len({p for r in rows for p in r[2]}),
    ]
    names = sorted({p for r in rows for p in r[2]})
    for label, total, parts, _ in rows:
        lines.append(f"| {label} | {total} | " + " | ".join(str(parts.get(n, 0)) for n in names) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    sys.exit(main())
