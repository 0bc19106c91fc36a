"""acceleration = none | regular | high: the first-block cache on the tiny model and on fake stages."""

from __future__ import annotations

import pytest
import torch

import srpo_infer
from srpo_infer import GenerationRequest
from srpo_infer.step_cache import ACCELERATION_THRESHOLDS, FirstBlockCache, FluxStages
from srpo_infer.tiny import build_tiny_transformer

STEPS = 6
REQ = GenerationRequest("a fox in the snow", 512, 576, seed=8, num_inference_steps=STEPS)


def test_levels_use_the_published_thresholds():
    assert ACCELERATION_THRESHOLDS == {"none": None, "regular": 0.08, "high": 0.12}


def test_stages_compute_exactly_the_transformer_forward():
    from test_attention_processor import transformer_inputs

    model = build_tiny_transformer()
    inputs = transformer_inputs(seed=4, txt=9, h=8, w=6)
    stages = FluxStages(model)
    with torch.inference_mode():
        ref = model(**inputs)[0]
        kw = {k: v for k, v in inputs.items() if k != "return_dict"}
        hidden, encoder, temb, cos, sin, _ = stages.front(**kw)
        out = stages.head(stages.rest(hidden, encoder, temb, cos, sin), temb)
    assert torch.equal(out, ref)


def test_threshold_zero_is_identical_to_none(tiny_pipe):
    exact = tiny_pipe.generate_latents(REQ)
    cached = tiny_pipe.generate_latents(REQ, cache_threshold=0.0)
    assert torch.equal(exact, cached)
    r = tiny_pipe.generate("a fox", width=512, height=512, seed=1, num_inference_steps=STEPS, cache_threshold=0.0)
    assert r.transformer_evaluations == STEPS


def test_huge_threshold_runs_the_full_stack_only_on_the_first_step(tiny_pipe):
    r = tiny_pipe.generate("a fox", width=512, height=512, seed=1, num_inference_steps=STEPS, cache_threshold=1e9)
    assert r.transformer_evaluations == 1
    exact = tiny_pipe.generate_latents(REQ)
    assert not torch.equal(tiny_pipe.generate_latents(REQ, cache_threshold=1e9), exact)
    none = tiny_pipe.generate("a fox", width=512, height=512, seed=1, num_inference_steps=STEPS)
    assert none.transformer_evaluations == STEPS


@pytest.mark.parametrize("level", ["regular", "high"])
def test_levels_through_generate_report_evaluations(tiny_pipe, level):
    r = tiny_pipe.generate("a fox", width=512, height=512, seed=1, num_inference_steps=STEPS, acceleration=level)
    # Random weights do not evolve between steps like a trained model: on the tiny model neither level
    # skips a step (README, step caching). Skipping itself is tested above with a huge threshold.
    assert r.transformer_evaluations == STEPS


def test_cache_decisions_on_scripted_residuals():
    """Fake stages whose first-block residual follows a script: skip exactly when the change from the
    last *computed* residual is under the threshold, so slow drift eventually forces a full step."""
    scales = [1.0, 1.05, 1.09, 1.12, 1.3, 1.31]  # change vs last computed: -, .05, .09, .12, ...
    calls = {"rest": 0}
    step = {"i": 0}

    def front(x):
        r = torch.full((1, 4, 2), scales[step["i"]])
        return x, x, None, None, None, r

    def rest(hidden, encoder, temb, cos, sin):
        calls["rest"] += 1
        return hidden + 10

    def head(hidden, temb):
        return hidden

    cache = FirstBlockCache(threshold=0.1)
    outs = []
    for i in range(len(scales)):
        step["i"] = i
        outs.append(cache.step(front, rest, head, x=torch.zeros(1, 4, 2)))
    # step 0 full; 1 (0.05) cached; 2 (0.09) cached; 3 (0.12 > 0.1) full; 4 (1.3/1.12-1 = 0.16) full;
    # 5 (1.31/1.3 - 1 ≈ 0.008) cached
    assert calls["rest"] == cache.full_evaluations == 3
    assert cache.cached_steps == 3
    assert all(torch.equal(o, torch.full((1, 4, 2), 10.0)) for o in outs)  # cached residual reused


def test_bad_threshold_is_clear(tiny_pipe):
    with pytest.raises(ValueError, match="cache_threshold must be a number >= 0"):
        tiny_pipe.generate("a", width=512, height=512, cache_threshold=-1)


def test_compiled_stages_match_the_exact_path():
    """The whole-model compile splits the step cache into three compiled stages; threshold 0 runs them
    all every step, so the result equals the eager pipeline's (sizes and recompiles: test_fast_path)."""
    torch._dynamo.reset()
    pipe = srpo_infer.load_pipeline(
        "tiny-random",
        device="cpu",
        progress=False,
        compile=True,
        compile_scope="full",
        compile_backend="eager",
        cache_dir=None,
    )
    exact = srpo_infer.load_pipeline("tiny-random", device="cpu", progress=False)
    got = pipe.generate_latents(REQ, cache_threshold=0.0)
    assert torch.allclose(got, exact.generate_latents(REQ), rtol=1e-5, atol=1e-5)
