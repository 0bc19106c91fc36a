"""Quantization and torch.compile on the tiny model (CPU): correctness, recompiles, warm starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import srpo_infer
from srpo_infer import GenerationRequest
from srpo_infer.metrics import relative_error
from srpo_infer.quantize import weight_bytes

REQ = GenerationRequest("a red fox in snow", 512, 512, seed=3, num_inference_steps=2)


@pytest.fixture(scope="module")
def eager_latents(tiny_pipe):
    return tiny_pipe.generate_latents(REQ)


def test_auto_resolves_to_the_plain_path_on_cpu(tiny_pipe):
    cfg = tiny_pipe.config
    assert (cfg.quantize, cfg.compile, cfg.attention) == (None, False, "sdpa")
    assert tiny_pipe.optimized.steps == ["attention:sdpa"]


def test_fp8_weight_quantizes_linears_except_skipped(eager_latents):
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import QLinear

    pipe = srpo_infer.load_pipeline("tiny-random", device="cpu", progress=False, quantize="fp8-weight")
    t = pipe.transformer
    assert isinstance(t.transformer_blocks[0].attn.to_q, QLinear)
    assert isinstance(t.single_transformer_blocks[0].proj_out, QLinear)
    for name in ("x_embedder", "context_embedder", "proj_out"):
        assert type(getattr(t, name)) is torch.nn.Linear, name
    assert type(t.norm_out.linear) is torch.nn.Linear
    assert type(t.time_text_embed.timestep_embedder.linear_1) is torch.nn.Linear
    q = t.transformer_blocks[0].attn.to_q.weight
    assert q._data.dtype == torch.float8_e4m3fn
    # fp32 weights → 1 byte each (+ per-channel scales): well under a third of the memory.
    ref = srpo_infer.load_pipeline("tiny-random", device="cpu", progress=False)
    assert weight_bytes(t.transformer_blocks) < 0.3 * weight_bytes(ref.transformer.transformer_blocks)
    err = relative_error(pipe.generate_latents(REQ), eager_latents)
    assert 1e-5 < err < 0.15, err  # quantized for real, and close


def test_quantize_skip_and_text_encoder_are_configurable():
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import QLinear

    pipe = srpo_infer.load_pipeline("tiny-random", device="cpu", progress=False, quantize="fp8-weight",
                                    quantize_skip=("transformer_blocks.*",), quantize_text_encoder=True)  # fmt: skip
    t = pipe.transformer
    assert type(t.transformer_blocks[0].attn.to_q) is torch.nn.Linear
    assert isinstance(t.proj_out, QLinear)  # no longer skipped
    assert any(isinstance(m, QLinear) for m in pipe.flux.text_encoder_2.modules())
    assert "quantize:t5:fp8-weight" in pipe.optimized.steps


def test_fp8_without_fp8_gemms_suggests_fp8_weight():
    if torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this GPU has fp8 GEMMs")
    with pytest.raises(ValueError, match="fp8-weight"):
        srpo_infer.load_pipeline("tiny-random", device="cpu", quantize="fp8")


def test_bad_options_are_clear():
    with pytest.raises(ValueError, match="quantize must be one of"):
        srpo_infer.load_pipeline("tiny-random", device="cpu", quantize="int4")
    with pytest.raises(ValueError, match="compile must be"):
        srpo_infer.load_pipeline("tiny-random", device="cpu", compile="yes")
    with pytest.raises(ValueError, match=r"unknown load_pipeline options \['turbo'\]"):
        srpo_infer.load_pipeline("tiny-random", device="cpu", turbo=True)


def test_compile_matches_eager_and_does_not_recompile_per_size(eager_latents):
    """Backend "eager": the same dynamo capture (and graph count) as Inductor, without a C++ build."""
    torch._dynamo.reset()
    pipe = srpo_infer.load_pipeline("tiny-random", device="cpu", progress=False, compile=True,
                                    compile_backend="eager", cache_dir=None)  # fmt: skip
    assert pipe.optimized.steps[0] == "fuse_qkv" and pipe.optimized.steps[-1] == "compile:eager"
    before = pipe.compiled_graphs()
    got = pipe.generate_latents(REQ)
    assert relative_error(got, eager_latents) < 1e-5
    sizes = [(512, 512), (1440, 512), (768, 1024), (544, 1536), (1536, 1536), (1024, 576)]
    for w, h in sizes:
        r = pipe.generate("x", width=w, height=h, seed=1, num_inference_steps=1)
        assert r.images[0].size == (w, h)
    # 1 transformer graph + the VAE decoder, which CPU conv guards split once into small/large (seen
    # with TORCH_LOGS=recompiles: 4*H*W <= 20480): a bounded set, not one per size.
    settled = pipe.compiled_graphs() - before
    assert settled <= 3, settled
    for w, h in [(640, 640), (1536, 512), (512, 1536), (1216, 832), (960, 960)]:
        pipe.generate("x", width=w, height=h, seed=1, num_inference_steps=1)
    assert pipe.compiled_graphs() - before == settled, "a new resolution recompiled"
    pipe.generate("x", width=512, height=512, seed=1, num_inference_steps=1, num_images=2)
    after_batch = pipe.compiled_graphs() - before
    pipe.generate("x", width=640, height=512, seed=1, num_inference_steps=1, num_images=3)
    pipe.generate("x", width=1024, height=1024, seed=1, num_inference_steps=1, num_images=4)
    assert pipe.compiled_graphs() - before == after_batch <= settled + 2  # batch 1 → N compiles once


_COLD_WARM = textwrap.dedent(
    """
    import json, sys, time
    import srpo_infer
    t0 = time.perf_counter()
    pipe = srpo_infer.load_pipeline("tiny-random", device="cpu", progress=False, compile=True, cache_dir=sys.argv[1])
    pipe.warmup([(512, 512)])
    print(json.dumps({"seconds": time.perf_counter() - t0, "cache": str(pipe.optimized.cache_file)}))
    """
)


@pytest.mark.slow
def test_inductor_compile_cache_makes_the_second_process_start_faster(tmp_path):
    """Cold start compiles with Inductor and saves the mega-cache; a fresh process loads it."""
    results = []
    for run in range(2):
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{run}")}  # nothing shared
        out = subprocess.run([sys.executable, "-c", _COLD_WARM, str(tmp_path / "cache")], capture_output=True,
                             text=True, timeout=600, env=env)  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    cold, warm = results
    assert os.path.getsize(cold["cache"]) > 0
    assert warm["seconds"] < 0.85 * cold["seconds"], results  # measured here: 59 s cold, 38 s warm
