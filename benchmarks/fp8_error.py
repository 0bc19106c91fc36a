"""Where fp8 attention's error comes from: the ``triton-fp8`` scheme emulated in float64 on the CPU.

At a real Flux shape (512 text + 4096 image tokens, head dim 128, a few heads), on the random inputs
the tests and the attention benchmark use and on the same inputs with outlier channels, it reports
the relative L2 error against exact attention of:

- ``stock bf16``: SDPA on bf16 inputs (what the unquantised pipeline does),
- ``fp8 q·k only`` / ``fp8 p·v only``: one matmul quantised as the kernel does, the other exact,
- ``fp8 (kernel)``: both, i.e. the kernel's scheme (see ``srpo_infer.attention.fp8_attention_emulation``),
- variants the kernel does *not* use, to show why: K smoothed (the mean key subtracted first, as
  SageAttention does) and one q/k scale per 128-token tile instead of per token.

    python benchmarks/fp8_error.py --out benchmarks/results/cpu-2026-11-26/fp8-error.json

No GPU needed; numerics only (an e4m3 cast on the CPU rounds like the GPU's).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import sys
from pathlib import Path


def _quant(x, dim):
    import torch

    scale = x.abs().amax(dim, keepdim=True).clamp_min(1e-12) / 448
    return (x / scale).to(torch.float8_e4m3fn).to(torch.float64) * scale


def _per_tile(x, tile=128):
    import torch

    return torch.cat([_quant(x[:, :, i : i + tile], (-1, -2)) for i in range(0, x.shape[2], tile)], 2)


def _attend(q, k, v, quantised_p: bool = True):
    import torch

    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = torch.exp(s - s.amax(-1, keepdim=True))
    denominator = p.sum(-1, keepdim=True)
    if quantised_p:
        p = (p * 256).to(torch.float8_e4m3fn).to(torch.float64) / 256
    return p @ v / denominator


def schemes():
    """(name, fn(q, k, v, x) -> out) on normalised, rotated float64 ``[B, H, S, D]`` inputs."""
    from srpo_infer.attention import flux_attention_reference, fp8_attention_emulation

    def stock_bf16(q, k, v, x):
        import torch

        return flux_attention_reference(x.to(torch.bfloat16)).double().unflatten(-1, (x.heads, -1)).transpose(1, 2)

    def smoothed(q, k, v, x):
        k = k - k.mean(2, keepdim=True)  # softmax-invariant: shifts each query's scores by a constant
        return _attend(_quant(q, -1), _quant(k, -1), _quant(v, -2))

    return [
        ("stock bf16", stock_bf16),
        ("fp8 q·k only", lambda q, k, v, x: fp8_attention_emulation(q, k, v, fp8_pv=False)),
        ("fp8 p·v only", lambda q, k, v, x: fp8_attention_emulation(q, k, v, fp8_qk=False)),
        ("fp8 (kernel)", lambda q, k, v, x: fp8_attention_emulation(q, k, v)),
        ("fp8, K smoothed", smoothed),
        ("fp8, q/k per 128-token tile", lambda q, k, v, x: _attend(_per_tile(q), _per_tile(k), _quant(v, -2))),
    ]


def inputs(kind: str, heads: int, s_txt: int, s_img: int):
    """The benchmark's random inputs; ``outliers`` adds what real activations have: a few key channels
    with a large shared offset, a few large query channels, one large value channel."""
    import torch

    from srpo_infer.attention import random_attention_inputs

    x = random_attention_inputs(1, heads, 128, s_txt, s_img, torch.float32, seed=1)
    if kind == "outliers":
        for name, channel, factor, offset in (("k", 5, 1.0, 8.0), ("k", 77, 1.0, -6.0), ("q", 20, 6.0, 0.0),
                                              ("v", 3, 20.0, 0.0)):  # fmt: skip
            for stream in ("img", "txt"):
                t = getattr(x, f"{stream}_{name}").unflatten(-1, (heads, -1)).clone()
                t[..., channel] = t[..., channel] * factor + offset
                x = x._replace(**{f"{stream}_{name}": t.flatten(-2)})
    return x.to(torch.float64)


def run(args: argparse.Namespace) -> dict:
    import torch

    from srpo_infer.attention import attention_prologue
    from srpo_infer.deviation import relative_error

    rows = []
    for kind in ("random", "outliers"):
        x = inputs(kind, args.heads, args.s_txt, args.s_img)
        q, k, v = attention_prologue(x)
        exact = _attend(q, k, v, quantised_p=False)
        score_std = (q @ k.transpose(-1, -2) / math.sqrt(128)).std().item()
        for name, fn in schemes():
            row = dict(inputs=kind, scheme=name, rel_err=relative_error(fn(q, k, v, x), exact), score_std=score_std)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return dict(
        benchmark="fp8-error",
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        shape=dict(batch=1, heads=args.heads, head_dim=128, s_txt=args.s_txt, s_img=args.s_img),
        versions=dict(torch=torch.__version__, python=platform.python_version()),
        rows=rows,
    )


def markdown(result: dict) -> str:
    shape = result["shape"]
    lines = [f"fp8 attention error, emulated in float64 ({shape['s_txt']}+{shape['s_img']} tokens, "
             f"{shape['heads']} heads, D=128; {result['date']})", "",
             "| inputs | score std | scheme | rel. L2 error vs exact |", "|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        lines.append(f"| {r['inputs']} | {r['score_std']:.2f} | {r['scheme']} | {r['rel_err']:.2e} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the JSON here (a .md table goes beside it)")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--s-txt", type=int, default=512)
    parser.add_argument("--s-img", type=int, default=4096)
    args = parser.parse_args(argv)
    result = run(args)
    table = markdown(result)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
