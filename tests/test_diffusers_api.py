"""Research code's way in: SRPO as a stock diffusers ``FluxPipeline`` (``diffusers_pipeline``), and
``srpo_infer.optimize`` on any pipeline with a Flux transformer, in the same order as our own."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flux_pipelines import count_calls

import srpo_infer
from srpo_infer.compile import compiled_graphs, graph_breaks

STEPS = 8
THRESHOLD_THAT_SKIPS = 1.0  # on the tiny model at 640×512: 3 full evaluations of 8 (0.08 and 0.12 skip none)


@pytest.fixture
def stock():
    return srpo_infer.diffusers_pipeline("tiny-random", base="tiny-random", device="cpu")


def _image(pipe, width=640, height=512, steps=2, seed=5, text_tokens=64):
    seeded = torch.Generator().manual_seed(seed)
    out = pipe(
        "a lighthouse at dusk",
        width=width,
        height=height,
        num_inference_steps=steps,
        generator=seeded,
        max_sequence_length=text_tokens,
        output_type="np",
    )
    return out.images[0]


def _count_full_evaluations(pipe) -> list[int]:
    """Calls of the transformer's last block that really ran."""
    return count_calls(pipe.transformer.single_transformer_blocks[-1])


def test_diffusers_pipeline_is_a_stock_flux_pipeline_that_generates(stock):
    from diffusers import FluxPipeline

    assert type(stock) is FluxPipeline
    image = _image(stock)
    assert image.shape == (512, 640, 3) and np.isfinite(image).all()


def test_regional_compile_on_a_stock_pipeline_keeps_the_image_and_compiles_nothing_at_a_new_size(stock):
    before = _image(stock)
    steps = srpo_infer.optimize(stock, compile=True, compile_backend="eager")
    assert steps == ["fuse_qkv", "attention:sdpa", "compile:eager:regional:default"]  # fuse_qkv auto: with compile
    after = _image(stock)
    np.testing.assert_allclose(after, before, atol=1e-5)  # float32, the same kernels: rounding only
    graphs = compiled_graphs()
    _image(stock, width=768, height=512)
    _image(stock, width=512, height=896)
    assert compiled_graphs() == graphs


def test_first_block_cache_on_a_stock_pipeline_skips_blocks_and_none_runs_them_all(stock):
    calls = _count_full_evaluations(stock)
    _image(stock, steps=STEPS)
    assert calls[0] == STEPS
    fresh = srpo_infer.diffusers_pipeline("tiny-random", device="cpu")
    calls = _count_full_evaluations(fresh)
    assert srpo_infer.optimize(fresh, acceleration="regular", cache_threshold=THRESHOLD_THAT_SKIPS)[-1] == (
        f"cache:first-block({THRESHOLD_THAT_SKIPS:g})"
    )
    _image(fresh, steps=STEPS)
    assert 1 <= calls[0] < STEPS


def test_diffusers_hook_makes_the_same_skip_decisions_as_our_cache(tiny_pipe):
    """The precondition for retiring our hand-written cache: with the same noise and a threshold that
    skips, diffusers' FirstBlockCacheConfig hook runs the same number of full evaluations as ours and
    ends at the same latents."""
    from srpo_infer import GenerationRequest

    req = GenerationRequest("a lighthouse at dusk", 640, 512, seed=11, num_inference_steps=STEPS)
    ours = tiny_pipe.run(req, cache_threshold=THRESHOLD_THAT_SKIPS)
    assert 1 < ours.transformer_evaluations < STEPS
    hooked = srpo_infer.diffusers_pipeline("tiny-random", device="cpu")
    calls = _count_full_evaluations(hooked)  # before the hooks, so a skipped block is not counted
    srpo_infer.optimize(hooked, cache_threshold=THRESHOLD_THAT_SKIPS)
    with torch.inference_mode():
        latents = hooked(
            req.prompt,
            width=640,
            height=512,
            num_inference_steps=STEPS,
            guidance_scale=4.5,
            latents=tiny_pipe.prepare_noise([11], 640, 512),
            output_type="latent",
        ).images
    assert calls[0] == ours.transformer_evaluations
    torch.testing.assert_close(latents, ours.latents, rtol=1e-4, atol=1e-4)


def test_triton_attention_on_a_stock_pipeline_runs_our_kernels(stock, monkeypatch):
    pytest.importorskip("triton", reason="the [triton] extra")
    from srpo_infer.kernels import configs, launch

    if not configs.interpreting() and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    small = dict(width=64, height=64, steps=1, text_tokens=16)  # 32 tokens: the interpreter is slow
    reference = _image(stock, **small)
    calls = [0]
    real = launch.flux_attention

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(launch, "flux_attention", counted)
    assert srpo_infer.optimize(stock, attention="triton") == ["attention:triton"]
    ours = _image(stock, **small)
    assert calls[0] == len(stock.transformer.transformer_blocks) + len(stock.transformer.single_transformer_blocks)
    np.testing.assert_allclose(ours, reference, atol=2e-3)


def test_what_only_our_loop_runs_is_refused_on_a_stock_pipeline_in_one_line(stock):
    with pytest.raises(
        ValueError, match=r"compile_scope='full' compiles the stages of srpo_infer's own .*load_pipeline"
    ):
        srpo_infer.optimize(stock, compile=True, compile_scope="full")
    with pytest.raises(ValueError, match=r"context_parallel=N\) under torchrun"):
        srpo_infer.optimize(stock, context_parallel=2)
    with pytest.raises(TypeError, match="did you mean 'quantize'"):
        srpo_infer.optimize(stock, quantise="fp8-weight")
    with pytest.raises(ValueError, match="SRPOPipeline is optimized when it loads"):
        srpo_infer.optimize(srpo_infer.load_pipeline("tiny-random", device="cpu", progress=False))
    srpo_infer.optimize(stock, fuse_qkv=True)
    with pytest.raises(ValueError, match="optimized already \\(fuse_qkv → attention:sdpa\\)"):
        srpo_infer.optimize(stock, fuse_qkv=True)


