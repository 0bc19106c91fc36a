"""Quantization and torch.compile on the tiny model (CPU): correctness, recompiles, warm starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import srpo_infer
from srpo_infer import GenerationRequest
from srpo_infer.bench.deviation import relative_error
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

    pipe = srpo_infer.load_pipeline(
        "tiny-random",
        device="cpu",
        progress=False,
        quantize="fp8-weight",
        quantize_skip=("transformer_blocks.*",),
        quantize_text_encoder=True,
    )
    t = pipe.transformer
    assert type(t.transformer_blocks[0].attn.to_q) is torch.nn.Linear
    assert isinstance(t.proj_out, QLinear)  # no longer skipped
    assert any(isinstance(m, QLinear) for m in pipe.flux.text_encoder_2.modules())
    assert "quantize:t5:fp8-weight" in pipe.optimized.steps


def test_every_flag_does_what_it_says():
    """fuse_qkv=False holds under compile; quantize_text_encoder works without quantize."""
    pytest.importorskip("optimum.quanto")
    from optimum.quanto import QLinear

    pipe = srpo_infer.load_pipeline(
        "tiny-random",
        device="cpu",
        progress=False,
        compile=True,
        compile_backend="eager",
        fuse_qkv=False,
        quantize_text_encoder=True,
        cache_dir=None,
    )
    assert "fuse_qkv" not in pipe.optimized.steps
    assert not pipe.transformer.transformer_blocks[0].attn.fused_projections
    assert "quantize:t5:fp8-weight" in pipe.optimized.steps and pipe.config.quantize is None
    assert any(isinstance(m, QLinear) for m in pipe.flux.text_encoder_2.modules())
    assert not any(isinstance(m, QLinear) for m in pipe.transformer.modules())
    with pytest.raises(ValueError, match="fuse_qkv must be"):
        srpo_infer.load_pipeline("tiny-random", device="cpu", fuse_qkv="yes")


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
    with pytest.raises(TypeError, match=r"load_pipeline\(\): unknown keyword argument 'turbo'"):
        srpo_infer.load_pipeline("tiny-random", device="cpu", turbo=True)


# Sizes a warmed-up pipeline must serve without compiling anything new (the three, extremes).
AFTER_WARMUP = [(1024, 1024), (1440, 512), (768, 1024), (512, 1536), (1536, 1536)]


@pytest.mark.parametrize("scope", ["regional", pytest.param("full", marks=pytest.mark.slow)])  # full: ~45 s
def test_compile_matches_eager_and_compiles_nothing_after_warmup(eager_latents, scope):
    """Backend "eager": the same dynamo capture (and graph count) as Inductor, without a C++ build."""
    torch._dynamo.reset()
    pipe = srpo_infer.load_pipeline(
        "tiny-random",
        device="cpu",
        progress=False,
        compile=True,
        compile_scope=scope,
        compile_backend="eager",
        cache_dir=None,
    )
    assert pipe.optimized.steps[0] == "fuse_qkv" and pipe.optimized.steps[-1] == f"compile:eager:{scope}:default"
    before = pipe.compiled_graphs()  # a process-wide counter
    got = pipe.generate_latents(REQ)
    assert relative_error(got, eager_latents) < 1e-5
    accelerations = ("none", "high") if scope == "regional" else ("none",)  # full: one graph, no step cache
    pipe.warmup([(512, 512)], accelerations=accelerations)
    settled = pipe.compiled_graphs() - before
    # Regional: per block class, the block with the step cache's hooks computing (the first block in two
    # pieces around the skip decision) and skipping, plus the single blocks' strided text slice;
    # full: the transformer and the VAE's small/large conv variants.
    assert 1 <= settled <= (6 if scope == "regional" else 3), settled
    for w, h in AFTER_WARMUP:
        r = pipe.generate("x", width=w, height=h, seed=1, num_inference_steps=1, acceleration=accelerations[-1])
        assert r.images[0].size == (w, h)
    assert pipe.compiled_graphs() - before == settled, "a new resolution compiled after warm-up"
    pipe.generate("x", width=512, height=512, seed=1, num_inference_steps=1, num_images=2)
    after_batch = pipe.compiled_graphs() - before
    pipe.generate("x", width=640, height=512, seed=1, num_inference_steps=1, num_images=3)
    assert pipe.compiled_graphs() - before == after_batch <= 2 * settled  # batch 1 → N compiles once, not per N


def test_compile_options_are_checked():
    with pytest.raises(ValueError, match=r"compile_scope must be one of \['regional', 'full'\], got 'blocks'"):
        srpo_infer.load_pipeline("tiny-random", device="cpu", compile=True, compile_scope="blocks")
    with pytest.raises(ValueError, match="compile_mode must be one of"):
        srpo_infer.load_pipeline("tiny-random", device="cpu", compile=True, compile_mode="fast")


def test_default_inductor_options_skip_the_slow_tuning():
    """Coordinate-descent tuning and max-autotune kept the H200's first call past ~400 s: opt-in only."""
    from srpo_infer.compile import inductor_options

    cuda = torch.device("cuda")
    default = inductor_options(cuda)
    assert not default.get("coordinate_descent_tuning") and not default.get("max_autotune")
    assert "triton.cudagraphs" not in default
    tuned = inductor_options(cuda, "max-autotune")
    assert tuned["coordinate_descent_tuning"] and tuned["max_autotune"] and tuned["triton.cudagraphs"]


def _warmup_process(tmp_path, run: int) -> dict:
    out = tmp_path / f"report-{run}.json"
    # A fresh Inductor cache per process: the second one can only be warm through our saved artifacts.
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{run}")}
    cmd = [
        sys.executable,
        "-m",
        "srpo_infer.cli",
        "warmup",
        "--model",
        "tiny-random",
        "--device",
        "cpu",
        "--sizes",
        "512x512",
        "--check-sizes",
        "640x512",
        "--cache-dir",
        str(tmp_path / "cache"),
        "--out",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=280, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_saved_compile_artifacts_make_the_second_process_hit_the_cache(tmp_path):
    """Cold start compiles the regions with Inductor and saves the mega-cache; a fresh process with an
    empty Inductor cache loads it and compiles nothing: every FX graph is a cache hit."""
    cold = _warmup_process(tmp_path, 0)
    cold_graphs = cold["compile_cache"]["fxgraph_cache_miss"] + cold["compile_cache"]["fxgraph_cache_hit"]
    # Hits in the cold process: graphs identical to one it built already (the step cache's skipping variants).
    assert cold["compile_cache"]["fxgraph_cache_miss"] >= 2
    assert os.path.getsize(cold["cache_file"]) > 0
    warm = _warmup_process(tmp_path, 1)
    assert warm["cache_file"] == cold["cache_file"]
    assert warm["compile_cache"]["fxgraph_cache_miss"] == 0, warm["compile_cache"]
    assert warm["compile_cache"]["fxgraph_cache_hit"] == cold_graphs
    assert cold["graphs_compiled_after_warmup"] == warm["graphs_compiled_after_warmup"] == 0
