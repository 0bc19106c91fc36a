"""The GPU-only parts of the fast path on the tiny model (skipped without CUDA): torchao fp8 GEMMs,
Inductor (regional and whole-model, default and max-autotune with CUDA graphs) over dynamic sizes,
compiled step caching, the Triton backends in the
pipeline."""

from __future__ import annotations

import pytest
import torch
from helpers import standard_request

import srpo_infer
from srpo_infer.bench.deviation import relative_error

CUDA = torch.cuda.is_available()
FP8 = CUDA and torch.cuda.get_device_capability() >= (8, 9)
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]
REQ = standard_request(num_inference_steps=4)


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


@pytest.mark.parametrize(
    ("scope", "mode", "quantize"),
    [
        ("regional", "default", None),
        ("full", "default", None),
        ("regional", "max-autotune", None),
        pytest.param("regional", "default", "fp8", marks=pytest.mark.skipif(not FP8, reason="needs fp8 tensor cores")),
    ],
)
def test_inductor_matches_eager_and_compiles_nothing_after_warmup(eager, scope, mode, quantize):
    torch._dynamo.reset()
    pipe = srpo_infer.load_pipeline(
        "tiny-random",
        device="cuda",
        progress=False,
        compile=True,
        compile_scope=scope,
        compile_mode=mode,
        quantize=quantize,
        cache_dir=None,
    )
    err = relative_error(pipe.generate_latents(REQ), eager[1])
    assert err < (1e-3 if quantize is None else 0.15), err  # bf16 with other kernels; fp8 as above
    pipe.warmup([(512, 512)], accelerations=("none", "high"))
    settled = pipe.compiled_graphs()
    for w, h in [(1024, 1024), (1440, 512), (768, 1024), (1536, 1536)]:
        pipe.generate("x", width=w, height=h, seed=1, num_inference_steps=2)
        pipe.generate("x", width=w, height=h, seed=1, num_inference_steps=2, acceleration="high")
    assert pipe.compiled_graphs() == settled, "a size compiled after warm-up"


NEEDS_FP8 = pytest.mark.skipif(not FP8, reason="needs fp8 tensor cores")


@pytest.mark.parametrize("attention", ["triton", "triton-int8", pytest.param("triton-int8-fp8", marks=NEEDS_FP8)])
def test_triton_backends_in_the_pipeline(eager, attention):
    pipe = srpo_infer.load_pipeline("tiny-random", device="cuda", progress=False, attention=attention)
    err = relative_error(pipe.generate_latents(REQ), eager[1])
    assert err < (1e-2 if attention != "triton-int8-fp8" else 0.1), err