def _count_attention_calls(pipe) -> list[int]:
    """Calls of the first block's attention that really ran (wrapped before TaylorSeer's hooks)."""
    return count_calls(pipe.transformer.transformer_blocks[0].attn)


@pytest.mark.parametrize(
    "cache, compiled",
    [("taylorseer", False), pytest.param("magcache", True, marks=pytest.mark.slow)],  # compiled: ~4 s, slow step
)
def test_taylorseer_and_magcache_skip_work_and_run_under_regional_compile(cache, compiled):
    """diffusers' TaylorSeer (attention outputs predicted between full steps) and MagCache (FLUX.1-dev
    magnitude ratios) as named options: they skip work, stay close to the uncached image on the tiny
    model, and, compiled, MagCache's hooks wrap the compiled blocks: nothing new compiles at another
    size, and no graph breaks."""
    torch._dynamo.reset()
    plain = srpo_infer.diffusers_pipeline("tiny-random", device="cpu")
    reference = _image(plain, steps=STEPS)
    pipe = srpo_infer.diffusers_pipeline("tiny-random", device="cpu")
    calls = (_count_attention_calls if cache == "taylorseer" else _count_full_evaluations)(pipe)
    compile_options = dict(compile=True, compile_backend="eager") if compiled else {}
    breaks = graph_breaks()
    steps = srpo_infer.optimize(pipe, cache=cache, cache_steps=STEPS, **compile_options)  # cache= alone applies it
    assert steps[-1].startswith(f"cache:{cache}(")
    assert pipe.srpo_steps == steps
    assert (steps[-2] == "compile:eager:regional:default") is compiled
    cached = _image(pipe, steps=STEPS)
    assert 1 <= calls[0] < STEPS
    assert 0 < np.abs(cached - reference).mean() < 0.05  # approximated for real, and close
    if compiled:
        graphs = compiled_graphs()
        _image(pipe, width=768, height=512, steps=STEPS)
        assert compiled_graphs() == graphs
        assert graph_breaks() == breaks


def test_taylorseer_under_compile_is_refused_in_one_line():
    """TaylorSeer hooks the attentions inside the compiled blocks: its per-step choice would break them."""
    pipe = srpo_infer.diffusers_pipeline("tiny-random", device="cpu")
    with pytest.raises(ValueError, match=r"cache='taylorseer' with compile=True: TaylorSeer hooks every attention"):
        srpo_infer.optimize(pipe, cache="taylorseer", compile=True, compile_backend="eager")
    assert not pipe.transformer.is_cache_enabled and pipe.srpo_steps == ["attention:sdpa"]


def test_cache_options_are_checked(stock):
    with pytest.raises(ValueError, match=r"cache must be one of \['first-block', 'taylorseer', 'magcache'\]"):
        srpo_infer.optimize(stock, acceleration="regular", cache="teacache")
    with pytest.raises(ValueError, match="cache_threshold does not apply to cache='taylorseer'"):
        srpo_infer.optimize(stock, cache="taylorseer", cache_threshold=0.1)
    with pytest.raises(ValueError, match="cache_steps must be the calls' num_inference_steps"):
        srpo_infer.optimize(stock, acceleration="high", cache="magcache", cache_steps=1)
    with pytest.raises(ValueError, match="cache='magcache' with acceleration='none' caches nothing: leave accel"):
        srpo_infer.optimize(stock, acceleration="none", cache="magcache", cache_steps=8)
    assert stock.srpo_steps == ["attention:sdpa"]  # what diffusers_pipeline applied; the refusal added nothing


def test_cache_alone_applies_its_engine_at_its_defaults_and_nothing_asks_for_none():
    from srpo_infer.step_cache import stock_cache

    assert stock_cache() is None and stock_cache("none") is None
    assert stock_cache(cache="first-block")[1] == "cache:first-block(0.08)"  # the regular level
    assert stock_cache(cache="magcache", cache_steps=8)[1] == "cache:magcache(0.06, 8 steps)"
    assert stock_cache(cache="taylorseer")[1] == "cache:taylorseer(interval 5)"
    assert stock_cache(cache_threshold=0.2)[1] == "cache:first-block(0.2)"
    assert stock_cache("high", cache="magcache", cache_steps=8)[1] == "cache:magcache(0.06, 8 steps)"


def test_diffusers_pipeline_refuses_taylorseer_under_compile_before_loading(monkeypatch):
    """The same one path as optimize(): the refusal comes before any weight is read."""
    from srpo_infer import loading

    monkeypatch.setattr(loading, "_load", lambda config: pytest.fail("loaded before refusing"))
    with pytest.raises(ValueError, match=r"cache='taylorseer' with compile=True"):
        srpo_infer.diffusers_pipeline("tiny-random", device="cpu", cache="taylorseer", compile=True)


def test_a_stock_cache_with_cuda_graphs_is_refused_in_one_line():
    """diffusers' first-block cache and MagCache keep a block's output across blocks without a copy; a
    CUDA graph replay reuses that memory. optimize() resolves cuda_graphs before choosing the cache."""
    from srpo_infer.step_cache import stock_cache

    for options in ({"acceleration": "regular"}, {"cache": "magcache"}, {"cache_threshold": 0.1}):
        with pytest.raises(ValueError, match="a step cache with CUDA graphs on a diffusers pipeline"):
            stock_cache(**options, cuda_graphs=True)
    assert stock_cache(cuda_graphs=True) is None and stock_cache("none", cuda_graphs=True) is None
