"""Relative L1 of the ``ws`` kernel's emulated schedule against float64 attention, beside the current
kernels' (the standard schedule's emulation, which the interpreted kernels match to 2e-4) and plain
bf16 SDPA, at Flux's 1440×512 and 1024×1024 token counts, on both input families. CPU only.

    python benchmarks/ws_emulation_error.py --out benchmarks/results/cpu-2026-12-07/ws-emulation.md
"""

from __future__ import annotations

import argparse
import datetime
from pathlib import Path

STANDARD = {
    "native": dict(qk="exact", pv="bfloat16"),
    "int8": dict(qk="int8", pv="bfloat16"),
    "int8-fp8": dict(qk="int8", pv="e4m3"),
}


def main(argv: list[str] | None = None) -> int:
    import torch

    from srpo_infer.bench.deviation import relative_l1
    from srpo_infer.bench.quantised_attention import FAMILIES, attention_family, emulate, exact_attention
    from srpo_infer.bench.ws_schedule import emulate_ws

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    lines = [
        f"ws emulation vs float64 attention ({datetime.date.today()}, CPU, {args.heads} head(s), D = 128, "
        "bf16 inputs; relative L1 = Σ|O − O′| / Σ|O|)",
        "",
        "| tokens | inputs | mode | ws (emulated) | current kernels (standard schedule) | bf16 SDPA |",
        "|---|---|---|---|---|---|",
    ]
    for s_img in (2880, 4096):
        for family in FAMILIES:
            q, k, v = attention_family(family, heads=args.heads, s_img=s_img)
            exact = exact_attention(q, k, v)
            bf16 = [t.to(torch.bfloat16).double() for t in (q, k, v)]
            sdpa = torch.nn.functional.scaled_dot_product_attention(*(t.to(torch.bfloat16) for t in (q, k, v)))
            for mode, formats in STANDARD.items():
                ws = relative_l1(emulate_ws(q, k, v, mode).double(), exact)
                standard = relative_l1(emulate(*bf16, **formats), exact)
                sdpa_error = relative_l1(sdpa.double(), exact)
                lines.append(f"| {512 + s_img} | {family} | {mode} | {ws:.4f} | {standard:.4f} | {sdpa_error:.4f} |")
                print(lines[-1], flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
