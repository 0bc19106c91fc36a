"""benchmarks/kernel_static.py reads registers from the binary Triton built: checked against
``cuobjdump --dump-resource-usage`` run here, on the same cubin, for one attention kernel per mode
(sm_90a, the installed Triton; no GPU needed). The whole version matrix runs in CI's static step."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# One small configuration per mode (a few seconds each to compile): (mode, design, config).
KERNELS = [
    ("native", "pointer", (64, 128, 4, 3)),
    ("int8", "tma", (64, 128, 4, 3)),
    ("int8-fp8", "pointer", (64, 128, 4, 3)),
]


@pytest.mark.slow  # ~15 s of sm_90a compiles: CI's slow step
def test_registers_match_cuobjdump_on_the_same_cubin(tmp_path):
    script = f"""
import json, sys
sys.path.insert(0, {str(ROOT / "benchmarks")!r})
from kernel_static import check
rows = [check(dict(kernel="attention", mode=m, design=d, config=c, target=(9, 0)), cubin_dir={str(tmp_path)!r})
        for m, d, c in {KERNELS!r}]
print(json.dumps(rows))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout.splitlines()[-1])
    import triton  # the same wheel the subprocess compiled with: its own cuobjdump

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    for row in rows:
        assert row["compiled"], row
        dump = subprocess.run(
            [str(cuobjdump), "--dump-resource-usage", str(tmp_path / row["cubin"])],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        (regs,) = re.findall(r"Function _attention_kernel:\s+REG:(\d+)", dump)
        assert row["regs"] == int(regs) == row["ptxas_regs"], (row, dump)
        assert row["spill_bytes"] == 0 and row["local_instructions"] == 0 and row["problems"] == [], row
        assert "s8" in row["mma"] if row["mode"] != "native" else row["mma"] == ["bf16"], row
        assert row["loop"]["mmas"] > 0 and row["loop"]["waits"], row  # the attention loop was found in the SASS
    assert {"s8", "e4m3"} <= set(rows[2]["mma"]) and rows[1]["tma_copies"] > 0
