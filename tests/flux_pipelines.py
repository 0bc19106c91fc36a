"""Every diffusers Flux pipeline class that runs a ``FluxTransformer2DModel``, built from the tiny
components (a wider-input transformer where the class feeds it more channels, a one-block ControlNet
where it needs one), with the inputs each class takes. Images stay small: 80×80, five 2×2 patches a side.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from PIL import Image

from srpo_infer.tiny import TINY_SEED, TINY_TRANSFORMER_CONFIG, build_tiny_base

SIZE = 80  # 25 image tokens: never equal to the 16 text tokens, which dynamo would then tie to them
_IMAGE = Image.fromarray((np.random.RandomState(0).rand(SIZE, SIZE, 3) * 255).astype("uint8"))
_MASK = Image.fromarray(((np.arange(SIZE)[None, :] >= SIZE // 2).repeat(SIZE, 0) * 255).astype("uint8"))
_CONTROL_CHANNELS = dict(in_channels=32, out_channels=16)  # latents and control latents, side by side
# Fill: packed latents (16) + packed masked-image latents (16) + the mask packed from 8×8 pixels (256).
_FILL_CHANNELS = dict(in_channels=16 + 16 + 256, out_channels=16)
_INPAINT = dict(image=_IMAGE, mask_image=_MASK, strength=0.9)

# class name -> (transformer channels, or "controlnet"; the call's own inputs)
PIPELINES: dict[str, tuple[dict | str, dict]] = {
    "FluxPipeline": ({}, {}),
    "FluxImg2ImgPipeline": ({}, dict(image=_IMAGE, strength=0.9)),
    "FluxInpaintPipeline": ({}, _INPAINT),
    "FluxFillPipeline": (_FILL_CHANNELS, dict(image=_IMAGE, mask_image=_MASK)),
    "FluxControlPipeline": (_CONTROL_CHANNELS, dict(control_image=_IMAGE)),
    "FluxControlImg2ImgPipeline": (_CONTROL_CHANNELS, dict(image=_IMAGE, control_image=_IMAGE, strength=0.9)),
    "FluxControlInpaintPipeline": (_CONTROL_CHANNELS, dict(_INPAINT, control_image=_IMAGE)),
    "FluxControlNetPipeline": ("controlnet", dict(control_image=_IMAGE)),
    "FluxControlNetImg2ImgPipeline": ("controlnet", dict(image=_IMAGE, control_image=_IMAGE, strength=0.9)),
    "FluxControlNetInpaintPipeline": ("controlnet", dict(_INPAINT, control_image=_IMAGE)),
    "FluxKontextPipeline": ({}, dict(image=_IMAGE, _auto_resize=False, max_area=SIZE * SIZE)),
    "FluxKontextInpaintPipeline": ({}, dict(_INPAINT, _auto_resize=False, max_area=SIZE * SIZE)),
}


def _randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight non-trivial (diffusers zero-initialises a ControlNet's output layers)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for p in model.parameters():
            p.data.normal_(0.0, 0.2) if p.ndim > 1 else p.data.uniform_(-0.1, 0.1)
    return model.eval()


def build(name: str, **transformer_overrides):
    """A fresh ``name`` pipeline on the CPU, and the inputs its call needs besides the prompt."""
    import diffusers

    channels, inputs = PIPELINES[name]
    components = build_tiny_base()
    config = dict(TINY_TRANSFORMER_CONFIG, **transformer_overrides)
    if channels == "controlnet":
        shared = {key: value for key, value in config.items() if key != "out_channels"}
        net = diffusers.FluxControlNetModel(**dict(shared, num_layers=1, num_single_layers=1))
        components["controlnet"] = _randomized(net, TINY_SEED + 7)
    else:
        config.update(channels)
    components["transformer"] = _randomized(diffusers.FluxTransformer2DModel(**config), TINY_SEED)
    cls = getattr(diffusers, name)
    for optional in ("image_encoder", "feature_extractor"):
        if optional in inspect.signature(cls.__init__).parameters:
            components[optional] = None
    return cls(**components), inputs


def generate(pipe, inputs: dict, steps: int = 6, size: int = SIZE, seed: int = 5, **extra) -> np.ndarray:
    """One image as floats in [0, 1]."""
    out = pipe(
        prompt="a lighthouse at dusk",
        width=size,
        height=size,
        num_inference_steps=steps,
        generator=torch.Generator().manual_seed(seed),
        max_sequence_length=16,
        output_type="np",
        **inputs,
        **extra,
    )
    return out.images[0]


def count_calls(module: torch.nn.Module) -> list[int]:
    """Calls of ``module`` that really ran: wrapped before any cache hook, so a skipped call is not
    counted (eager: a hook on a compiled block would not fire). ``calls[0]`` is the count."""
    calls = [0]
    original = module.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return original(*args, **kwargs)

    module.forward = counted
    return calls


def direct_transformer_inputs(generator: torch.Generator) -> dict:
    """Keyword inputs for one call of the tiny transformer itself (25 image tokens, 8 text tokens)."""
    return dict(
        hidden_states=torch.randn(1, 25, 16, generator=generator),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=generator),
        pooled_projections=torch.randn(1, 32, generator=generator),
        timestep=torch.tensor([0.5]),
        guidance=torch.tensor([3.5]),
        img_ids=torch.zeros(25, 3),
        txt_ids=torch.zeros(8, 3),
        return_dict=False,
    )
