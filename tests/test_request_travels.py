"""The request travels whole from the caller to the denoising loop, so a new request field needs its
definition (request.py), its place in the HTTP body (server/schema.py) and the modules that read it, and no
signature in between (ARCHITECTURE.md, "Adding a request field"; test_architecture_claims recounts them)."""

from __future__ import annotations

import dataclasses
import inspect

import pytest

import srpo_infer.denoise
import srpo_infer.pipeline
from srpo_infer import GenerationRequest, GenerationResult
from srpo_infer.denoise import DenoiseInputs, denoise
from srpo_infer.request import REQUEST_FIELDS
from srpo_infer.runtime import ModelRuntime, RequestModel
from srpo_infer.server.schema import GenerationBody


def test_no_loose_request_fields_in_the_loop_or_the_result():
    """No signature between the request and the loop takes a request field on its own, and the result
    holds the request instead of copies of its fields: a new field needs none of them changed."""
    for fn in (denoise, ModelRuntime.request, srpo_infer.pipeline.SRPOPipeline.run):
        assert not set(inspect.signature(fn).parameters) & set(REQUEST_FIELDS), fn.__qualname__
    assert "request" in {f.name for f in dataclasses.fields(DenoiseInputs)}
    assert not {f.name for f in dataclasses.fields(GenerationResult)} & set(REQUEST_FIELDS)


def test_every_request_field_has_its_place_in_the_http_body():
    sides = {"width", "height"}  # the API sends them as image_size (or OpenAI's size)
    assert set(REQUEST_FIELDS) - sides <= set(GenerationBody.model_fields)
    assert {"image_size", "size"} <= set(GenerationBody.model_fields)


def test_the_loop_receives_the_very_request_generate_was_given(tiny_pipe, monkeypatch):
    """The request's model (what the loop calls) is built from the very request generate was given."""
    seen = []
    real = RequestModel.__init__

    def spy(self, runtime, inputs):
        seen.append(inputs)
        real(self, runtime, inputs)

    monkeypatch.setattr(RequestModel, "__init__", spy)
    req = GenerationRequest("a fox", width=576, height=512, seed=5, num_inference_steps=2, guidance_scale=3.0)
    result = tiny_pipe.generate(req)
    assert seen[0].request is req and result.request is req
    assert (result.seed, result.width, result.guidance_scale) == (5, 576, 3.0)


def test_a_bad_request_cannot_exist_and_replace_checks_again():
    with pytest.raises(ValueError, match=r"width must be an integer in \[512, 1536\]"):
        GenerationRequest("a fox", width=500)
    req = GenerationRequest("a fox")
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.seed = 3
    with pytest.raises(ValueError, match="seed must be an integer"):
        dataclasses.replace(req, seed=-1)
    assert dataclasses.replace(req, guidance_scale=3).guidance_scale == 3.0 and req.loras == ()


def test_the_loop_is_a_function_of_tensors_and_reads_no_pipeline():
    """denoise() runs with a model callable, a scheduler and its timesteps, and noise: no pipeline exists
    here. denoise.py names no pipeline object at all (issue 41)."""
    import ast
    from pathlib import Path

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    from srpo_infer.denoise import schedule

    class Halving:
        calls = 0

        def __call__(self, latents, t):
            Halving.calls += 1
            return 0.5 * latents

        def stop(self, asked):
            return asked

    scheduler, timesteps = schedule(FlowMatchEulerDiscreteScheduler(), image_tokens=64, steps=3, device="cpu")
    noise = torch.ones(1, 64, 4)
    latents = denoise(Halving(), scheduler, timesteps, noise)
    assert Halving.calls == 3 and latents.shape == noise.shape and not torch.equal(latents, noise)
    source = Path(srpo_infer.denoise.__file__).read_text()
    names = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
    names |= {a.arg for a in ast.walk(ast.parse(source)) if isinstance(a, ast.arg)}
    assert not names & {"pipe", "pipeline"}, names & {"pipe", "pipeline"}
    assert "from .pipeline" not in source and "optimized" not in source
