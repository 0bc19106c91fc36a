"""The denoising loop: what it starts from (a request prepared once), how it is asked to run, and
the flow-matching Euler loop itself, one transformer evaluation per step (through the first-block
cache when a threshold is set, padded and split when the image is split over processes).

The loop is ours (so it can be timed, cached, cancelled and previewed) but every piece of Flux math
comes from diffusers' ``FluxPipeline``: the timestep shift, the scheduler, the guidance embedding.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .compile import mark_dynamic
from .request import GenerationRequest


class GenerationCancelled(Exception):
    """``should_stop()`` turned true: the generation stopped before its next denoising step."""


class EncodedPrompt(NamedTuple):
    """The text side of a request: T5 sequence and CLIP pooled embeddings (one row per image), the
    text tokens' position ids, and how many T5 tokens the prompt used."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    text_ids: torch.Tensor
    text_tokens: int


@dataclass(frozen=True)
class DenoiseInputs:
    """What the loop starts from, prepared once from a request (BFL's ``prepare``): the request itself
    (size, steps, guidance travel with it), its packed noise, its encoded prompt and the image tokens'
    position ids."""

    request: GenerationRequest
    noise: torch.Tensor
    text: EncodedPrompt
    img_ids: torch.Tensor


@dataclass(frozen=True)
class LoopOptions:
    """How to run the loop, beside the request: a progress bar, the first-block cache's threshold
    (``None``: exact), ``should_stop()`` asked before every step, ``on_step(step, latents)`` after it,
    ``preview = (steps, fn)``: ``fn(step, x0)`` after those steps with the clean-latent estimate."""

    progress: bool = False
    cache_threshold: float | None = None
    should_stop: Callable[[], bool] | None = None
    on_step: Callable[[int, torch.Tensor], None] | None = None
    preview: tuple[Collection[int], Callable[[int, torch.Tensor], None]] | None = None


@dataclass
class DenoiseResult:
    """What :meth:`SRPOPipeline.run` returns: packed latents before decoding, and facts about the run.

    ``timings`` holds seconds only (``encode``, ``denoise``); ``transformer_evaluations`` counts full
    transformer evaluations (fewer than the steps when step caching skipped some).
    """

    latents: torch.Tensor
    timings: dict[str, float]
    text_tokens: int
    transformer_evaluations: int


def denoise(pipe, inputs: DenoiseInputs, loop: LoopOptions | None = None) -> tuple[torch.Tensor, int]:
    """Run the flow-matching Euler loop of ``pipe`` (an :class:`~srpo_infer.SRPOPipeline`) from the
    packed noise to packed latents.

    With ``loop.preview = (steps, fn)``: after each of those 0-based steps, ``fn(step, x0)`` gets the
    estimate of the clean latents, ``x0 = latents - sigma * noise_pred`` (flow matching), before the
    update. Returns the latents and the number of full transformer evaluations (fewer than the steps
    when the first-block cache skipped some). Raises :class:`GenerationCancelled` before a step when
    ``loop.should_stop()`` is true.
    """
    from tqdm.auto import tqdm

    loop = loop or LoopOptions()
    scheduler, timesteps = _schedule(pipe, inputs)
    latents, cache = inputs.noise, pipe.optimized.step_cache
    guidance = _guidance(pipe, inputs)
    cp = pipe.optimized.context_parallel
    # Both streams padded to a multiple of the degree (the padding masked or cut off in attention):
    # what stays fixed through the loop, once.
    fixed = cp.fixed_inputs(inputs.text.prompt_embeds, inputs.text.text_ids, inputs.img_ids) if cp is not None else None
    constants = pipe.optimized.request_constants
    with (
        cache.request(loop.cache_threshold) if cache is not None else contextlib.nullcontext(),
        constants.request() if constants is not None else contextlib.nullcontext(),
    ):
        bar = tqdm(timesteps, desc="denoising", unit="step", disable=not loop.progress, leave=False)
        for step, t in enumerate(bar):
            stop = loop.should_stop is not None and loop.should_stop()
            if cp is not None:  # every rank stops before the same step (a server's followers have no should_stop)
                stop = cp.agree_stop(stop)
            if stop:
                raise GenerationCancelled("generation cancelled before its next denoising step")
            noise_pred = _predict(pipe, inputs, latents, t, guidance, fixed)
            if loop.preview is not None and step in loop.preview[0]:
                loop.preview[1](step, latents - scheduler.sigmas[step] * noise_pred)  # sigma stays on the device
            latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            if loop.on_step is not None:
                loop.on_step(step, latents)
        evaluations = cache.evaluations if cache is not None else len(timesteps)
    return latents, evaluations


