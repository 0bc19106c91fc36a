"""Per-request constants of the transformer (rotary embedding, text projection, guidance and pooled
embeddings) computed once per request: the same outputs bit for bit, fewer calls, nothing reused
outside a request or across requests."""

from __future__ import annotations

import torch
from flux_pipelines import count_calls, direct_transformer_inputs

from srpo_infer import GenerationRequest
from srpo_infer.request_constants import CONSTANT_MODULES, RequestConstants
from srpo_infer.tiny import build_tiny_transformer


def _calls_of_constant_modules(transformer) -> dict[str, list[int]]:
    """Counters on the modules' own forwards, installed before the hooks (so a reuse is not counted)."""
    return {name: count_calls(transformer.get_submodule(name)) for name in CONSTANT_MODULES}


def _steps(count: int) -> list[dict]:
    base = direct_transformer_inputs(torch.Generator().manual_seed(5))
    return [
        {**base, "hidden_states": base["hidden_states"] * (1 - i / 10), "timestep": torch.tensor([1 - i / count])}
        for i in range(count)
    ]


def test_within_a_request_each_constant_is_computed_once_and_the_outputs_are_unchanged():
    steps = _steps(4)
    plain = build_tiny_transformer()
    with torch.inference_mode():
        want = [plain(**inputs)[0] for inputs in steps]
    transformer = build_tiny_transformer()
    calls = _calls_of_constant_modules(transformer)
    constants = RequestConstants(transformer)
    with torch.inference_mode():
        with constants.request():
            got = [transformer(**inputs)[0] for inputs in steps]
        assert {name: c[0] for name, c in calls.items()} == dict.fromkeys(CONSTANT_MODULES, 1)
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
        with constants.request():  # a new request computes again: nothing carried over
            transformer(**steps[0])
        transformer(**steps[0])  # outside a request: computed every time
        transformer(**steps[1])
    assert {name: c[0] for name, c in calls.items()} == dict.fromkeys(CONSTANT_MODULES, 4)


def test_an_input_of_another_shape_within_a_request_is_computed_again():
    transformer = build_tiny_transformer()
    calls = _calls_of_constant_modules(transformer)
    constants = RequestConstants(transformer)
    inputs = direct_transformer_inputs(torch.Generator().manual_seed(6))
    longer = {**inputs, "encoder_hidden_states": torch.randn(1, 9, 32), "txt_ids": torch.zeros(9, 3)}
    plain = build_tiny_transformer()
    with torch.inference_mode(), constants.request():
        transformer(**inputs)
        assert torch.equal(transformer(**longer)[0], plain(**longer)[0])
    assert calls["pos_embed"][0] == calls["context_embedder"][0] == 2


def test_the_pipeline_computes_the_rotary_embedding_once_per_request(tiny_pipe):
    """Our loop opens a request around its steps; the hooks' inner forward runs once per request."""
    from diffusers.hooks import HookRegistry

    from srpo_infer.request_constants import HOOK

    hook = HookRegistry.check_if_exists_or_initialize(tiny_pipe.transformer.pos_embed).get_hook(HOOK)
    inner, calls = hook.fn_ref.original_forward, [0]

    def counted(*args, **kwargs):
        calls[0] += 1
        return inner(*args, **kwargs)

    hook.fn_ref.original_forward = counted
    try:
        tiny_pipe.run(GenerationRequest("a kite", 512, 512, seed=1, num_inference_steps=3))
        tiny_pipe.run(GenerationRequest("a kite", 640, 512, seed=1, num_inference_steps=2))
    finally:
        hook.fn_ref.original_forward = inner
    assert calls[0] == 2
