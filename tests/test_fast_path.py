"""Quantization and torch.compile on the tiny model (CPU): correctness, recompiles, warm starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import EAGER_COMPILE, load_tiny, standard_request

import srpo_infer
from srpo_infer import GenerationRequest
from srpo_infer.bench.deviation import relative_error
from srpo_infer.compile import graph_breaks
from srpo_infer.quantize import weight_bytes

REQ = standard_request()


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


@pytest.fixture(scope="module")
def compiled(eager_latents):
    """One regional compile (backend "eager": the same dynamo capture and graph count as Inductor,
    without a C++ build), checked against eager and warmed up, shared by the tests below: tracing the
    blocks is what costs here, and every test below asks about that one set of graphs."""
    torch._dynamo.reset()
    pipe = srpo_infer.load_pipeline(
        "tiny-random", device="cpu", progress=False, compile=True, compile_backend="eager", cache_dir=None
    )
    before, breaks = pipe.compiled_graphs(), graph_breaks()  # process-wide counters
    first = pipe.generate_latents(REQ)
    pipe.warmup([(512, 512)])  # at acceleration none only: a request that skips steps runs the same graphs
    assert graph_breaks() == breaks, "the step cache's hooks broke a compiled block"
    return pipe, first, pipe.compiled_graphs() - before


def test_regional_compile_matches_eager_and_settles_at_warmup(compiled, eager_latents):
    pipe, first, settled = compiled
    assert pipe.optimized.steps[0] == "fuse_qkv" and pipe.optimized.steps[-1] == "compile:eager:regional:default"
    # Regional compile works in place and leaves the VAE eager (load_pipeline's docstring says so).
    assert (
        pipe.optimized.runtime.transformer is pipe.flux.transformer
        and pipe.optimized.vae_decode == pipe.flux.vae.decode
    )
    assert relative_error(first, eager_latents) < 1e-5
    # One graph per block class, and again for each at the first new size (dims made symbolic then).
    assert 2 <= settled <= 4, settled


def test_regional_compile_compiles_nothing_at_a_new_size_after_warmup(compiled):
    """Latents, not images: the regional compile leaves the VAE eager, so decoding would add only time
    (a 1536² decode is most of a minute on this CPU)."""
    pipe, _, _ = compiled
    graphs, breaks = pipe.compiled_graphs(), graph_breaks()
    for w, h in AFTER_WARMUP:
        req = GenerationRequest("x", w, h, seed=1, num_inference_steps=1, acceleration="high")
        assert pipe.generate_latents(req).shape == (1, (w // 16) * (h // 16), 16)
    assert pipe.compiled_graphs() == graphs, "a new resolution compiled after warm-up"
    assert graph_breaks() == breaks


def test_a_request_that_skips_steps_compiles_nothing_after_a_warmup_that_skipped_none(compiled):
    """The step cache's hooks wrap the compiled blocks: a skipped step runs the first block's graph and
    eager additions, so the first request that caches (at a new size) compiles no new graph."""
    pipe, _, _ = compiled
    graphs, breaks = pipe.compiled_graphs(), graph_breaks()
    skipping = GenerationRequest("x", 640, 576, seed=2, num_inference_steps=3)
    assert pipe.run(skipping, cache_threshold=1e9).transformer_evaluations == 1
    assert pipe.compiled_graphs() == graphs and graph_breaks() == breaks


@pytest.mark.slow  # a second trace of every block with a symbolic batch (~15 s): CI's slow step
def test_regional_compile_compiles_a_batch_once_not_per_size(compiled):
    pipe, _, settled = compiled
    start = pipe.compiled_graphs()
    pipe.generate_latents(GenerationRequest("x", 512, 512, seed=1, num_inference_steps=1, num_images=2))
    after_batch = pipe.compiled_graphs()
    pipe.generate_latents(GenerationRequest("x", 640, 512, seed=1, num_inference_steps=1, num_images=3))
    assert pipe.compiled_graphs() == after_batch <= start + settled  # batch 1 → N compiles once, not per N


STEPS = 4
CACHED = GenerationRequest("a fox in the snow", 512, 576, seed=8, num_inference_steps=STEPS)


def test_regional_compile_runs_the_step_cache_hooks_and_skips_the_same_steps(compiled, tiny_pipe):
    """Regional compile traces the step cache's hooks inside the compiled blocks (the skip decision a
    graph break): with a threshold that skips, the same steps are skipped and the latents match eager."""
    pipe, _, _ = compiled
    for threshold in (1.0, None):
        got, want = pipe.run(CACHED, cache_threshold=threshold), tiny_pipe.run(CACHED, cache_threshold=threshold)
        assert got.transformer_evaluations == want.transformer_evaluations
        assert torch.allclose(got.latents, want.latents, rtol=1e-5, atol=1e-5)
    assert (
        want.transformer_evaluations == STEPS
        and 1 < tiny_pipe.run(CACHED, cache_threshold=1.0).transformer_evaluations < STEPS
    )


def test_a_fused_lora_leaves_a_plain_model_that_every_optimization_takes(compiled, tmp_path):
    """Merged into the weights, a LoRA leaves the plain model: QKV fusion and the compile still apply,
    and the compiled blocks (the same graphs as the plain pipeline's above: the weights are their
    inputs) give the LoRA's output."""
    pytest.importorskip("peft")
    from loras import diffusers_lora, lora_factors
    from safetensors.torch import save_file

    from srpo_infer.lora import has_adapter

    path = tmp_path / "a.safetensors"
    save_file(diffusers_lora(lora_factors(64, 2, 4, seed=1)), path)
    compile_options = dict(compile=True, compile_backend="eager", cache_dir=None)
    pipe = srpo_infer.load_pipeline("tiny-random", device="cpu", progress=False, lora=str(path), **compile_options)
    assert not has_adapter(pipe.transformer)
    assert pipe.optimized.steps[:2] == ["lora:fused(1)", "fuse_qkv"]  # QKV fusion still applies after the merge
    assert pipe.optimized.steps[-1] == "compile:eager:regional:default"
    eager = srpo_infer.load_pipeline("tiny-random", device="cpu", progress=False, lora=str(path))
    want = eager.generate_latents(REQ)
    assert relative_error(want, compiled[1]) > 1e-3  # the LoRA changes the image
    assert relative_error(pipe.generate_latents(REQ), want) < 1e-5


