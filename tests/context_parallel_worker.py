"""Run by the context-parallel tests under ``torchrun``; rank 0 saves what the test compares.

``pipeline OUT WIDTHxHEIGHT:RING[:compile] ...``: each rank generates through the public API with
``context_parallel=WORLD_SIZE``, rank 0 also without it. ``attention OUT BACKEND ...``: each rank runs
Ulysses with our fused kernels on its slice of random attention inputs (awkward lengths), rank 0 also
on the whole.

    python -m torch.distributed.run --standalone --nproc-per-node 2 context_parallel_worker.py \\
        pipeline OUT 1440x512:1 1440x512:2 544x544:auto:compile
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import srpo_infer

STEPS = 8


def pipeline(out: Path, cases: list[str]) -> None:
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    results = {}
    for case in cases:  # WIDTHxHEIGHT:RING_DEGREE[:compile][:triton]
        size, ring, *how = case.split(":")
        width, height = (int(v) for v in size.split("x"))
        options = dict(device="cpu", progress=False, compile="compile" in how)
        reference = srpo_infer.load_pipeline("tiny-random", **options) if rank == 0 else None
        if "triton" in how:
            kernel_as_reference_math()
        pipe = srpo_infer.load_pipeline(
            "tiny-random",
            **options,
            context_parallel=world,
            ring_degree=ring if ring == "auto" else int(ring),
            attention="triton" if "triton" in how else "sdpa",
        )
        request = srpo_infer.validate_request(
            "a T-Rex on a beach", width=width, height=height, seed=11, num_inference_steps=STEPS
        )
        split = pipe.generate_latents(request)
        try:  # refused on every rank alike, before any collective
            pipe.generate("a cat", width=512, height=512, seed=1, acceleration="regular")
            refusal = None
        except ValueError as exc:
            refusal = str(exc)
        if rank == 0:
            results[case] = dict(
                split=split, whole=reference.generate_latents(request), how=pipe.optimized.steps[-1], refusal=refusal
            )
    if rank == 0:
        torch.save(results, out)


def kernel_as_reference_math() -> None:
    """``attention="triton"`` with the kernel's math done by the reference: the pipeline then takes the
    kernels' context-parallel path (projections exchanged, :func:`ulysses_attention`) at a speed the CPU
    allows (the interpreter needs minutes per step at 512²); the kernels themselves run under
    Ulysses in :func:`attention`."""
    import srpo_infer.attention as seam

    os.environ["TRITON_INTERPRET"] = "1"  # lets load_pipeline accept a Triton backend on a CPU
    import srpo_infer.context_parallel as split

    real = seam.attend
    # Both bindings: the processor's (one process) and context_parallel's (Ulysses, the projections moved).
    seam.attend = split.attend = lambda inputs, backend="sdpa", design="auto": real(inputs, "sdpa")


def attention(out: Path, backends: list[str]) -> None:
    from srpo_infer.attention import attend, random_attention_inputs, set_attention_backend
    from srpo_infer.context_parallel import ContextParallel, Degrees, init_process_group, ulysses_attention
    from srpo_infer.tiny import build_tiny_transformer

    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    init_process_group(world, torch.device("cpu"))
    model = build_tiny_transformer()
    set_attention_backend(model, "sdpa")
    ContextParallel(model, Degrees(ring=1, ulysses=world), torch.device("cpu"))
    config = next(iter(model.attn_processors.values()))._parallel_config
    n_txt, n_img = 7, 13  # neither divisible by 2 or 3
    whole = random_attention_inputs(1, 6, 32, n_txt, n_img, torch.float32, seed=4)
    joined = {f"img_{n}": torch.cat([getattr(whole, f"txt_{n}"), getattr(whole, f"img_{n}")], 1) for n in "qkv"}
    single = whole._replace(**joined, txt_q=None, txt_k=None, txt_v=None, txt_norm_q=None, txt_norm_k=None)

    def mine(t: torch.Tensor, real: int) -> torch.Tensor:  # this rank's equal chunk of the padded stream
        return F.pad(t, (0, 0, 0, -real % world)).chunk(world, -2)[rank]

    def local(x):
        rope = [torch.cat([mine(t[:n_txt], n_txt), mine(t[n_txt:], n_img)]) for t in (x.rope_cos, x.rope_sin)]
        if x.txt_q is not None:
            streams = {
                f"{s}_{n}": mine(getattr(x, f"{s}_{n}"), n_txt if s == "txt" else n_img)
                for s in ("txt", "img")
                for n in "qkv"
            }
        else:  # one stream: each rank holds [its text, its image]
            streams = {}
            for n in "qkv":
                t = getattr(x, f"img_{n}")
                streams[f"img_{n}"] = torch.cat([mine(t[:, :n_txt], n_txt), mine(t[:, n_txt:], n_img)], 1)
        return x._replace(**streams, rope_cos=rope[0], rope_sin=rope[1])

    results = {}
    for backend in backends:
        for name, x in (("double", whole), ("single", single)):
            expected = attend(x, backend)
            rope = (x.rope_cos, x.rope_sin)
            split = ulysses_attention(local(x), config, (n_txt, n_img), rope, backend)
            want = torch.cat([mine(expected[:, :n_txt], n_txt), mine(expected[:, n_txt:], n_img)], 1)
            txt_rows = min(max(n_txt - rank * (-(-n_txt // world)), 0), -(-n_txt // world))
            img_rows = min(max(n_img - rank * (-(-n_img // world)), 0), -(-n_img // world))
            keep = torch.cat([torch.arange(txt_rows), -(-n_txt // world) + torch.arange(img_rows)])
            results[(backend, name, rank)] = (split[:, keep] - want[:, keep]).abs().max().item()
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, results)
    if rank == 0:
        torch.save({k: v for r in gathered for k, v in r.items()}, out)


if __name__ == "__main__":
    {"pipeline": pipeline, "attention": attention}[sys.argv[1]](Path(sys.argv[2]), sys.argv[3:])
