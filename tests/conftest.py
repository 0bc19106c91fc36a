"""Shared fixtures: one tiny pipeline per session, and helpers that write test checkpoints."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
if not torch.cuda.is_available():
    # Triton kernels run on the CPU through the interpreter; it must be on before they are imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).parent))
from live_server import PARSERS

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two workers on two cores: one thread each, or torch's own threads fight over the cores.
    torch.set_num_threads(1)


# The files that take longest (idle, 2026-11-30), heaviest first. pytest-xdist hands whole files to the
# two workers in collection order (--dist loadfile); starting with the heavy ones keeps one worker from
# finishing a long file alone at the end.
HEAVY_FIRST = (
    "test_server.py",
    "test_kernels.py",
    "test_fast_path.py",
    "test_lora_requests.py",
    "test_readme_commands.py",
    "test_diffusers_api.py",
    "test_flux_pipelines.py",
    "test_bench.py",
    "test_server_robust.py",
    "test_attention_processor.py",
    "test_server_limits.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(HEAVY_FIRST)))


@pytest.fixture(scope="session")
def tiny_pipe():
    import srpo_infer

    return srpo_infer.load_pipeline("tiny-random", device="cpu", progress=False)


@pytest.fixture(scope="session")
def tiny_state():
    """The tiny transformer's state dict (diffusers names, float32)."""
    from srpo_infer.tiny import build_tiny_transformer

    return {k: v.clone() for k, v in build_tiny_transformer().state_dict().items()}


@pytest.fixture(params=PARSERS)
def parser(request) -> str:
    """Each of uvicorn's HTTP parsers the server's limits must hold under (live_server.PARSERS)."""
    return request.param
