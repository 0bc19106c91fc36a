"""The tiny model's images, pixel for pixel, across refactors, on every CPU: a fixed request, exact
(acceleration none) and with the step cache skipping steps.

Two checks. Everywhere: the sums of each 8×8 block of the decoded pixels against the ones stored in
``tests/data/tiny-pixels.npz``, within half a pixel level on average per block. Float32 sums taken in
another order (another instruction set, more threads) move a few pixels by one level (a block's mean by
1/64 at most, measured across AVX-512, AVX2 and the default kernels), while any change to the math of
the model, the loop or the decoding changes this noise image everywhere (blocks move by tens of
levels). Where the hash of the exact pixels was recorded (torch and instruction set), also that.
Bit-identity with diffusers' own loop (test_pipeline) holds everywhere.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

STORED = Path(__file__).parent / "data" / "tiny-pixels.npz"  # 8×8 block sums (uint16), recorded at a5e34ec
CASES = {  # (cache_threshold, transformer evaluations)
    "exact": (None, 4),
    "cache_skips": (1.0, 3),
}
HASHES = {  # (torch, CPU capability): the pixels' SHA-256 per case, one thread
    ("2.13.0+cpu", "AVX2"): {"exact": "b512657030480fc3", "cache_skips": "cf401dd33a969385"},
    ("2.13.0+cpu", "AVX512"): {"exact": "972f15f768c46613", "cache_skips": "443aaa2ae5b50115"},
}


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def block_sums(pixels: np.ndarray) -> np.ndarray:
    h, w, c = pixels.shape
    return pixels.reshape(h // 8, 8, w // 8, 8, c).astype(np.int64).sum(axis=(1, 3))


@pytest.mark.parametrize("case", CASES)
def test_tiny_model_pixels_are_unchanged(tiny_pipe, one_thread, case):
    threshold, evaluations = CASES[case]
    result = tiny_pipe.generate(
        "a lighthouse at dusk", width=576, height=512, seed=7, num_inference_steps=4, cache_threshold=threshold
    )
    pixels = np.asarray(result.images[0].convert("RGB"))
    assert result.transformer_evaluations == evaluations
    stored = np.load(STORED)[case].astype(np.int64)
    assert np.abs(block_sums(pixels) - stored).max() <= 32  # half a level per pixel, over a block's 64
    want = HASHES.get((torch.__version__, torch.backends.cpu.get_cpu_capability()), {}).get(case)
    if want is not None:
        assert hashlib.sha256(pixels.tobytes()).hexdigest()[:16] == want
