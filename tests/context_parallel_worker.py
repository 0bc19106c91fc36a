"""Run by the context-parallel tests under ``torchrun``: each rank generates through the public API
with ``context_parallel=WORLD_SIZE``, rank 0 also without it, and rank 0 saves both sets of latents.

    python -m torch.distributed.run --standalone --nproc-per-node 2 context_parallel_worker.py OUT \\
        1440x512:1 1440x512:2 544x544:auto:compile
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

import srpo_infer

STEPS = 8


def main(out: Path, cases: list[str]) -> None:
    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    results = {}
    for case in cases:  # WIDTHxHEIGHT:RING_DEGREE[:compile]
        size, ring, *how = case.split(":")
        width, height = (int(v) for v in size.split("x"))
        options = dict(device="cpu", progress=False, compile="compile" in how)
        reference = srpo_infer.load_pipeline("tiny-random", **options) if rank == 0 else None
        pipe = srpo_infer.load_pipeline("tiny-random", **options, context_parallel=world,
                                        ring_degree=ring if ring == "auto" else int(ring))  # fmt: skip
        request = srpo_infer.validate_request("a T-Rex on a beach", width=width, height=height, seed=11,
                                              num_inference_steps=STEPS)  # fmt: skip
        split = pipe.generate_latents(request)
        try:  # refused on every rank alike, before any collective
            pipe.generate("a cat", width=512, height=512, seed=1, acceleration="regular")
            refusal = None
        except ValueError as exc:
            refusal = str(exc)
        if rank == 0:
            results[case] = dict(split=split, whole=reference.generate_latents(request),
                                 how=pipe.optimized.steps[-1], refusal=refusal)  # fmt: skip
    if rank == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
