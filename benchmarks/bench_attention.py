"""Attention benchmark at Flux shapes: our Triton kernels against every SDPA backend, in one run.

Every candidate is timed with the prologue it needs (q/k RMSNorm, RoPE, text+image concat), from the
same projection outputs, so the numbers compare whole attention calls. For each image size the text
stream is 512 tokens and the image stream (width/16)·(height/16). Reported per candidate: median ms,
TFLOP/s (4·S²·D per head), ratio to the best stock SDPA backend, and relative error against an fp32
reference computed from the same bf16 inputs.

    python benchmarks/bench_attention.py --out benchmarks/results/attention-h100.json
    python benchmarks/bench_attention.py --smoke --out /tmp/a.json     # CPU, Triton interpreter

The rivals: every SDPA backend after the eager prologue, the prologue compiled by Inductor then
cuDNN / flash SDPA (what ``compile=True`` runs with ``attention="sdpa"``), bare cuDNN SDPA on
prepared q/k/v (no prologue: the bar for the attention itself) and SageAttention's INT8 kernels
(``sageattention``, PyPI 1.0.6: Triton INT8 q·kᵀ + fp16 p·v) after the compiled prologue and bare: the
8-bit rival, rows marked ``skipped`` with the reason where it cannot run (no CUDA, not installed).
Errors: relative L2 and L1 (Σ|O−O′|/Σ|O|, the 8-bit papers' measure) and cosine similarity against fp32.
Goals (issues 10 and 18, H100/H200, 4608 tokens): ``triton`` ≤ 0.45 ms and ≥ 1.0× the compiled rival;
``triton-int8`` ≤ 0.36 ms, relative L1 ≤ 1.5e-2; ``triton-int8-fp8`` ≤ 0.30 ms, relative L1 ≤ 4.5e-2.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

SIZES = {"1024x768": (1024, 768), "1440x512": (1440, 512), "1024x1024": (1024, 1024), "1536x1536": (1536, 1536)}


def _timer(fn, device: str, warmup: int, repeats: int) -> list[float]:
    import torch

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def candidates(device: str, sweep: bool = False):
    """(name, kind, callable(inputs) -> out) for every backend that can run on ``device``.

    ``bare-*`` rows time SDPA alone on already normalised, rotated, concatenated q/k/v (the bar for
    the attention itself); ``compiled-*`` rows compile the stock prologue with Inductor (fused norm +
    RoPE + concat, as under ``compile=True``) before SDPA: the fair rival of our fused kernels.
    """
    import functools

    import torch
    from torch.nn.attention import SDPBackend

    from srpo_infer.attention import flux_attention_reference

    out = [("sdpa-default", "stock", lambda x: flux_attention_reference(x))]
    # Inductor's C++ build makes the CPU smoke slow; aot_eager traces the same graph without it.
    compile_backend = "inductor" if device == "cuda" else "aot_eager"

    def compiled(backend=None):
        return torch.compile(
            functools.partial(flux_attention_reference, sdpa_backend=backend), fullgraph=True, backend=compile_backend
        )

    out.append(("compiled-sdpa-default", "stock", compiled()))
    out += _sageattention(device, compile_backend)
    if device == "cuda":
        pinned = (
            ("sdpa-flash", SDPBackend.FLASH_ATTENTION),
            ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION),
            ("sdpa-efficient", SDPBackend.EFFICIENT_ATTENTION),
            ("sdpa-math", SDPBackend.MATH),
        )
        for name, backend in pinned:
            out.append((name, "stock", lambda x, b=backend: flux_attention_reference(x, sdpa_backend=b)))
        out.append(("compiled-sdpa-cudnn", "stock", compiled(SDPBackend.CUDNN_ATTENTION)))
        out.append(("compiled-sdpa-flash", "stock", compiled(SDPBackend.FLASH_ATTENTION)))
        out.append(("bare-sdpa-cudnn", "bare", _bare(SDPBackend.CUDNN_ATTENTION)))
    return out + ours(device, sweep)


class Skipped(str):
    """A candidate that cannot run here: its row carries ``skipped`` (this reason) and no timing."""


def _sageattention(device: str, compile_backend: str):
    """SageAttention 1.0.6 (Triton INT8 q·kᵀ with K smoothed, fp16 p·v: our ``triton-int8``'s direct
    peer) after the compiled stock prologue, and bare: the published 8-bit rival. Skipped, with the
    reason in its rows, where it cannot run (no CUDA, or ``sageattention`` is not installed: the GPU
    run carries its wheel, see benchmarks/gpu_run.sh)."""
    names = (("sageattention", "rival"), ("bare-sageattention", "bare"))
    if device != "cuda":
        return [(name, kind, Skipped("needs CUDA (SageAttention's kernels are CUDA-only)")) for name, kind in names]
    try:
        from sageattention import sageattn
    except Exception as exc:  # not installed, or its import fails on this GPU
        reason = Skipped(
            f"sageattention does not import ({type(exc).__name__}: {str(exc)[:120]}); pip install sageattention==1.0.6"
        )
        return [(name, kind, reason) for name, kind in names]
    import torch

    from srpo_infer.attention import attention_prologue

    prologue = torch.compile(attention_prologue, fullgraph=True, backend=compile_backend)

    def full(x):
        return sageattn(*prologue(x), tensor_layout="HND", is_causal=False).transpose(1, 2).flatten(2)

    bare = _bare(None, lambda q, k, v: sageattn(q, k, v, tensor_layout="HND", is_causal=False))
    return [("sageattention", "rival", full), ("bare-sageattention", "bare", bare)]


def ours(device: str, sweep: bool = False):
    """Our kernels: each backend and design autotuned (``triton``, ``triton-int8/tma``, ...) and, with
    ``sweep``, every candidate configuration of each on its own (``triton/tma/128x64w4s3``)."""
    import torch
    from srpo_infer.kernels.configs import MODES, candidates
    from srpo_infer.kernels.launch import DESIGNS, flux_attention

    from srpo_infer.attention import KERNEL_MODES, attend

    capability = torch.cuda.get_device_capability() if device == "cuda" else None
    backends = [b for b, m in KERNEL_MODES.items() if capability is None or capability >= MODES[m].min_capability]
    # tma: sm >= 90 (or the interpreter); ws: Hopper itself, never the interpreter (Gluon has none).
    designs = [
        d
        for d in DESIGNS
        if (d != "tma" or capability is None or capability >= (9, 0))
        and (d != "ws" or (capability is not None and capability[0] == 9))
    ]
    rows = []
    for backend in backends:
        for design in designs:
            label = backend if design == "pointer" else f"{backend}/{design}"
            with_design = lambda x, b=backend, d=design: _with_design(d, attend, x, b)  # noqa: E731
            rows.append((label, "ours", with_design))
        if not sweep:
            continue
        mode = KERNEL_MODES[backend]
        for design in designs:
            if design == "ws":  # one configuration per mode: its autotuned row is the whole sweep
                continue
            for c in candidates(mode):
                fn = lambda x, m=mode, d=design, c=c: flux_attention(x, mode=m, design=d, config=c)  # noqa: E731
                rows.append((f"{backend}/{design}/{c.tag}", "sweep", fn))
    return rows


def _with_design(design: str, fn, *args):
    """Run ``fn`` with ``$SRPO_ATTENTION_DESIGN`` set: the public seam (:func:`attend`) picks the design from it."""
    from srpo_infer.kernels.launch import DESIGN_ENV

    old = os.environ.get(DESIGN_ENV)
    os.environ[DESIGN_ENV] = design
    try:
        return fn(*args)
    finally:
        if old is None:
            os.environ.pop(DESIGN_ENV)
        else:
            os.environ[DESIGN_ENV] = old


def _bare(backend, attention=None):
    """SDPA (or ``attention(q, k, v)``) alone on ``[B, H, S, D]`` q/k/v prepared (outside the timing)
    from the same inputs."""
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    from srpo_infer.attention import attention_prologue

    prepared: dict[int, tuple] = {}

    def fn(kw):
        if id(kw) not in prepared:
            prepared.clear()
            prepared[id(kw)] = tuple(t.contiguous() for t in attention_prologue(kw))
        if attention is not None:
            return attention(*prepared[id(kw)]).transpose(1, 2).flatten(2)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(*prepared[id(kw)]).transpose(1, 2).flatten(2)

    return fn


def run(args: argparse.Namespace, on_update=None) -> dict:
    import torch
    import triton
    from srpo_infer.kernels.launch import tuned_configs

    from srpo_infer.attention import flux_attention_reference, random_attention_inputs
    from srpo_infer.bench.deviation import cosine_similarity, relative_error, relative_l1
    from srpo_infer.bench.flops import attention_flops

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    if args.smoke:
        # Interpreter: tiny shapes in fp16 (bf16 dots are wrong there); this checks the harness only.
        shapes = {"smoke": dict(s_txt=5, s_img=27, heads=2, head_dim=32)}
        dtype, warmup, repeats = torch.float16, 0, 1
    else:
        shapes = {
            name: dict(s_txt=512, s_img=(w // 16) * (h // 16), heads=24, head_dim=128)
            for name, (w, h) in SIZES.items()
            if name in args.sizes
        }
        dtype, warmup, repeats = torch.bfloat16, args.warmup, args.repeats
    rows: list[dict] = []

    def result() -> dict:
        # "Best stock" is the fastest complete stock path (prologue included), bare SDPA excluded.
        for size in {r["size"] for r in rows}:
            stock = [r["ms"] for r in rows if r["size"] == size and r["kind"] == "stock" and "ms" in r]
            for r in rows:
                if stock and r["size"] == size and "ms" in r:
                    r["speedup_vs_best_stock"] = min(stock) / r["ms"]
        return dict(
            benchmark="attention",
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            device=torch.cuda.get_device_name() if device == "cuda" else f"cpu ({platform.processor() or 'unknown'})",
            interpreter=os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"),
            versions=dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version()),
            dtype=str(dtype).replace("torch.", ""),
            warmup=warmup,
            repeats=repeats,
            tuned_configs=tuned_configs(),  # the autotuner's block-size choice per (sequence bucket, head_dim)
            rows=rows,
        )

    for size, shape in shapes.items():
        kw = random_attention_inputs(
            1, shape["heads"], shape["head_dim"], shape["s_txt"], shape["s_img"], dtype, device, seed=1
        )
        tokens = shape["s_txt"] + shape["s_img"]
        flops = attention_flops(1, shape["heads"], shape["head_dim"], tokens)
        reference = flux_attention_reference(kw.to(torch.float32))
        for name, kind, fn in candidates(device, args.sweep):
            row = dict(size=size, tokens=tokens, candidate=name, kind=kind)
            if isinstance(fn, Skipped):
                rows.append(dict(row, skipped=str(fn)))
                print(json.dumps(rows[-1]), file=sys.stderr)
                continue
            try:
                out = fn(kw)
                row["rel_err_vs_fp32"] = relative_error(out, reference)
                row["rel_l1_vs_fp32"] = relative_l1(out, reference)
                row["cosine_vs_fp32"] = cosine_similarity(out, reference)
                times = _timer(lambda fn=fn, kw=kw: fn(kw), device, warmup, repeats)
                row["ms"] = statistics.median(times)
                row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
            except Exception as exc:  # a backend that cannot run or compile this shape (OOM, unsupported)
                row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                if device == "cuda":
                    torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
            if on_update is not None:  # a run cut short by its time box keeps every row so far
                on_update(result())
    return result()


def markdown(result: dict) -> str:
    """The rows as a Markdown table."""
    lines = [
        f"Attention on {result['device']} ({result['dtype']}, {result['date']})",
        "",
        "| size | tokens | candidate | ms | TFLOP/s | × best stock | rel. L2 vs fp32 | rel. L1 | cosine |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "ms" not in r:
            why = r.get("error") or f"skipped: {r['skipped']}"
            lines.append(f"| {r['size']} | {r['tokens']} | {r['candidate']} | – | – | – | {why} | | |")
            continue
        lines.append(
            f"| {r['size']} | {r['tokens']} | {r['candidate']} | {r['ms']:.3f} | {r['tflops']:.1f} | "
            f"{r.get('speedup_vs_best_stock', float('nan')):.2f} | {r['rel_err_vs_fp32']:.2e} | "
            f"{r['rel_l1_vs_fp32']:.2e} | {r['cosine_vs_fp32']:.6f} |"
        )
    return "\n".join([*lines, "", *summary(result)])


# Per backend: (ms at 4608 tokens, × the compiled rival at every size, relative L1 vs fp32). bf16:
# issue 10 (its L1 bound is the GPU tests' L2 bound, 1e-2); 8-bit: issue 18 (no ratio goal).
GOALS = {"triton": (0.45, 1.0, 1e-2), "triton-int8": (0.36, 0.0, 1.5e-2), "triton-int8-fp8": (0.30, 0.0, 4.5e-2)}


def summary(result: dict) -> list[str]:
    """Per size: the compiled rival, the fastest row of each of our backends, and its goals
    (:data:`GOALS`; the ms goals at 4608 tokens, the ratios at every size), read off the rows."""
    lines = [
        "| size | rival: compiled prologue + SDPA | ours | fastest row | ms | × rival | rel. L1 | goal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    goals = GOALS
    for size in dict.fromkeys(r["size"] for r in result["rows"]):
        rows = [r for r in result["rows"] if r["size"] == size and "ms" in r]
        rivals = [r for r in rows if r["candidate"].startswith("compiled-sdpa")]
        if not rivals:
            continue
        rival = min(rivals, key=lambda r: r["ms"])
        for mode, (ms_goal, ratio_goal, err_goal) in goals.items():
            mine = [r for r in rows if r["kind"] in ("ours", "sweep") and r["candidate"].split("/")[0] == mode]
            if not mine:
                continue
            best = min(mine, key=lambda r: r["ms"])
            ratio = rival["ms"] / best["ms"]
            ok = ratio >= ratio_goal and best["rel_l1_vs_fp32"] <= err_goal
            ok = ok and (best["ms"] <= ms_goal if best["tokens"] == 4608 else True)  # ms goals are at 4608
            verdict = "met" if ok else "not met"
            lines.append(
                f"| {size} | {rival['candidate']} {rival['ms']:.3f} ms | {mode} | {best['candidate']} | "
                f"{best['ms']:.3f} | {ratio:.2f} | {best['rel_l1_vs_fp32']:.2e} | {verdict} |"
            )
    return lines if len(lines) > 2 else []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="write the JSON here (a .md table goes beside it)")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    parser.add_argument("--sweep", action="store_true", help="also time every kernel configuration of each design")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")

    def write(result: dict) -> None:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2) + "\n")
            args.out.with_suffix(".md").write_text(markdown(result) + "\n")

    print(markdown(run(args, on_update=write)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
