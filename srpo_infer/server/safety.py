"""Image safety checking for the server's ``enable_safety_checker``.

Uses diffusers' ``StableDiffusionSafetyChecker`` (CLIP image embeddings against concept embeddings)
with its CLIP image processor, from a repo id or folder, or a tiny random one for tests. Flagged
images are replaced by black images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import TINY_RANDOM


class SafetyChecker:
    """Wraps a ``StableDiffusionSafetyChecker`` and its feature extractor.

    >>> checker = SafetyChecker.load("tiny-random")
    >>> images, flags = checker.check([Image.new("RGB", (64, 64))])
    >>> len(images), type(flags[0])
    (1, <class 'bool'>)
    """

    def __init__(self, model, feature_extractor, device: str | torch.device = "cpu"):
        self.model = model.to(device).eval()
        self.feature_extractor = feature_extractor
        self.device = torch.device(device)

    @classmethod
    def load(cls, source: str, device: str | torch.device = "cpu") -> SafetyChecker:
        """From a Hugging Face repo id or folder holding the checker and its preprocessor config
        (as ``CompVis/stable-diffusion-safety-checker``), or ``"tiny-random"``."""
        from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
        from transformers import CLIPImageProcessor

        if source == TINY_RANDOM:
            return cls(*_tiny_parts(), device=device)
        try:
            model = StableDiffusionSafetyChecker.from_pretrained(source)
            extractor = CLIPImageProcessor.from_pretrained(source)
        except OSError as exc:
            where = "folder" if Path(source).exists() else "repo"
            raise ValueError(f"could not load a safety checker from {where} {source!r}: {exc}") from exc
        return cls(model, extractor, device)

    @torch.inference_mode()
    def check(self, images: list[Image.Image]) -> tuple[list[Image.Image], list[bool]]:
        """Return the images (flagged ones blacked out) and one flag per image."""
        pixels = self.feature_extractor(images=images, return_tensors="pt").pixel_values
        arrays = [np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images]
        _, flags = self.model(images=arrays, clip_input=pixels.to(self.device, self.model.dtype))
        flags = [bool(f) for f in flags]
        out = [Image.new("RGB", im.size) if flag else im for im, flag in zip(images, flags, strict=True)]
        return out, flags


def _tiny_parts():
    """A tiny random ``StableDiffusionSafetyChecker`` and a matching CLIP image processor."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    config = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=99,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = StableDiffusionSafetyChecker(config)
    extractor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return model, extractor
