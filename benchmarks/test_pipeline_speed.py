"""pytest-benchmark suite: ``pytest benchmarks/ --benchmark-only`` (not part of the CI test run).

On a CPU it times the tiny model (a harness check, not a speed claim); with CUDA it times the
full-size random model at the API's 1440×512 anchor. Ratios between configurations come from
``srpo-infer bench``, which runs them side by side in one process.
"""

from __future__ import annotations

import pytest
import torch

import srpo_infer

CUDA = torch.cuda.is_available()
MODEL = "full-random" if CUDA else "tiny-random"
SIZE = (1440, 512)
STEPS = 28 if CUDA else 2


@pytest.fixture(scope="module", params=["eager", "compiled"])
def pipe(request):
    compiled = request.param == "compiled"
    if compiled and not CUDA:
        pytest.skip("compiling on the CPU measures the C++ compiler, not the pipeline")
    p = srpo_infer.load_pipeline(MODEL, progress=False, compile=compiled)
    p.warmup([SIZE])
    yield p
    del p


def test_generate_1440x512(benchmark, pipe):
    result = benchmark.pedantic(
        lambda: pipe.generate("a T-Rex on a beach", width=SIZE[0], height=SIZE[1], seed=1, num_inference_steps=STEPS),
        rounds=3,
        warmup_rounds=1,
    )
    assert result.images[0].size == SIZE
