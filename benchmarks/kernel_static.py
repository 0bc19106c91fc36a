"""Hopper (and Ampere/Ada) checks of the attention kernels on a machine without a GPU, under every
Triton our users get.

Triton compiles for a GPU it does not have: ``triton.compile`` with a ``GPUTarget`` runs down to the
``ptxas`` its wheel ships, no driver needed. For every kernel the launcher can run — the stats pass,
the pre-pass and the attention kernel, per mode, load design and autotuning candidate — this builds the
launch exactly as :func:`srpo_infer.kernels.launch.plan` does, on CPU tensors of Flux's shape and of the
dtypes production passes (1 × 24 heads × 128, 512 + 4096 tokens; q/k/v and the norm weights bf16, the
rotary tables fp32 as diffusers' ``FluxPosEmbed`` makes them), binds the arguments through the kernel's
own binder, compiles for sm_90a (and sm_80 / sm_89 where the mode runs there) and reads off, from the
binary Triton itself built (``asm["cubin"]``):

- registers, stack and local memory (``cuobjdump --dump-resource-usage`` on the cubin, with the
  ``cuobjdump`` of the Triton wheel under test), and spills from Triton's own ``ptxas -v`` log of that
  compile (``TRITON_DUMP_PTXAS_LOG``; its register count must agree with the cubin's), with any ptxas
  warning (e.g. serialised ``wgmma``),
- shared memory (``metadata.shared``) against the architecture's per-block limit,
- the tensor-core instructions (``wgmma`` / ``mma`` operand types: ``bf16``, ``s8``, ``e4m3``),
- TMA bulk tensor copies (``cp.async.bulk.tensor``) for the ``tma`` design,
- the attention loop's synchronisation, from the SASS (``cuobjdump -sass``) and the PTX of the loop
  with the most MMAs: MMA waits per iteration by depth N (``WARPGROUP.DEPBAR.LE gsb0, N`` /
  ``wgmma.wait_group N``: N > 0 keeps an MMA in flight across the softmax) and CTA-wide barriers
  (``BAR.SYNC`` / ``bar.sync``).

It does so for a matrix of Triton versions (``--triton``): the installed one, plus 3.6.0 (the GPU
machines' torch 2.11) and 3.7.1 (what the CUDA build of torch 2.13 pins). Each extra version is
installed once with ``pip install --no-deps --target`` into its own folder under ``--triton-cache``
(default ``~/.cache/srpo_infer/triton-matrix``; the compiler needs no GPU and none of triton's
dependencies) and checked in a subprocess with that folder first on ``PYTHONPATH`` and an empty
Triton cache (so ptxas runs and logs). The launcher's candidate lists may differ by Triton version
(:func:`srpo_infer.kernels.configs.gpu_candidates`): a configuration dropped for a version is still
compiled and reported, marked ``shipped: false``, but its problems do not fail the check.

It writes ``static.json`` (a row per Triton version × kernel × mode × design × config × target, each
with a ``triton`` field) and ``static.md``, and exits 1 when any shipped configuration under any
version fails to compile, spills, needs more shared memory than the architecture has, when an 8-bit
mode's q·kᵀ is not an ``s8`` MMA (or its p·v not ``e4m3``, or not accumulated in two levels), or when
a ``tma`` kernel has no bulk tensor copy. CI runs it after the test suite.

    python benchmarks/kernel_static.py --out benchmarks/results/static-2026-11-30
    python benchmarks/kernel_static.py --triton installed          # one version, no install

Timing, numerics and whether the driver accepts the binary still need a GPU.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import io
import json
import os
import platform
import re
import shutil
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
# The Triton versions checked besides the installed one: 3.6.0 runs on our H100/H200 machines (torch
# 2.11); 3.7.1 is what the CUDA build of torch 2.13.0 pins (the CPU build pins none: pip takes 3.9).
MATRIX = ("installed", "3.6.0", "3.7.1")
CACHE_ENV = "SRPO_TRITON_MATRIX_CACHE"
# The ws design exists to run the softmax under an MMA: a shipped ws kernel fails the check below this.
WS_MIN_EXP2_IN_FLIGHT = 0.9


def _inputs():
    """CPU tensors of Flux's shape, in the dtypes the attention processor passes in production (never
    read: only dtypes, strides and alignment matter): the projections and the norm weights in the
    model's dtype (bf16), the rotary tables fp32 (diffusers' ``FluxPosEmbed`` returns float32)."""
    import torch

    from srpo_infer.attention import AttentionInputs

    b, h, d, st, si = (SHAPE[k] for k in ("batch", "heads", "head_dim", "s_txt", "s_img"))

    def t(*shape, dtype=torch.bfloat16):
        return torch.empty(*shape, dtype=dtype)

    rope = t(st + si, d, dtype=torch.float32)
    return AttentionInputs(
        t(b, si, h * d),
        t(b, si, h * d),
        t(b, si, h * d),
        t(d),
        t(d),
        rope,
        torch.empty_like(rope),
        h,
        t(b, st, h * d),
        t(b, st, h * d),
        t(b, st, h * d),
        t(d),
        t(d),
        1e-6,
    )


def jobs() -> list[dict]:
    """Every (kernel, mode, design, config, target) the launcher can run under this Triton, plus the
    configurations it drops for this Triton (``shipped: False``), as picklable job specs."""
    from srpo_infer.kernels.configs import (
        MODES,
        WS_CONFIGS,
        WS_MIN_TRITON,
        all_gpu_candidates,
        gpu_candidates,
        triton_minor,
    )
    from srpo_infer.kernels.launch import DESIGNS

    out = []
    for target in TARGETS:
        for mode, flags in MODES.items():
            if target < flags.min_capability:
                continue
            for kernel in (["stats"] if flags.qk_int8 or flags.pv_fp8 else []) + ["prologue"]:
                out.append(dict(kernel=kernel, mode=mode, design="-", config=None, target=target, shipped=True))
            shipped = gpu_candidates(mode, target)
            for design in DESIGNS:
                if design in ("tma", "ws") and target < (9, 0):
                    continue
                if design == "ws" and triton_minor() < WS_MIN_TRITON:
                    continue  # Gluon's warp_specialize as the kernel calls it
                if design == "ws":  # one configuration per mode, Hopper only
                    config = tuple(WS_CONFIGS[mode])
                    out.append(dict(kernel="attention", mode=mode, design=design, config=config, target=target))
                    continue
                for config in all_gpu_candidates(mode, target):
                    out.append(
                        dict(
                            kernel="attention",
                            mode=mode,
                            design=design,
                            config=tuple(config),
                            target=target,
                            shipped=config in shipped,
                        )
                    )
    return out


def _tool(name: str) -> str:
    """A CUDA tool from the Triton wheel under test (``backends/nvidia/bin``)."""
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def resource_usage(cubin: bytes) -> dict:
    """``cuobjdump --dump-resource-usage`` of a cubin: ``{"regs", "stack", "local", "shared"}`` of its
    one kernel (the registers the driver will allocate per thread)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run(
            [_tool("cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True, text=True, check=True
        ).stdout
    fields = dict(re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", text.split("Function", 1)[1]))
    return dict(
        regs=int(fields["REG"]), stack=int(fields["STACK"]), local=int(fields["LOCAL"]), shared=int(fields["SHARED"])
    )


def sass(cubin: bytes) -> str:
    """The cubin's SASS (``cuobjdump -sass``)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        return subprocess.run(
            [_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True, check=True
        ).stdout


def ptxas_log(log: str) -> dict:
    """Triton's own ``ptxas -v`` output for the compile: registers, spill bytes, stack, warnings."""
    regs = re.findall(r"Used (\d+) registers", log)
    return dict(
        regs=int(regs[-1]) if regs else None,
        spill_bytes=sum(int(n) for n in re.findall(r"(\d+) bytes spill (?:stores|loads)", log)),
        stack=int((re.search(r"(\d+) bytes stack frame", log) or [0, 0])[1]),
        warnings=sorted({line.split("warning", 1)[1].strip(" :") for line in log.splitlines() if "warning" in line}),
    )


def _sass_instructions(text: str) -> list[tuple[int, str]]:
    """``(address, instruction)`` for each SASS line."""
    return [(int(a, 16), i.strip()) for a, i in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", text)]


def sass_loop(text: str) -> dict:
    """The loop (a backward branch) with the most MMA instructions, in the SASS: per iteration, its MMAs,
    its MMA waits by depth (``WARPGROUP.DEPBAR.LE gsb0, N``: N MMA groups may stay in flight), its
    CTA-wide barriers (``BAR.SYNC``/``BAR.RED`` without a thread count) and its overlap (:func:`overlap`)."""
    instrs = _sass_instructions(text)
    best = None
    for addr, instr in instrs:
        # A loop's latch is a predicated backward branch; the unconditional ones jump back from the
        # out-of-line mbarrier retry stubs at the end of the kernel and span everything.
        m = re.match(r"@!?U?P\d\s+BRA\s+(?:`\()?(0x[0-9a-f]+)", instr)
        if not m or int(m.group(1), 16) > addr:
            continue
        body = [i for a, i in instrs if int(m.group(1), 16) <= a <= addr]
        mmas = sum(bool(re.search(r"\b(?:HGMMA|HMMA|IMMA|QGMMA|IGMMA)\b", i)) for i in body)
        if mmas and (best is None or (mmas, -len(body)) > (best["mmas"], -best["instructions"])):
            waits = collections.Counter(
                int(n, 16) for i in body for n in re.findall(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", i)
            )
            # CTA-wide only: a named barrier with a thread count (``BAR.SYNC 0x1, 0x80``) holds one
            # warpgroup of a warp-specialized kernel, not the others.
            barriers = sum(bool(re.search(r"\bBAR\.(?:SYNC|RED)\S*\s+(?:0x)?[0-9a-f]+\s*$", i)) for i in body)
            best = dict(
                mmas=mmas,
                waits={str(n): c for n, c in sorted(waits.items())},
                barriers=barriers,
                instructions=len(body),
                **overlap(body),
            )
    return best or dict(mmas=0, waits={}, barriers=0, instructions=0, wait_depth=0, exp2=0, exp2_in_flight=0.0)


def overlap(body: list[str]) -> dict:
    """How much of a loop's softmax runs while an MMA is in flight, from its SASS: ``wait_depth``, the
    deepest MMA wait (``WARPGROUP.DEPBAR.LE gsb0, N``: N groups may stay in flight), and
    ``exp2_in_flight``, the share of its exp2s (``MUFU.EX2``) that lie between a wait with N >= 1 and
    the next full wait (N = 0). A wait depth of 1 in the PTX alone proves nothing: ptxas may hoist the
    full wait above the exp2s, leaving the window empty.

    >>> wait = "WARPGROUP.DEPBAR.LE gsb0, "
    >>> overlap([wait + "0x1", "MUFU.EX2 R1, R2", wait + "0x0", "MUFU.EX2 R3, R4"])
    {'wait_depth': 1, 'exp2': 2, 'exp2_in_flight': 0.5}
    """
    depth, exp2, inside, in_flight = 0, 0, 0, False
    for instr in body:
        wait = re.search(r"WARPGROUP\.DEPBAR\.LE gsb0, (0x[0-9a-f]+)", instr)
        if wait:
            n = int(wait.group(1), 16)
            depth, in_flight = max(depth, n), n > 0
        elif re.search(r"\bMUFU\.EX2\b", instr):
            exp2 += 1
            inside += in_flight
    return dict(wait_depth=depth, exp2=exp2, exp2_in_flight=round(inside / exp2, 3) if exp2 else 0.0)


def ptx_loop(ptx: str) -> dict:
    """The same in the PTX: the loop with the most ``wgmma.mma_async``/``mma.sync``; its
    ``wgmma.wait_group N`` by N and its ``bar.sync``/``barrier.sync``."""
    lines = ptx.splitlines()
    labels = {m.group(1): n for n, line in enumerate(lines) if (m := re.match(r"(\$L__BB\d+_\d+):", line.strip()))}
    best = None
    for n, line in enumerate(lines):
        m = re.search(r"@%p\d+\s+bra(?:\.uni)?\s+(\$L__BB\d+_\d+);", line)
        if not m or labels.get(m.group(1), n + 1) > n:
            continue
        body = lines[labels[m.group(1)] : n + 1]
        mmas = sum(bool(re.search(r"\b(?:wgmma\.mma_async|mma\.sync)\b", b)) for b in body)
        if mmas and (best is None or (mmas, -len(body)) > (best["mmas"], -best["lines"])):
            waits = collections.Counter(
                int(w) for b in body for w in re.findall(r"wgmma\.wait_group\.sync\.aligned (\d+)", b)
            )
            barriers = sum(bool(re.search(r"\b(?:bar|barrier)(?:\.cta)?\.sync\b", b)) for b in body)
            best = dict(
                mmas=mmas, waits={str(k): c for k, c in sorted(waits.items())}, barriers=barriers, lines=len(body)
            )
    return best or dict(mmas=0, waits={}, barriers=0, lines=0)


@contextlib.contextmanager
def _environ(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v


def _compile(launch, target: tuple[int, int]):
    """``triton.compile`` of one planned launch for ``target``, through the kernel's own argument binder.
    Returns ``(compiled, ptxas log)``: the cache is bypassed so ptxas runs, and Triton prints its log."""
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
    if getattr(kernel, "is_gluon", lambda: False)():  # the ws design: Gluon lowers its own layouts
        from triton.experimental.gluon._runtime import GluonASTSource as ASTSource
    log = io.StringIO()
    with _environ(TRITON_ALWAYS_COMPILE="1", TRITON_DUMP_PTXAS_LOG="1"), contextlib.redirect_stdout(log):
        compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=gpu, options=options.__dict__)
    return compiled, log.getvalue()


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


def check(job: dict, cubin_dir: str | None = None) -> dict:
    """Compile one job and measure it; never raises (a failure is a row with ``compiled: false``).
    ``cubin_dir``: also save the cubin there (``<row id>.cubin``, for an independent reader)."""
    import triton
    from srpo_infer.kernels.configs import MODES, KernelConfig
    from srpo_infer.kernels.launch import plan

    target = tuple(job["target"])
    arch = f"sm_{target[0]}{target[1]}{'a' if target >= (9, 0) else ''}"
    config = KernelConfig(*job["config"]) if job["config"] else None
    row = dict(
        triton=triton.__version__,
        kernel=job["kernel"],
        mode=job["mode"],
        design=job["design"],
        config=config.tag if config else "-",
        target=arch,
        shipped=job.get("shipped", True),
        smem_limit=SMEM_LIMIT[target],
    )
    t0 = time.perf_counter()
    try:
        design = job["design"] if job["design"] != "-" else "pointer"
        launches, _ = plan(_inputs(), job["mode"], design=design, config=config, capability=target)
        launch = next(item for item in launches if item.name == job["kernel"])
        compiled, log = _compile(launch, target)
        ptx, cubin = compiled.asm["ptx"], compiled.asm["cubin"]
        usage, logged = resource_usage(cubin), ptxas_log(log)
        code = sass(cubin)
        row.update(
            compiled=True,
            regs=usage["regs"],  # from the cubin
            ptxas_regs=logged["regs"],  # from Triton's ptxas log of the same compile
            spill_bytes=logged["spill_bytes"],
            stack_bytes=usage["stack"],
            local_bytes=usage["local"],
            local_instructions=len(re.findall(r"\b(?:LDL|STL)\b", code)),  # local-memory traffic in the SASS
            ptxas_warnings=logged["warnings"],
            smem_bytes=int(compiled.metadata.shared),
            mma=_mma_types(ptx),
            tma_copies=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)),
        )
        if job["kernel"] == "attention":
            row["loop"] = sass_loop(code)
            row["ptx_loop"] = ptx_loop(ptx)
            row["wait_depth"] = row["loop"]["wait_depth"]
            row["exp2_in_flight"] = row["loop"]["exp2_in_flight"]
        if MODES[job["mode"]].pv_fp8 and job["kernel"] == "attention":
            row["fp8_accumulators"] = _fp8_dot_accumulators(compiled.asm["ttgir"])
        if cubin_dir:
            name = f"{row['kernel']}-{row['mode']}-{row['design']}-{row['config']}-{arch}.cubin"
            (Path(cubin_dir) / name).write_bytes(cubin)
            row["cubin"] = name
    except Exception as exc:  # a compile error is a finding, not a crash of the check
        row.update(compiled=False, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}")
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["problems"] = problems(row)
    return row


def problems(row: dict) -> list[str]:
    """What is wrong with one row (empty: the kernel is fine as far as a compile can tell)."""
    from srpo_infer.kernels.configs import MODES

    if not row["compiled"]:
        return [f"does not compile: {row['error']}"]
    found = []
    if row["spill_bytes"] or row["local_instructions"]:
        found.append(f"spills {row['spill_bytes']} bytes per thread ({row['local_instructions']} LDL/STL in the SASS)")
    if row["ptxas_regs"] is not None and row["ptxas_regs"] != row["regs"]:
        found.append(f"ptxas logged {row['ptxas_regs']} registers, the cubin has {row['regs']}")
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
        if row["design"] in ("tma", "ws") and not row["tma_copies"]:
            found.append(f"the {row['design']} design issues no cp.async.bulk.tensor")
        if row["design"] == "ws" and row["wait_depth"] < 1:
            found.append("the ws loop waits every MMA at depth 0: nothing stays in flight across the softmax")
        if row["design"] == "ws" and row["exp2_in_flight"] < WS_MIN_EXP2_IN_FLIGHT:
            found.append(
                f"only {row['exp2_in_flight']:.0%} of the ws loop's exp2s run while an MMA is in flight "
                f"(at least {WS_MIN_EXP2_IN_FLIGHT:.0%})"
            )
    return found


def _waits(loop: dict) -> str:
    return " ".join(f"{c}×{n}" for n, c in loop["waits"].items()) or "–"


def _per_version(cells: list[str]) -> str:
    """One value when every version agrees, else each version's, in the matrix's order."""
    return cells[0] if len(set(cells)) == 1 else " / ".join(cells)


def markdown(result: dict) -> str:
    """The versions matrix (one row per kernel, one column per Triton version), then each version's
    totals and the configurations it drops."""
    versions = [v["triton"] for v in result["matrix"]]
    by_key: dict[tuple, dict] = {}
    for r in result["rows"]:
        by_key.setdefault((r["target"], r["kernel"], r["mode"], r["design"], r["config"]), {})[r["triton"]] = r
    lines = [
        f"Attention kernels compiled for GPUs that are not here ({result['date']}; Flux shape "
        f"{SHAPE['heads']} heads × {SHAPE['head_dim']}, {SHAPE['s_txt']}+{SHAPE['s_img']} tokens; q/k/v bf16, "
        f"rotary tables fp32), under triton {', '.join(versions)}.",
        "",
        "Per version: registers (from the cubin) / spill bytes per thread / shared memory KiB; `*`: dropped "
        "for that version (not shipped). Loop: the attention loop in the SASS, per iteration: MMA waits as "
        "count×depth (`WARPGROUP.DEPBAR.LE gsb0, depth`; depth 0: nothing stays in flight across the "
        "softmax) and CTA-wide barriers (`BAR.SYNC`); one value when all versions agree, else one per version.",
        "",
        "| target | kernel | mode | design | config | "
        + " | ".join(f"triton {v}" for v in versions)
        + " | MMA | TMA copies | loop waits | loop barriers | wait depth / exp2 in flight | problems |",
        "|---" * (11 + len(versions)) + "|",
    ]
    for (target, kernel, mode, design, config), per in by_key.items():
        cells, issues, loops = [], [], []
        for v in versions:
            r = per.get(v)
            if r is None:
                cells.append("–")
                continue
            mark = "" if r["shipped"] else "*"
            if not r["compiled"]:
                cells.append("no compile" + mark)
            else:
                cells.append(f"{r['regs']} / {r['spill_bytes']} / {r['smem_bytes'] / 1024:.0f}{mark}")
                if r.get("loop"):
                    loops.append(r["loop"])
            if r["problems"]:
                issues.append(f"{v}{'' if r['shipped'] else ' (dropped)'}: {'; '.join(r['problems'])}")
        first = next(r for r in per.values() if r["compiled"]) if any(r["compiled"] for r in per.values()) else {}
        waits = _per_version([_waits(loop) for loop in loops]) if loops else "–"
        barriers = _per_version([str(loop["barriers"]) for loop in loops]) if loops else "–"
        overlaps = _per_version([f"{loop['wait_depth']} / {loop['exp2_in_flight']:.0%}" for loop in loops])
        lines.append(
            f"| {target} | {kernel} | {mode} | {design} | {config} | {' | '.join(cells)} | "
            f"{' '.join(first.get('mma', [])) or '–'} | {first.get('tma_copies', '–')} | {waits} | {barriers} | "
            f"{overlaps if loops else '–'} | {'<br>'.join(issues) or 'ok'} |"
        )
    lines += [
        "",
        "| triton | from | kernels | shipped with problems | dropped (not shipped) | install s | check s |",
        "|---|---|---|---|---|---|---|",
    ]
    for v in result["matrix"]:
        rows = [r for r in result["rows"] if r["triton"] == v["triton"]]
        bad = sum(bool(r["problems"]) for r in rows if r["shipped"])
        dropped = ", ".join(f"{r['target']} {r['mode']} {r['design']} {r['config']}" for r in rows if not r["shipped"])
        source = v["source"] if v["source"] == "installed" else f"pip --no-deps → {Path(v['source']).name}"
        lines.append(
            f"| {v['triton']} | {source} | {len(rows)} | {bad} | {dropped or '–'} | "
            f"{v['install_seconds']} | {v['seconds']} |"
        )
    bad = sum(bool(r["problems"]) for r in result["rows"] if r["shipped"])
    lines += ["", f"{len(result['rows'])} kernels compiled, {bad} shipped with problems; {result['seconds']} s in all."]
    return "\n".join(lines)


def triton_cache() -> Path:
    """Where the extra Triton versions are installed: ``$SRPO_TRITON_MATRIX_CACHE`` or
    ``~/.cache/srpo_infer/triton-matrix`` (outside the repository)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "srpo_infer" / "triton-matrix")


def install(version: str, cache: Path) -> tuple[Path, float]:
    """``triton==version`` in its own folder (``pip install --no-deps --target``), once: ``(folder,
    seconds spent installing, 0 when it was there)``. Installed into a temporary folder first, so an
    interrupted install never leaves a half folder that looks complete."""
    folder = cache / f"triton-{version}"
    if (folder / f"triton-{version}.dist-info").is_dir():
        return folder, 0.0
    cache.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".triton-{version}-", dir=cache))
    try:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--no-deps",
                "--no-compile",
                "--target",
                str(tmp),
                f"triton=={version}",
            ],
            check=True,
        )
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, round(time.perf_counter() - t0, 1)


def check_version(version: str, folder: Path | None, jobs: int) -> dict:
    """Every job under one Triton, in a subprocess (``folder`` first on its ``PYTHONPATH``; None: the
    installed Triton) with an empty Triton cache: ``{"triton", "seconds", "rows"}``."""
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["TRITON_CACHE_DIR"] = str(Path(tmp) / "cache")
        if folder is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(folder), *filter(None, [env.get("PYTHONPATH")])])
        out = Path(tmp) / "rows.json"
        command = [sys.executable, __file__, "--worker", str(out), "--jobs", str(jobs)]
        if folder is not None:
            command += ["--expect", version]
        t0 = time.perf_counter()
        subprocess.run(command, env=env, check=True)
        result = json.loads(out.read_text())
    return dict(result, seconds=round(time.perf_counter() - t0, 1))


def worker(out: Path, n_jobs: int, expect: str | None) -> None:
    """The check under the Triton this process imports (the ``--worker`` side of :func:`check_version`)."""
    import triton

    if expect and triton.__version__ != expect:
        raise SystemExit(f"expected triton {expect}, imported {triton.__version__} from {triton.__file__}")
    todo = jobs()
    print(
        f"triton {triton.__version__}: compiling {len(todo)} kernels for "
        f"{', '.join(f'sm_{a}{b}' for a, b in TARGETS)} with {n_jobs} process(es)…",
        file=sys.stderr,
    )
    rows = []
    with ProcessPoolExecutor(n_jobs) as pool:
        for row in pool.map(check, todo):
            rows.append(row)
            status = "; ".join(row["problems"]) or "ok"
            name = f"[{row['triton']}] {row['target']} {row['kernel']} {row['mode']} {row['design']} {row['config']}"
            dropped = "" if row["shipped"] else " (dropped)"
            print(f"  {name}{dropped}: {status} ({row['seconds']:.1f} s)", file=sys.stderr)
    out.write_text(json.dumps(dict(triton=triton.__version__, rows=rows)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="folder for static.json and static.md")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiles in parallel")
    parser.add_argument(
        "--triton",
        nargs="+",
        default=list(MATRIX),
        help="versions to check ('installed': the one this Python imports); default: %(default)s",
    )
    parser.add_argument(
        "--triton-cache",
        type=Path,
        default=None,
        help=f"folder for the extra versions (default ${CACHE_ENV} or ~/.cache/srpo_infer/triton-matrix)",
    )
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--expect", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.jobs, args.expect)
        return 0
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: this compiles the kernels for real GPUs")
    import torch
    import triton

    t0 = time.perf_counter()
    cache = args.triton_cache or triton_cache()
    matrix, rows, seen = [], [], set()
    for version in args.triton:
        installed = version in ("installed", triton.__version__)
        name = triton.__version__ if installed else version
        if name in seen:
            continue
        seen.add(name)
        folder, install_s = (None, 0.0) if installed else install(version, cache)
        result = check_version(name, folder, args.jobs)
        rows += result["rows"]
        matrix.append(
            dict(
                triton=result["triton"],
                source="installed" if installed else str(folder),
                install_seconds=install_s,
                seconds=result["seconds"],
            )
        )
    result = dict(
        benchmark="kernel-static",
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        versions=dict(triton=triton.__version__, torch=torch.__version__, python=platform.python_version()),
        matrix=matrix,
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
    return 1 if any(r["problems"] for r in rows if r["shipped"]) else 0


if __name__ == "__main__":
    sys.exit(main())
