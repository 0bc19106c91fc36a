"""Hopper (and Ampere/Ada) checks of the attention kernels on a machine without a GPU.

Triton compiles for a GPU it does not have: ``triton.compile`` with a ``GPUTarget`` runs down to the
``ptxas`` its wheel ships, no driver needed. For every kernel the launcher would run — the stats pass,
the pre-pass and the attention kernel, per mode, load design and autotuning candidate — this builds the
launch exactly as :func:`srpo_infer.kernels.launch.plan` does on CPU tensors of Flux's shape (1 × 24
heads × 128, 512 + 4096 tokens), binds the arguments through the kernel's own binder, compiles for
sm_90a (and sm_80 / sm_89 where the mode runs there) and reads off:

- registers and spills (``ptxas -v`` on the kernel's PTX; a spill is local-memory traffic per thread),
- shared memory (``metadata.shared``) against the architecture's per-block limit,
- the tensor-core instructions (``wgmma`` / ``mma`` operand types: ``bf16``, ``s8``, ``e4m3``),
- TMA bulk tensor copies (``cp.async.bulk.tensor``) for the ``tma`` design.

It writes ``static.json`` (a row per kernel × mode × design × config × target) and ``static.md``,
and exits 1 when any shipped candidate fails to compile, spills, needs more shared memory than the
architecture has, when an 8-bit mode's q·kᵀ is not an ``s8`` MMA (or its p·v not ``e4m3``), or when
a ``tma`` kernel has no bulk tensor copy. CI runs it after the test suite.

    python benchmarks/kernel_static.py --out benchmarks/results/static-2026-11-29

Timing, numerics and whether the driver accepts the binary still need a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Per-block shared memory a kernel may use (CUDA's opt-in maximum), by compute capability.
SMEM_LIMIT = {(9, 0): 232448, (8, 0): 166912, (8, 9): 101376}
TARGETS = ((9, 0), (8, 0), (8, 9))
SHAPE = dict(batch=1, heads=24, head_dim=128, s_txt=512, s_img=4096)


def _inputs():
    """CPU tensors of Flux's shape (never read: only their dtypes, strides and alignment matter)."""
    import torch

    from srpo_infer.attention import AttentionInputs

    b, h, d, st, si = (SHAPE[k] for k in ("batch", "heads", "head_dim", "s_txt", "s_img"))

    def t(*shape):
        return torch.empty(*shape, dtype=torch.bfloat16)

    return AttentionInputs(t(b, si, h * d), t(b, si, h * d), t(b, si, h * d), t(d), t(d), t(st + si, d),
                           t(st + si, d), h, t(b, st, h * d), t(b, st, h * d), t(b, st, h * d), t(d), t(d))  # fmt: skip


def jobs() -> list[dict]:
    """Every (kernel, mode, design, config, target) the launcher can run, as picklable job specs."""
    from srpo_infer.kernels.launch import DESIGNS, MODES, gpu_candidates

    out = []
    for target in TARGETS:
        for mode, flags in MODES.items():
            if target < flags.min_capability:
                continue
            for kernel in (["stats"] if flags.qk_int8 or flags.pv_fp8 else []) + ["prologue"]:
                out.append(dict(kernel=kernel, mode=mode, design="-", config=None, target=target))
            for design in DESIGNS:
                if design == "tma" and target < (9, 0):
                    continue
                for config in gpu_candidates(mode, target):
                    out.append(dict(kernel="attention", mode=mode, design=design, config=tuple(config), target=target))
    return out


def _ptxas(ptx: str, arch: str) -> str:
    """``ptxas -v`` on the PTX with the wheel's own ptxas (the newest that accepts this PTX version)."""
    import triton

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        errors = []
        for name in ("ptxas-blackwell", "ptxas"):
            if not (tools / name).exists():
                continue
            command = [str(tools / name), "-v", f"--gpu-name={arch}", str(src), "-o", str(Path(tmp) / "k.o")]
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode == 0:
                return run.stderr
            errors.append(run.stderr.strip().splitlines()[-1] if run.stderr.strip() else f"rc {run.returncode}")
    raise RuntimeError(f"ptxas failed: {errors}")


