"""The 8-bit attention schemes' error at Flux's shape, emulated in float64 on the CPU.

For each input family of :mod:`srpo_infer.bench.quantised_attention` (``random``: the benchmark's inputs
through the stock prologue; ``outliers``: the same with a shared key offset and 4 large q/k channels)
and each seed, it reports the relative L1 error (Σ|O−O′|/Σ|O|, the 8-bit attention papers' measure),
the relative L2 error and the cosine similarity against exact float64 attention of:

- ``stock bf16``: exact attention on bf16-rounded q, k, v (what the unquantised pipeline starts from),
- ``e4m3 q·kᵀ + e4m3 p·v``: the retired ``triton-fp8`` scheme,
- ``int8 q·kᵀ + exact p·v``, smoothed and not: the INT8 q·kᵀ error by itself,
- ``triton-int8``: INT8 q·kᵀ (K smoothed) + bf16 p·v, the accurate mode as the kernel runs it,
- ``triton-int8-fp8``: INT8 q·kᵀ (K smoothed) + e4m3 p·v with two-level accumulation, the fast mode,
- the fast mode with in-place accumulation and without smoothing, to show what each choice buys.

It exits 1 when a shipped mode misses its bound (issue 18: accurate ≤ 1.5e-2 random / 0.08 outliers,
fast ≤ 4.5e-2 / 0.09) on any seed.

    python benchmarks/attention_error.py --out benchmarks/results/cpu-2026-11-29/attention-error.json

No GPU needed; numerics only (an e4m3 cast on the CPU rounds like the GPU's; the reduced-precision
fp8 accumulation is a model, see the module).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

SCHEMES = {  # name → keyword arguments of srpo_infer.bench.quantised_attention.emulate (None: stock bf16)
    "stock bf16": None,
    "e4m3 q·kᵀ + e4m3 p·v (retired triton-fp8)": dict(qk="e4m3", pv="e4m3", smooth_k=False, accumulation="exact"),
    "int8 q·kᵀ smoothed + exact p·v": dict(qk="int8", pv="exact"),
    "int8 q·kᵀ not smoothed + exact p·v": dict(qk="int8", pv="exact", smooth_k=False),
    "triton-int8: int8 q·kᵀ smoothed + bf16 p·v": dict(qk="int8", pv="bfloat16"),
    "triton-int8-fp8: int8 q·kᵀ smoothed + e4m3 p·v, two-level": dict(qk="int8", pv="e4m3"),
    "int8 smoothed + e4m3 p·v, in-place accumulation": dict(qk="int8", pv="e4m3", accumulation="in-place"),
    "int8 not smoothed + e4m3 p·v, two-level": dict(qk="int8", pv="e4m3", smooth_k=False),
}
# The shipped modes' bounds on relative L1, per family (issue 18).
BOUNDS = {
    "triton-int8: int8 q·kᵀ smoothed + bf16 p·v": {"random": 1.5e-2, "outliers": 0.08},
    "triton-int8-fp8: int8 q·kᵀ smoothed + e4m3 p·v, two-level": {"random": 4.5e-2, "outliers": 0.09},
}


def run(args: argparse.Namespace) -> dict:
    import torch

    from srpo_infer.bench.deviation import cosine_similarity, relative_error, relative_l1
    from srpo_infer.bench.quantised_attention import FAMILIES, attention_family, emulate, exact_attention

    rows = []
    for family in FAMILIES:
        for seed in range(1, args.seeds + 1):
            q, k, v = attention_family(family, args.heads, args.s_txt, args.s_img, seed=seed)
            exact = exact_attention(q, k, v)
            for name, kw in SCHEMES.items():
                if kw is None:
                    out = exact_attention(*(t.to(torch.bfloat16) for t in (q, k, v)))
                else:
                    out = emulate(q, k, v, block_n=args.block_n, **kw)
                row = dict(
                    inputs=family,
                    seed=seed,
                    scheme=name,
                    rel_l1=relative_l1(out, exact),
                    rel_l2=relative_error(out, exact),
                    cosine=cosine_similarity(out, exact),
                )
                bound = BOUNDS.get(name, {}).get(family)
                if bound is not None:
                    row["bound"], row["met"] = bound, row["rel_l1"] <= bound
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
    return dict(
        benchmark="attention-error",
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        shape=dict(batch=1, heads=args.heads, head_dim=128, s_txt=args.s_txt, s_img=args.s_img, block_n=args.block_n),
        versions=dict(torch=torch.__version__, python=platform.python_version()),
        rows=rows,
    )


def markdown(result: dict) -> str:
    """Per family and scheme: the worst seed's relative L1 and cosine, and the bound where there is one."""
    shape = result["shape"]
    lines = [
        f"8-bit attention error, emulated in float64 ({shape['s_txt']}+{shape['s_img']} tokens, "
        f"{shape['heads']} heads, D=128, key tiles of {shape['block_n']}; {result['date']}); worst of "
        f"{len({r['seed'] for r in result['rows']})} seed(s)",
        "",
        "| inputs | scheme | rel. L1 | rel. L2 | cosine | bound (rel. L1) |",
        "|---|---|---|---|---|---|",
    ]
    for family in dict.fromkeys(r["inputs"] for r in result["rows"]):
        for scheme in dict.fromkeys(r["scheme"] for r in result["rows"]):
            rows = [r for r in result["rows"] if r["inputs"] == family and r["scheme"] == scheme]
            worst = max(rows, key=lambda r: r["rel_l1"])
            bound = f"{worst['bound']:g} {'met' if worst['met'] else 'NOT MET'}" if "bound" in worst else ""
            lines.append(
                f"| {family} | {scheme} | {worst['rel_l1']:.4f} | {worst['rel_l2']:.4f} | "
                f"{min(r['cosine'] for r in rows):.5f} | {bound} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the JSON here (a .md table goes beside it)")
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--s-txt", type=int, default=512)
    parser.add_argument("--s-img", type=int, default=4096)
    parser.add_argument("--seeds", type=int, default=3, help="input draws per family (the table shows the worst)")
    parser.add_argument("--block-n", type=int, default=128, help="key tile of the emulated kernel")
    args = parser.parse_args(argv)
    result = run(args)
    table = markdown(result)
    print(table)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table + "\n")
    missed = [r for r in result["rows"] if r.get("met") is False]
    for r in missed:
        print(
            f"NOT MET: {r['scheme']} on {r['inputs']} (seed {r['seed']}): rel. L1 {r['rel_l1']:.4f} > {r['bound']}",
            file=sys.stderr,
        )
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