@pytest.mark.slow  # ~45 s: the whole transformer and the VAE decoder
def test_full_compile_matches_eager_and_compiles_nothing_after_warmup(eager_latents):
    """Backend "eager": the same dynamo capture (and graph count) as Inductor, without a C++ build."""
    torch._dynamo.reset()
    pipe = load_tiny(**EAGER_COMPILE, compile_scope="full")
    assert pipe.optimized.steps[0] == "fuse_qkv" and pipe.optimized.steps[-1] == "compile:eager:full:default"
    before = pipe.compiled_graphs()  # a process-wide counter
    got = pipe.generate_latents(REQ)
    assert relative_error(got, eager_latents) < 1e-5
    pipe.warmup([(512, 512)], accelerations=("none",))  # one graph, no step cache
    settled = pipe.compiled_graphs() - before
    assert 1 <= settled <= 3, settled  # the transformer and the VAE's small/large conv variants
    for w, h in AFTER_WARMUP:  # images: the whole-model compile compiles the VAE decoder too
        r = pipe.generate("x", width=w, height=h, seed=1, num_inference_steps=1)
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


def test_cuda_graphs_are_on_by_default_for_the_whole_model_compile_on_a_gpu_only():
    """auto: one replay per step where the compiled code is one graph (full) or tuned (max-autotune);
    never on a CPU, and off for the regional compile's 57 block calls unless asked for."""
    from srpo_infer.compile import inductor_options
    from srpo_infer.config import PipelineConfig, resolve_cuda_graphs

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_cuda_graphs("auto", cuda, "full", "default") is True
    assert resolve_cuda_graphs("auto", cuda, "regional", "default") is False
    assert resolve_cuda_graphs("auto", cuda, "regional", "max-autotune") is True
    assert resolve_cuda_graphs(True, cuda, "regional", "default") is True
    assert resolve_cuda_graphs(False, cuda, "full", "max-autotune") is False
    assert (
        resolve_cuda_graphs("auto", cpu, "full", "max-autotune") is resolve_cuda_graphs(True, cpu, "full", "") is False
    )
    assert inductor_options(cuda, "default", cuda_graphs=True)["triton.cudagraphs"] is True
    assert "triton.cudagraphs" not in inductor_options(cuda, "max-autotune", cuda_graphs=False)
    assert (
        PipelineConfig(model="tiny-random", device="cpu", compile=True, compile_scope="full").resolved().cuda_graphs
        is False
    )
    with pytest.raises(ValueError, match="cuda_graphs must be True, False or 'auto', got 'yes'"):
        PipelineConfig(model="tiny-random", device="cpu", cuda_graphs="yes").resolved()


def test_the_compiled_loop_marks_each_step_for_cuda_graphs(compiled, monkeypatch):
    """Each transformer call starts a new CUDA graph step, so a replay never overwrites outputs the
    loop still reads (harmless, and counted here, on a CPU)."""
    pipe, _, _ = compiled
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    pipe.run(GenerationRequest("x", 512, 512, seed=1, num_inference_steps=3))
    assert len(marks) == 3


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


def test_the_bench_flop_count_builds_no_graph_on_a_compiled_pipeline(compiled):
    """The bench counts FLOPs with forward hooks on every linear layer; run through the compiled blocks
    they made dynamo trace anew (5 graphs on the tiny model, counted as the next row's recompiles), so
    the count runs eager."""
    from srpo_infer.bench.configs import Setting
    from srpo_infer.bench.flops import count_flops

    pipe, _, _ = compiled
    graphs = pipe.compiled_graphs()
    assert count_flops(pipe, Setting(512, 512, 1)) > 0
    assert pipe.compiled_graphs() == graphs
