"""acceleration = none | regular | high: the first-block cache on the tiny model (thresholds, full evaluations
counted, a threshold that skips every step after the first), and its refusal under the whole-model compile."""

from __future__ import annotations

import pytest
import torch
from helpers import EAGER_COMPILE, load_tiny, standard_request

from srpo_infer.step_cache import ACCELERATION_THRESHOLDS

STEPS = 6
REQ = standard_request(height=576, seed=8, num_inference_steps=STEPS)


def test_the_docs_state_the_thresholds_the_levels_use():
    """docs/step-caching.md names each level's threshold and where it comes from: it must say what the
    code runs (a changed threshold changes the docs, or this fails)."""
    import re
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "step-caching.md").read_text()
    stated = {level: float(v) for level, v in re.findall(r"`(regular|high)` (0\.\d+)", text)}
    assert stated == {k: v for k, v in ACCELERATION_THRESHOLDS.items() if v is not None}
    assert ACCELERATION_THRESHOLDS["none"] is None


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
    pipe = load_tiny(**EAGER_COMPILE, compile_scope="full")
    assert pipe.optimized.runtime.step_cache is None
    with pytest.raises(
        ValueError, match=r"acceleration 'regular' .*\(compile_scope='full'\).* use compile_scope='regional'"
    ):
        pipe.generate("a fox", width=512, height=512, num_inference_steps=1, acceleration="regular")


# ---------------------------------------------------------------- the hooks, on the transformer itself


def _steps(count: int = 6) -> list[dict]:
    """Transformer inputs of a mock denoising run: the same prompt and timestep, slowly drifting image
    tokens, so the first block's residual changes a little from step to step (0.15% per step here;
    the random tiny model's residual follows the timestep far more than a trained one)."""
    from flux_pipelines import direct_transformer_inputs

    base = direct_transformer_inputs(torch.Generator().manual_seed(3))
    drift = torch.randn(base["hidden_states"].shape, generator=torch.Generator().manual_seed(4))
    return [{**base, "hidden_states": base["hidden_states"] + 0.01 * i * drift} for i in range(count)]


def _run_ours(transformer, threshold, steps) -> tuple[list[torch.Tensor], int]:
    from srpo_infer.first_block_cache import RequestCache

    cache = RequestCache(transformer)
    with torch.inference_mode(), cache.request(threshold):
        outputs = [transformer(**inputs)[0] for inputs in steps]
    return outputs, cache.evaluations


def _run_diffusers(transformer, threshold, steps) -> list[torch.Tensor]:
    from diffusers.hooks import FirstBlockCacheConfig

    transformer.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    with torch.inference_mode(), transformer.cache_context("check"):
        return [transformer(**inputs)[0] for inputs in steps]


SKIPS_SOME = 0.002  # on _steps(): every other step skipped


def test_our_hooks_are_diffusers_first_block_cache_bit_for_bit():
    """The same rule and the same arithmetic as diffusers' FirstBlockCacheConfig: the same steps
    skipped, the same outputs to the bit, on the transformer called directly."""
    from srpo_infer.tiny import build_tiny_transformer

    steps = _steps()
    ours, evaluations = _run_ours(build_tiny_transformer().eval(), SKIPS_SOME, steps)
    theirs = _run_diffusers(build_tiny_transformer().eval(), SKIPS_SOME, steps)
    assert 1 < evaluations < len(steps)
    for got, want in zip(ours, theirs, strict=True):
        assert torch.equal(got, want)


def test_without_a_threshold_the_hooks_only_call_the_blocks(monkeypatch):
    """acceleration none: every block runs, no decision (no host sync), the plain transformer's output."""
    from srpo_infer.first_block_cache import RequestCache
    from srpo_infer.tiny import build_tiny_transformer

    steps = _steps(3)
    plain = build_tiny_transformer().eval()
    with torch.inference_mode():
        want = [plain(**inputs)[0] for inputs in steps]
    monkeypatch.setattr(RequestCache, "decide", lambda self, residual: pytest.fail("a decision at threshold None"))
    got, evaluations = _run_ours(build_tiny_transformer().eval(), None, steps)
    assert evaluations == len(steps)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def _replay_outputs_in_place(transformer) -> None:
    """Emulate CUDA graph replay under compiled blocks: each block class writes its outputs into one
    static pair of tensors, overwritten by the next call of any block of that class (as a replayed
    graph's output memory is), before any hook is installed."""
    static: dict[type, tuple[torch.Tensor, torch.Tensor]] = {}

    def replayed(block):
        forward = block.forward

        def run(*args, **kwargs):
            fresh = forward(*args, **kwargs)
            kept = static.get(type(block))
            if kept is None or kept[1].shape != fresh[1].shape:
                kept = static[type(block)] = (fresh[0].clone(), fresh[1].clone())
            kept[0].copy_(fresh[0])
            kept[1].copy_(fresh[1])
            return kept

        return run

    for block in [*transformer.transformer_blocks, *transformer.single_transformer_blocks]:
        block.forward = replayed(block)


def test_what_the_cache_keeps_survives_outputs_overwritten_by_a_replay():
    """A CUDA graph reuses its output memory at the next replay. Our cache copies the first block's
    output it keeps, so it gives the same outputs with outputs overwritten in place; diffusers' hook
    keeps that output itself and gives others (which shows the emulation bites)."""
    from srpo_infer.tiny import build_tiny_transformer

    steps = _steps()
    want, evaluations = _run_ours(build_tiny_transformer().eval(), SKIPS_SOME, steps)
    replayed = build_tiny_transformer().eval()
    _replay_outputs_in_place(replayed)
    got, replayed_evaluations = _run_ours(replayed, SKIPS_SOME, steps)
    assert replayed_evaluations == evaluations < len(steps)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    theirs = build_tiny_transformer().eval()
    _replay_outputs_in_place(theirs)
    assert any(not torch.equal(g, w) for g, w in zip(_run_diffusers(theirs, SKIPS_SOME, steps), want, strict=True))
