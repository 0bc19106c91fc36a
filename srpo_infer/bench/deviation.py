"""Deviation measures reported next to every speed-up: relative error and PSNR."""

from __future__ import annotations

import math

import numpy as np
import torch


def relative_error(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """‖candidate − reference‖₂ / ‖reference‖₂, computed in float64.

    >>> relative_error(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0]))
    0.0
    """
    a, b = candidate.detach().to(torch.float64), reference.detach().to(torch.float64)
    return ((a - b).norm() / b.norm()).item()


def psnr(candidate, reference) -> float:
    """Peak signal-to-noise ratio in dB of two 8-bit images (PIL images or arrays); inf when equal.

    >>> psnr(np.zeros((2, 2), np.uint8), np.full((2, 2), 255, np.uint8))
    0.0
    """
    a = np.asarray(candidate, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    mse = float(np.mean((a - b) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255.0**2 / mse)


def relative_l1(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """Σ|candidate − reference| / Σ|reference| in float64: the 8-bit attention papers' measure
    (SageAttention reports it with :func:`cosine_similarity`).

    >>> relative_l1(torch.tensor([1.0, -3.0]), torch.tensor([1.0, -2.0]))
    0.3333333333333333
    """
    a, b = candidate.detach().to(torch.float64), reference.detach().to(torch.float64)
    return ((a - b).abs().sum() / b.abs().sum()).item()


def cosine_similarity(candidate: torch.Tensor, reference: torch.Tensor) -> float:
    """Cosine of the angle between the two tensors, flattened, in float64.

    >>> cosine_similarity(torch.tensor([1.0, 0.0]), torch.tensor([2.0, 0.0]))
    1.0
    """
    a, b = candidate.detach().to(torch.float64).flatten(), reference.detach().to(torch.float64).flatten()
    return (a @ b / (a.norm() * b.norm())).item()
