"""The benchmark harnesses run end to end on the CPU (smoke mode) and write valid results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_attention_benchmark_smoke(tmp_path):
    out = tmp_path / "attention.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = ROOT / "benchmarks" / "bench_attention.py"
    run = subprocess.run([sys.executable, str(script), "--smoke", "--sweep", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["benchmark"] == "attention" and result["versions"]["torch"]
    names = {r["candidate"] for r in result["rows"]}
    backends = ("triton", "triton-int8", "triton-int8-fp8")
    assert {"sdpa-default", "compiled-sdpa-default", *backends, *(f"{b}/tma" for b in backends)} <= names
    # the sweep: each design's configurations
    assert {"triton/pointer/16x16w1s1", "triton-int8/tma/16x16w1s1", "triton-int8-fp8/pointer/16x16w1s1"} <= names
    bounds = {"triton-int8-fp8": 6e-2, "triton-int8": 2e-2}  # relative L1, as tests/test_kernels.py
    for r in result["rows"]:
        assert "error" not in r, r
        assert r["ms"] > 0 and r["tflops"] > 0 and r["speedup_vs_best_stock"] > 0
        assert r["rel_l1_vs_fp32"] < bounds.get(r["candidate"].split("/")[0], 2e-3), r
        assert 0.99 < r["cosine_vs_fp32"] <= 1 + 1e-9, r
    table = out.with_suffix(".md").read_text()
    assert "| candidate |" in table and "| rival: compiled prologue + SDPA |" in table
    assert result["tuned_configs"] and all("BLOCK_M" in v for v in result["tuned_configs"].values())
