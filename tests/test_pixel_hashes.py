"""The tiny model's images, pixel for pixel, across refactors: SHA-256 of the decoded pixels of a fixed
request, exact (acceleration none) and with the step cache skipping steps.

Recorded with torch 2.13.0+cpu on an AVX2 CPU, one thread: float32 sums in another order (another torch,
an AVX-512 build, more threads) round differently, so elsewhere the test is skipped with the reason
rather than failed on rounding. Bit-identity with diffusers' own loop (test_pipeline) holds everywhere.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

RECORDED_ON = ("2.13.0+cpu", "AVX2")
CASES = {  # (cache_threshold, hash of the pixels, transformer evaluations)
    "exact": (None, "b512657030480fc3", 4),
    "cache skips": (1.0, "cf401dd33a969385", 3),
}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("case", CASES)
def test_tiny_model_pixels_are_unchanged(tiny_pipe, one_thread, case):
    here = (torch.__version__, torch.backends.cpu.get_cpu_capability())
    if here != RECORDED_ON:
        pytest.skip(f"hashes recorded on torch {RECORDED_ON[0]} with {RECORDED_ON[1]}; this is {here}")
    threshold, want, evaluations = CASES[case]
    result = tiny_pipe.generate(
        "a lighthouse at dusk", width=576, height=512, seed=7, num_inference_steps=4, cache_threshold=threshold
    )
    pixels = np.asarray(result.images[0].convert("RGB"))
    assert hashlib.sha256(pixels.tobytes()).hexdigest()[:16] == want
    assert result.transformer_evaluations == evaluations