def _compile(launch, target: tuple[int, int]):
    """``triton.compile`` of one planned launch for ``target``, through the kernel's own argument binder."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    gpu = GPUTarget("cuda", target[0] * 10 + target[1], 32)
    backend = make_backend(gpu)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*launch.args, **launch.meta)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.meta, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=gpu, options=options.__dict__)


def _mma_types(ptx: str) -> list[str]:
    """Operand types of the tensor-core instructions: ``["bf16", "s8", "e4m3"]``…"""
    found = set()
    for instr in re.findall(r"\b(?:wgmma\.mma_async|mma)\.sync\.aligned\.\S+", ptx):
        found.update(t for t in ("bf16", "f16", "tf32", "s8", "e4m3", "e5m2") if f".{t}" in instr)
    return sorted(found)


def _fp8_dot_accumulators(ttgir: str) -> list[str]:
    """For each dot with fp8 operands in the TTGIR, whether its accumulator is a fresh zero (two-level
    accumulation: the tile's sum is added to the fp32 total afterwards) or a running value (in place)."""
    zeros = set(re.findall(r"(%\S+) = arith\.constant dense<0\.0+e\+00> : tensor<\d+x\d+xf32", ttgir))
    kinds = []
    for line in ttgir.splitlines():
        m = re.search(r"= (?:ttng\.warp_group_dot|tt\.dot) (%\S+), (%\S+), (%[^\s,]+)", line)
        if m and "f8E4M3" in line:
            kinds.append("fresh" if m.group(3) in zeros else "in-place")
    return kinds


def check(job: dict) -> dict:
    """Compile one job and measure it; never raises (a failure is a row with ``compiled: false``)."""
    from srpo_infer.kernels.launch import MODES, KernelConfig, plan

    target = tuple(job["target"])
    arch = f"sm_{target[0]}{target[1]}{'a' if target >= (9, 0) else ''}"
    config = KernelConfig(*job["config"]) if job["config"] else None
    row = dict(kernel=job["kernel"], mode=job["mode"], design=job["design"],
               config=config.tag if config else "-", target=arch, smem_limit=SMEM_LIMIT[target])  # fmt: skip
    t0 = time.perf_counter()
    try:
        design = job["design"] if job["design"] != "-" else "pointer"
        launches, _ = plan(_inputs(), job["mode"], design=design, config=config, capability=target)
        launch = next(item for item in launches if item.name == job["kernel"])
        compiled = _compile(launch, target)
        ptx = compiled.asm["ptx"]
        log = _ptxas(ptx, arch)
        row.update(
            compiled=True,
            regs=int(re.search(r"Used (\d+) registers", log).group(1)),
            spill_bytes=sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)),
            stack_bytes=int((re.search(r"(\d+) bytes stack frame", log) or [0, 0])[1]),
            smem_bytes=int(compiled.metadata.shared),
            mma=_mma_types(ptx),
            tma_copies=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
        )
        if MODES[job["mode"]].pv_fp8 and job["kernel"] == "attention":
            row["fp8_accumulators"] = _fp8_dot_accumulators(compiled.asm["ttgir"])
    except Exception as exc:  # a compile error is a finding, not a crash of the check
        row.update(compiled=False, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}")
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["problems"] = problems(row)
    return row


def problems(row: dict) -> list[str]:
    """What is wrong with one row (empty: the kernel is fine as far as a compile can tell)."""
    from srpo_infer.kernels.launch import MODES

    if not row["compiled"]:
        return [f"does not compile: {row['error']}"]
    found = []
    if row["spill_bytes"]:
        found.append(f"spills {row['spill_bytes']} bytes per thread")
    if row["smem_bytes"] > row["smem_limit"]:
        need, limit = row["smem_bytes"] // 1024, row["smem_limit"] // 1024
        found.append(f"needs {need} KiB of shared memory, the limit is {limit}")
    if row["kernel"] == "attention":
        flags = MODES[row["mode"]]
        if flags.qk_int8 and "s8" not in row["mma"]:
            found.append(f"q·kᵀ is not an INT8 MMA (MMA types {row['mma']})")
        if flags.pv_fp8 and "e4m3" not in row["mma"]:
            found.append(f"p·v is not an e4m3 MMA (MMA types {row['mma']})")
        accumulators = row.get("fp8_accumulators", [])
        if flags.pv_fp8 and (not accumulators or "in-place" in accumulators):
            found.append(f"p·v is not accumulated in two levels (fp8 dot accumulators: {accumulators or 'none found'})")
        if row["design"] == "tma" and not row["tma_copies"]:
            found.append("the tma design issues no cp.async.bulk.tensor")
    return found


def markdown(result: dict) -> str:
    lines = [f"Attention kernels compiled for GPUs that are not here (triton {result['versions']['triton']}, "
             f"{result['date']}; Flux shape {SHAPE['heads']} heads × {SHAPE['head_dim']}, "
             f"{SHAPE['s_txt']}+{SHAPE['s_img']} tokens)", "",
             "| target | kernel | mode | design | config | regs | spill B | smem KiB (limit) | MMA | TMA copies "
             "| problems |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in result["rows"]:
        if not r["compiled"]:
            lines.append(f"| {r['target']} | {r['kernel']} | {r['mode']} | {r['design']} | {r['config']} "
                         f"| – | – | – | – | – | {'; '.join(r['problems'])} |")  # fmt: skip
            continue
        lines.append(
            f"| {r['target']} | {r['kernel']} | {r['mode']} | {r['design']} | {r['config']} | {r['regs']} | "
            f"{r['spill_bytes']} | {r['smem_bytes'] / 1024:.0f} ({r['smem_limit'] // 1024}) | "
            f"{' '.join(r['mma']) or '–'} | {r['tma_copies']} | {'; '.join(r['problems']) or 'ok'} |"
        )
    bad = sum(bool(r["problems"]) for r in result["rows"])
    lines += ["", f"{len(result['rows'])} kernels, {bad} with problems."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for static.json and static.md")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles in parallel")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: this compiles the kernels for real GPUs")
    import torch
    import triton

    t0 = time.perf_counter()
    todo = jobs()
    print(f"compiling {len(todo)} kernels for {', '.join(f'sm_{a}{b}' for a, b in TARGETS)} "
          f"with {args.jobs} process(es)…", file=sys.stderr)  # fmt: skip
    rows = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for row in pool.map(check, todo):
            rows.append(row)
            status = "; ".join(row["problems"]) or "ok"
            print(f"  {row['target']} {row['kernel']} {row['mode']} {row['design']} {row['config']}: {status} "
                  f"({row['seconds']:.1f} s)", file=sys.stderr)  # fmt: skip
    result = dict(
        benchmark="kernel-static",
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        versions=dict(triton=triton.__version__, torch=torch.__version__, python=platform.python_version()),
        shape=SHAPE,
        seconds=round(time.perf_counter() - t0, 1),
        rows=rows,
    )
    table = markdown(result)
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "static.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "static.md").write_text(table + "\n")
    return 1 if any(r["problems"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
