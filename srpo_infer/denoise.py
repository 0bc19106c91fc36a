"""The denoising loop: what it starts from (a request prepared once), how it is asked to run, and
the flow-matching Euler loop itself, a function of tensors: the model to call (one request's
:class:`~srpo_infer.runtime.RequestModel`: the step cache, context parallelism and the compile act
inside it), the scheduler and its timesteps, the starting noise. It reads no pipeline.

The loop is ours (so it can be timed, cached, cancelled and previewed) but every piece of Flux math
comes from diffusers' ``FluxPipeline``: the timestep shift, the scheduler, the guidance embedding.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import numpy as np
import torch

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


class StepModel(Protocol):
    """What the loop calls each step (:class:`~srpo_infer.runtime.RequestModel`)."""

    def __call__(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...

    def stop(self, asked: bool) -> bool: ...


def denoise(
    model: StepModel, scheduler, timesteps: torch.Tensor, noise: torch.Tensor, loop: LoopOptions | None = None
) -> torch.Tensor:
    """The flow-matching Euler loop: from packed ``noise``, one ``model(latents, t)`` call and one
    ``scheduler`` step per timestep, to packed latents.

    With ``loop.preview = (steps, fn)``: after each of those 0-based steps, ``fn(step, x0)`` gets the
    estimate of the clean latents, ``x0 = latents - sigma * noise_pred`` (flow matching), before the
    update. Raises :class:`GenerationCancelled` before a step when ``loop.should_stop()`` is true (as
    ``model.stop`` agrees across processes).
    """
    from tqdm.auto import tqdm

    loop = loop or LoopOptions()
    latents = noise
    bar = tqdm(timesteps, desc="denoising", unit="step", disable=not loop.progress, leave=False)
    for step, t in enumerate(bar):
        if model.stop(loop.should_stop is not None and loop.should_stop()):
            raise GenerationCancelled("generation cancelled before its next denoising step")
        noise_pred = model(latents, t)
        if loop.preview is not None and step in loop.preview[0]:
            loop.preview[1](step, latents - scheduler.sigmas[step] * noise_pred)  # sigma stays on the device
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        if loop.on_step is not None:
            loop.on_step(step, latents)
    return latents


def schedule(template, image_tokens: int, steps: int, device: torch.device):
    """A fresh copy of the ``template`` scheduler (it keeps a step index: never shared across calls)
    and its ``steps`` timesteps, shifted for ``image_tokens`` as FLUX.1-dev's pipeline shifts them."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

    scheduler = copy.deepcopy(template)
    cfg = scheduler.config
    mu = calculate_shift(
        image_tokens,
        cfg.get("base_image_seq_len", 256),
        cfg.get("max_image_seq_len", 4096),
        cfg.get("base_shift", 0.5),
        cfg.get("max_shift", 1.15),
    )
    sigmas = np.linspace(1.0, 1 / steps, steps)
    timesteps, _ = retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
    scheduler.set_begin_index(0)
    return scheduler, timesteps
