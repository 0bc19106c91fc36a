"""The benchmark harnesses run end to end on the CPU (smoke mode) and write valid results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # ~15 s of interpreted kernels; CI's slow step
def test_attention_benchmark_smoke(tmp_path):
    out = tmp_path / "attention.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = ROOT / "benchmarks" / "bench_attention.py"
    run = subprocess.run(
        [sys.executable, str(script), "--smoke", "--sweep", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "attention" and result["versions"]["torch"]
    names = {r["candidate"] for r in result["rows"]}
    backends = ("triton", "triton-int8", "triton-int8-fp8")
    assert {"sdpa-default", "compiled-sdpa-default", *backends, *(f"{b}/tma" for b in backends)} <= names
    # the sweep: each design's configurations
    assert {"triton/pointer/16x16w1s1", "triton-int8/tma/16x16w1s1", "triton-int8-fp8/pointer/16x16w1s1"} <= names
    bounds = {"triton-int8-fp8": 6e-2, "triton-int8": 2e-2}  # relative L1, as tests/test_kernels.py
    skipped = {r["candidate"]: r["skipped"] for r in result["rows"] if "skipped" in r}
    assert set(skipped) == {"sageattention", "bare-sageattention"} and all("CUDA" in v for v in skipped.values())
    for r in result["rows"]:
        if "skipped" in r:
            continue
        assert "error" not in r, r
        assert r["ms"] > 0 and r["tflops"] > 0 and r["speedup_vs_best_stock"] > 0
        assert r["rel_l1_vs_fp32"] < bounds.get(r["candidate"].split("/")[0], 2e-3), r
        assert 0.99 < r["cosine_vs_fp32"] <= 1 + 1e-9, r
    table = out.with_suffix(".md").read_text()
    assert "| candidate |" in table and "| rival: compiled prologue + SDPA |" in table
    assert result["tuned_configs"] and all("BLOCK_M" in v for v in result["tuned_configs"].values())


@pytest.mark.slow  # ~18 s of sm_90a compiles; CI also runs the whole matrix (benchmarks/kernel_static.py)
def test_static_check_finds_what_cannot_run_on_hopper():
    """benchmarks/kernel_static.py compiles for sm_90a without a GPU (in a process without the
    interpreter). It must flag a tile configuration that needs more shared memory than Hopper has
    (128x128 bf16, 4 stages: 288 KiB) and the pre-pass as it shipped before (64 rows on 4 warps:
    spills), and pass the shipped choices."""
    script = f"""
import json, sys
sys.path.insert(0, {str(ROOT / "benchmarks")!r})
from kernel_static import check
from srpo_infer.kernels import configs
rows = [check(dict(kernel="attention", mode="native", design="pointer", config=c, target=(9, 0)))
        for c in [(128, 128, 8, 4), tuple(configs.gpu_candidates("native", (9, 0))[0])]]
rows.append(check(dict(kernel="attention", mode="int8-fp8", design="tma", config=(128, 64, 8, 3), target=(9, 0))))
rows.append(check(dict(kernel="prologue", mode="native", design="-", config=None, target=(9, 0))))
configs.PROLOGUE_ROWS, configs.PROLOGUE_WARPS = 64, 4
rows.append(check(dict(kernel="prologue", mode="native", design="-", config=None, target=(9, 0))))
print(json.dumps(rows))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=280, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    too_big, shipped, fast_8bit, prologue, old_prologue = json.loads(run.stdout.splitlines()[-1])
    assert too_big["smem_bytes"] > too_big["smem_limit"] and "shared memory" in too_big["problems"][0]
    assert shipped["problems"] == [] and shipped["mma"] == ["bf16"] and shipped["regs"] <= 255
    assert fast_8bit["problems"] == [] and {"s8", "e4m3"} <= set(fast_8bit["mma"]) and fast_8bit["tma_copies"] > 0
    assert fast_8bit["fp8_accumulators"] and set(fast_8bit["fp8_accumulators"]) == {"fresh"}
    assert prologue["problems"] == [] and prologue["spill_bytes"] == 0
    assert old_prologue["spill_bytes"] > 0 and "spills" in old_prologue["problems"][0]


@pytest.mark.slow  # ~10 s: 57 blocks, eager, twice; CI's slow step
def test_host_ops_counts_a_flux_depth_step_as_typed(tmp_path):
    """``python benchmarks/host_ops.py --out …`` as the README's performance section runs it: a step at
    acceleration none dispatches thousands of ops, a skipped step a few hundred, by part of the model."""
    out = tmp_path / "host-ops.md"
    script = ROOT / "benchmarks" / "host_ops.py"
    run = subprocess.run([sys.executable, str(script), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = {
        line.split("|")[1].strip(): line.split("|")[2:]
        for line in out.read_text().splitlines()
        if line.startswith("| a")
    }
    none, skipped = int(rows["acceleration none"][0]), int(rows["a skipped step (threshold 1e9)"][0])
    assert 57 * 50 < none and 0 < skipped < none / 10


@pytest.mark.slow  # ~15 s: two regional compiles of the tiny model; CI's slow step
def test_the_cuda_graphs_benchmark_runs_as_gpu_run_calls_it(tmp_path):
    """benchmarks/cuda_graphs.py's plumbing on the CPU (CUDA graphs resolve to off there): a row per
    setting with the step and host times, the file rewritten after each."""
    out = tmp_path / "cuda-graphs.json"
    script = ROOT / "benchmarks" / "cuda_graphs.py"
    args = ["--model", "tiny-random", "--size", "512x512", "--steps", "3", "--backend", "eager"]
    run = subprocess.run(
        [sys.executable, str(script), *args, "--settings", "regional:0", "regional:1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(r["scope"], r["asked_cuda_graphs"], r["cuda_graphs"]) for r in rows] == [
        ("regional", False, False),
        ("regional", True, False),  # no CUDA on this machine
    ]
    assert all(r["step_ms"] >= r["host_ms_per_step"] > 0 for r in rows)