def _schedule(pipe, inputs: DenoiseInputs):
    """A fresh scheduler (it keeps a step index: never shared across calls) and the request's
    timesteps, shifted for its image size as FLUX.1-dev's pipeline shifts them."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    steps = inputs.request.num_inference_steps
    scheduler = copy.deepcopy(pipe.flux.scheduler)
    cfg = scheduler.config
    mu = calculate_shift(
        inputs.noise.shape[1],
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15),
    )
    sigmas = np.linspace(1.0, 1 / steps, steps)
    timesteps, _ = retrieve_timesteps(scheduler, steps, pipe.device, sigmas=sigmas, mu=mu)
    scheduler.set_begin_index(0)
    return scheduler, timesteps


def _guidance(pipe, inputs: DenoiseInputs) -> torch.Tensor | None:
    """FLUX.1-dev's distilled guidance, one value per image (None for a model without it)."""
    if not pipe.transformer.config.guidance_embeds:
        return None
    batch = inputs.noise.shape[0]
    return torch.full([batch], inputs.request.guidance_scale, device=pipe.device, dtype=torch.float32)


def _predict(pipe, inputs: DenoiseInputs, latents, t, guidance, fixed: dict | None) -> torch.Tensor:
    """One transformer evaluation: the noise prediction for ``latents`` at timestep ``t``."""
    transformer = pipe.optimized.transformer
    if pipe.optimized.needs_dynamic_marks:
        mark_dynamic(latents, inputs.img_ids)
    if pipe.optimized.compiled:  # a new step for CUDA graphs: the last step's outputs were consumed
        torch.compiler.cudagraph_mark_step_begin()
    text = inputs.text
    kwargs = dict(
        hidden_states=latents,
        timestep=t.expand(latents.shape[0]).to(latents.dtype) / 1000,
        guidance=guidance,
        pooled_projections=text.pooled,
        encoder_hidden_states=text.prompt_embeds,
        txt_ids=text.text_ids,
        img_ids=inputs.img_ids,
    )
    if fixed is not None:  # context parallel: both streams padded, the padding cut off the prediction
        padded = {**kwargs, **fixed, "hidden_states": pipe.optimized.context_parallel.pad_latents(latents)}
        return transformer(**padded, return_dict=False)[0][:, : latents.shape[1]]
    return transformer(**kwargs, return_dict=False)[0]


def no_step_cache_reason(pipe, req: GenerationRequest) -> str:
    """Why ``pipe`` cannot cache steps for ``req``: the image is split over processes, or the whole
    model is one compiled graph."""
    what = f"acceleration {req.acceleration!r}" if req.acceleration != "none" else "cache_threshold"
    cp = pipe.optimized.context_parallel
    if cp is not None:
        return (
            f"{what} (first-block caching) does not run with context_parallel={cp.degree} yet: each process "
            "would decide to skip on its own tokens; use acceleration 'none'"
        )
    return (
        f"{what} (first-block caching) does not run under the whole-model compile (compile_scope='full'), "
        "whose one graph the skip decision would break: use compile_scope='regional' (the default) or "
        "acceleration 'none'"
    )
