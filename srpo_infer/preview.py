"""Cheap previews of an image as it forms: a linear map from the latent channels to RGB.

At a preview step the denoising loop hands over its estimate of the clean latents (flow matching:
``x0 = x_t - sigma_t * v``). Instead of the VAE (a full decoder pass per preview), each latent pixel
becomes one RGB pixel through ``C x 3`` factors and a bias (``C`` = 16 for FLUX.1, 4 for ``tiny-random``),
upsampled to the requested size. The factors are not copied from anywhere: they are fitted once per
pipeline by least squares against this pipeline's own VAE (:func:`fit_linear_decoder`), so they
follow whatever VAE is loaded. A preview is a blurred colour sketch, not the final image.

>>> preview_steps(28, 3), preview_steps(4, 2), preview_steps(2, 3)
([6, 13, 20], [0, 2], [0])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from PIL import Image

FIT_SIDE = 512  # pixels: the size of the latents decoded to fit the factors
FIT_BATCH = 2
FIT_BLOCK = 4  # latent pixels per side that share one random value (smooth latents: local colour)


@dataclass
class Preview:
    """One preview of a running generation: ``images`` (one per requested image, at the requested
    size), its 0-based ``index`` and the denoising ``step`` it shows (steps done, of ``steps``)."""

    index: int
    step: int
    steps: int
    images: list[Image.Image]


def preview_steps(steps: int, previews: int) -> list[int]:
    """The 0-based denoising steps after which to show ``previews`` previews of a ``steps``-step run:
    spread evenly, never the last step (the final image shows that). Fewer than asked when there are
    not enough steps (as OpenAI's API allows)."""
    n = min(previews, steps - 1)
    if n <= 0:
        return []
    return sorted({min(steps - 2, max(0, round((k + 1) * steps / (n + 1)) - 1)) for k in range(n)})


def check_previews(previews: object, on_preview: object, max_previews: int) -> int:
    """``previews`` as an int in [0, max_previews], with a callback when it is above 0."""
    if isinstance(previews, bool) or not isinstance(previews, int) or not 0 <= previews <= max_previews:
        raise ValueError(f"previews must be an integer in [0, {max_previews}], got {previews!r}")
    if previews and not callable(on_preview):
        raise ValueError(f"previews={previews} needs on_preview, a function that takes a Preview")
    return previews


class LinearDecoder:
    """Latent channels → RGB in [0, 1]: ``rgb = latent @ factors + bias`` per latent pixel."""

    def __init__(self, factors: torch.Tensor, bias: torch.Tensor, residual: float):
        self.factors, self.bias, self.residual = factors, bias, residual

    def images(self, flux, packed: torch.Tensor, width: int, height: int) -> list[Image.Image]:
        """Packed latents ``(n, tokens, in_channels)`` (the loop's normalised space) → PIL images of
        ``width`` × ``height``."""
        from .result import host_pixels

        latents = flux._unpack_latents(packed, height, width, flux.vae_scale_factor)  # (n, C, h, w)
        factors, bias = self.factors.to(latents.device), self.bias.to(latents.device)
        rgb = torch.einsum("nchw,cr->nrhw", latents.float(), factors) + bias[None, :, None, None]
        pixels = host_pixels((rgb.clamp(0, 1) * 255).round().to(torch.uint8))  # on the device: 1/16 of the pixels
        return [Image.fromarray(p).resize((width, height), Image.BILINEAR) for p in pixels]


def fit_linear_decoder(flux, device: torch.device, dtype: torch.dtype) -> LinearDecoder:
    """Fit the factors against ``flux.vae``: decode smooth random latents, average each latent pixel's
    8×8 block of the decoded image, and solve for the ``C x 3`` factors and bias by least squares."""
    vae = flux.vae
    channels = vae.config.latent_channels
    side = FIT_SIDE // flux.vae_scale_factor
    g = torch.Generator("cpu").manual_seed(0)
    coarse = torch.randn(FIT_BATCH, channels, side // FIT_BLOCK, side // FIT_BLOCK, generator=g)
    latents = coarse.repeat_interleave(FIT_BLOCK, 2).repeat_interleave(FIT_BLOCK, 3)  # normalised space
    x = latents / vae.config.scaling_factor + vae.config.shift_factor
    with torch.inference_mode():
        image = vae.decode(x.to(device=device, dtype=vae.dtype), return_dict=False)[0]
    target = (image.float().cpu() / 2 + 0.5).clamp(0, 1)
    target = torch.nn.functional.avg_pool2d(target, flux.vae_scale_factor)  # (B, 3, side, side)
    a = latents.permute(0, 2, 3, 1).reshape(-1, channels).double()
    a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
    b = target.permute(0, 2, 3, 1).reshape(-1, 3).double()
    solution = torch.linalg.lstsq(a, b).solution
    residual = float((a @ solution - b).norm() / b.norm())
    return LinearDecoder(solution[:-1].float(), solution[-1].float(), residual)
