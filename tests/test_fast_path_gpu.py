"""The GPU-only parts of the fast path on the tiny model (skipped without CUDA): torchao fp8 GEMMs,
Inductor with CUDA graphs and dynamic sizes, compiled step caching, the Triton backends in the
pipeline."""

from __future__ import annotations

import pytest
import torch

import srpo_infer
from srpo_infer import GenerationRequest
from srpo_infer.metrics import relative_error

CUDA = torch.cuda.is_available()
FP8 = CUDA and torch.cuda.get_device_capability() >= (8, 9)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
REQ = GenerationRequest("a red fox in snow", 512, 512, seed=3, num_inference_steps=4)


@pytest.fixture(scope="module")
def eager():
    pipe = srpo_infer.load_pipeline("tiny-random", device="cuda", progress=False)
    return pipe, pipe.generate_latents(REQ)


@pytest.mark.skipif(not FP8, reason="needs fp8 tensor cores")
def test_torchao_fp8_quantizes_all_but_the_skip_list(eager):
    pytest.importorskip("torchao")
    pipe = srpo_infer.load_pipeline("tiny-random", device="cuda", progress=False, quantize="fp8")
    t = pipe.transformer
    assert "Float8" in type(t.transformer_blocks[0].attn.to_q.weight).__name__
    assert type(t.proj_out.weight) is torch.nn.Parameter and type(t.x_embedder.weight) is torch.nn.Parameter
    err = relative_error(pipe.generate_latents(REQ), eager[1])
    assert 0 < err < 0.15, err


def test_inductor_with_cuda_graphs_matches_eager_without_recompiles(eager):
    torch._dynamo.reset()
    pipe = srpo_infer.load_pipeline("tiny-random", device="cuda", progress=False, compile=True, cache_dir=None)
    before = pipe.compiled_graphs()
    assert relative_error(pipe.generate_latents(REQ), eager[1]) < 1e-3  # bf16, different kernels
    for w, h in [(512, 512), (1536, 1024)]:
        pipe.generate("x", width=w, height=h, seed=1, num_inference_steps=2)
    settled = pipe.compiled_graphs()
    for w, h in [(1440, 512), (768, 1024), (1216, 832)]:
        pipe.generate("x", width=w, height=h, seed=1, num_inference_steps=2)
        pipe.generate("x", width=w, height=h, seed=1, num_inference_steps=2, acceleration="high")
    pipe.generate("x", width=640, height=512, seed=1, num_inference_steps=2, acceleration="high")
    assert pipe.compiled_graphs() - settled <= 3  # the cache's three stages compile once, not per size
    assert settled - before <= 3


NEEDS_FP8 = pytest.mark.skipif(not FP8, reason="needs fp8 tensor cores")


@pytest.mark.parametrize("attention", ["triton", pytest.param("triton-fp8", marks=NEEDS_FP8)])
def test_triton_backends_in_the_pipeline(eager, attention):
    pipe = srpo_infer.load_pipeline("tiny-random", device="cuda", progress=False, attention=attention)
    err = relative_error(pipe.generate_latents(REQ), eager[1])
    assert err < (1e-2 if attention == "triton" else 0.1), err
