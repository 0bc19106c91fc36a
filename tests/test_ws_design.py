"""The ``ws`` attention design off Hopper: selectable, never automatic, refused in one line anywhere it
cannot run (a CPU, the interpreter, another GPU generation), and compiled for sm_90a with its overlap
read from the SASS (CI's slow step; the static matrix step checks every Triton version)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import srpo_infer
from srpo_infer.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_ws_is_refused_in_one_line_naming_sm90_on_a_cpu(capsys):
    with pytest.raises(ValueError, match=r"^attention_design='ws' runs on Hopper GPUs only \(sm_90: H100, H200\)"):
        srpo_infer.load_pipeline("tiny-random", attention="triton", attention_design="ws")
    code = main(["generate", "a cat", "--model", "tiny-random", "--attention", "triton", "--attention-design", "ws"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "--attention-design ws runs on Hopper GPUs only (sm_90" in err[0] and "--attention-design pointer" in err[0]


def test_ws_refusal_names_where_it_is_and_auto_never_picks_it(monkeypatch):
    from srpo_infer.kernels import configs
    from srpo_infer.kernels.launch import DESIGN_ENV, resolve_design

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "under TRITON_INTERPRET=1 (Gluon has no interpreter)" in configs.ws_refusal(torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "not on cpu" in configs.ws_refusal(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    assert "not on sm_89" in configs.ws_refusal(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert configs.ws_refusal(torch.device("cuda")) is None
    monkeypatch.delenv(DESIGN_ENV, raising=False)
    assert resolve_design("auto", torch.device("cpu")) == "pointer"  # never ws until a GPU run shows it faster
    with pytest.raises(ValueError, match="design='ws' runs on Hopper GPUs only"):
        resolve_design("ws", torch.device("cpu"))
    assert resolve_design("ws", torch.device("cpu"), for_target=True) == "ws"  # compiling for a GPU not here


@pytest.mark.slow  # ~10 s of sm_90a compiles
def test_ws_compiles_for_sm90a_with_the_softmax_under_the_mma(tmp_path):
    script = f"""
import json, sys
sys.path.insert(0, {str(ROOT / "benchmarks")!r})
from kernel_static import check
from srpo_infer.kernels.configs import WS_CONFIGS
print(json.dumps([check(dict(kernel="attention", mode=m, design="ws", config=tuple(c), target=(9, 0)))
                  for m, c in WS_CONFIGS.items()]))
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    for row in json.loads(run.stdout.splitlines()[-1]):
        assert row["compiled"] and row["problems"] == [], row
        assert row["spill_bytes"] == 0 and row["smem_bytes"] <= row["smem_limit"], row
        assert row["wait_depth"] >= 1 and row["exp2_in_flight"] >= 0.9, row
        assert row["loop"]["barriers"] == 0 and row["tma_copies"] > 0, row  # no CTA-wide barrier in the loop
