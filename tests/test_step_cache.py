"""acceleration = none | regular | high: the first-block cache on the tiny model (thresholds, full evaluations
counted, a threshold that skips every step after the first), and its refusal under the whole-model compile."""

from __future__ import annotations

import pytest
import torch

import srpo_infer
from srpo_infer import GenerationRequest
from srpo_infer.step_cache import ACCELERATION_THRESHOLDS

STEPS = 6
REQ = GenerationRequest("a fox in the snow", 512, 576, seed=8, num_inference_steps=STEPS)


def test_levels_use_the_published_thresholds():
    assert ACCELERATION_THRESHOLDS == {"none": None, "regular": 0.08, "high": 0.12}


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


def test_bad_threshold_is_clear(tiny_pipe):
    with pytest.raises(ValueError, match="cache_threshold must be a number >= 0"):
        tiny_pipe.generate("a", width=512, height=512, cache_threshold=-1)


def test_the_whole_model_compile_refuses_step_caching_in_one_line():
    pipe = srpo_infer.load_pipeline(
        "tiny-random",
        device="cpu",
        progress=False,
        compile=True,
        compile_scope="full",
        compile_backend="eager",
        cache_dir=None,
    )
    assert pipe.optimized.step_cache is None
    with pytest.raises(
        ValueError, match=r"acceleration 'regular' .*\(compile_scope='full'\).* use compile_scope='regional'"
    ):
        pipe.generate("a fox", width=512, height=512, num_inference_steps=1, acceleration="regular")
