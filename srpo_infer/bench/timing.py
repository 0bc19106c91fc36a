"""Timing one generation: stock diffusers (the baseline) or our pipeline, synchronised with the GPU."""

from __future__ import annotations

import gc
import time

import torch

from ..request import GenerationRequest
from .configs import PROMPT, SEED, Setting


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Baseline:
    """Stock diffusers ``FluxPipeline`` over the same components, with diffusers' own processors."""

    def __init__(self, ours):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        self.ours = ours  # for identical noise and latent shapes
        self.flux = ours.flux
        self.flux.transformer.set_attn_processor(FluxAttnProcessor())

    def run(self, setting: Setting) -> tuple[torch.Tensor, object, float, float]:
        """Latents, decoded image, total seconds, and seconds spent in transformer calls."""
        noise = self.ours.prepare_noise([SEED], setting.width, setting.height)
        device = self.ours.device
        spent = [0.0, 0.0]

        def before(*_):
            sync(device)
            spent[1] = time.perf_counter()

        def after(*_):
            sync(device)
            spent[0] += time.perf_counter() - spent[1]

        hooks = [
            self.flux.transformer.register_forward_pre_hook(before),
            self.flux.transformer.register_forward_hook(after),
        ]
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            latents = self.flux(
                PROMPT,
                height=setting.height,
                width=setting.width,
                num_inference_steps=setting.steps,
                guidance_scale=4.5,
                latents=noise,
                output_type="latent",
                max_sequence_length=512,
            ).images
            image = self.ours.decode(latents, setting.width, setting.height)[0]
        sync(device)
        for h in hooks:
            h.remove()
        return latents, image, time.perf_counter() - t0, spent[0]


def time_ours(pipe, setting: Setting, acceleration: str) -> tuple[torch.Tensor, object, float, float, int]:
    """Latents, decoded image, total seconds, seconds in the denoising loop, and transformer evaluations
    of one generation with our pipeline."""
    from ..step_cache import cache_threshold_for

    req = GenerationRequest(PROMPT, setting.width, setting.height, seed=SEED, num_inference_steps=setting.steps)
    sync(pipe.device)
    t0 = time.perf_counter()
    run = pipe.run(req, cache_threshold=cache_threshold_for(acceleration))
    with torch.inference_mode():
        image = pipe.decode(run.latents, setting.width, setting.height)[0]
    sync(pipe.device)
    return run.latents, image, time.perf_counter() - t0, run.timings["denoise"], run.transformer_evaluations
