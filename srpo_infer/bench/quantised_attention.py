"""The 8-bit attention schemes emulated in float64 torch: their error, measured without a GPU.

:func:`emulate` follows the Triton kernels step by step (``srpo_infer.kernels.flux_attention``):
per-token INT8 (or e4m3) q and k, K smoothed, key tiles of ``block_n`` with an online softmax,
probabilities quantised against the running row max, e4m3 values scaled per channel, and Hopper's
reduced-precision fp8 accumulation. Only the rounding is modelled; everything else is exact, so the
difference to exact attention is the scheme's own error and the difference to an interpreted kernel
is the kernel's arithmetic (fp32 instead of float64).

Hopper's fp8 MMA (``wgmma … e4m3``) keeps about 22 bits in its accumulator (SageAttention2,
arXiv 2411.10958; DeepSeek-V3 reports ~14 significant bits): modelled as a truncation to
:data:`FP8_ACC_MANTISSA_BITS` after each MMA K step of 32 keys. ``"two-level"`` accumulates each tile
in such a fresh accumulator and adds it to an exact sum (what the kernel does); ``"in-place"`` carries
the whole row in it (what ``tl.dot(p, v, acc)`` would do).

The input families of ``benchmarks/attention_error.py`` live here too, so the tests measure the same.
"""

from __future__ import annotations

import math

import torch

from ..attention import attention_prologue, random_attention_inputs

QK_FORMATS = ("exact", "int8", "e4m3")
PV_FORMATS = ("exact", "bfloat16", "float16", "e4m3")
ACCUMULATIONS = ("exact", "two-level", "in-place")
FP8_ACC_MANTISSA_BITS = 13  # FP22: 1 sign, 8 exponent, 13 mantissa bits
MMA_K_STEP = 32  # keys per fp8 wgmma instruction
P_SCALE = 256.0  # the kernel's probabilities are 2**8 p in e4m3


def _e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float8_e4m3fn).to(torch.float64)


def quantise_rows(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantise each row (last dim) with its own scale and return the dequantised values."""
    if fmt == "exact":
        return x
    top = 127.0 if fmt == "int8" else 448.0
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / top
    q = torch.round(x / scale) if fmt == "int8" else _e4m3(x / scale)
    return q * scale


def truncate_mantissa(x: torch.Tensor, bits: int = FP8_ACC_MANTISSA_BITS) -> torch.Tensor:
    """Round toward zero to ``bits`` explicit mantissa bits (the reduced-precision accumulator)."""
    mantissa, exponent = torch.frexp(x)  # |mantissa| in [0.5, 1): one implicit bit plus ``bits``
    return torch.ldexp(torch.trunc(mantissa * 2.0 ** (bits + 1)) / 2.0 ** (bits + 1), exponent)


def emulate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    qk: str = "int8",
    pv: str = "e4m3",
    smooth_k: bool = True,
    accumulation: str = "two-level",
    block_n: int = 128,
) -> torch.Tensor:
    """Attention of normalised, rotated ``[B, H, S, D]`` q, k, v under one quantisation scheme.

    ``qk``: format of q and k (:data:`QK_FORMATS`, per-token scales); ``pv``: of p and v
    (:data:`PV_FORMATS`; ``e4m3``: v per channel, p as e4m3 of 256·p); ``accumulation``: of the e4m3
    p·v (:data:`ACCUMULATIONS`). ``emulate(q, k, v, "int8", "bfloat16")`` is the ``int8`` kernel mode
    on bf16 inputs, ``emulate(q, k, v)`` the ``int8-fp8`` mode.

    >>> x = torch.randn(3, 1, 2, 40, 32, dtype=torch.float64)
    >>> exact = torch.softmax(x[0] @ x[1].transpose(-1, -2) / 32**0.5, -1) @ x[2]
    >>> bool(torch.allclose(emulate(*x, qk="exact", pv="exact", block_n=16), exact))
    True
    """
    if qk not in QK_FORMATS or pv not in PV_FORMATS or accumulation not in ACCUMULATIONS:
        raise ValueError(
            f"qk in {QK_FORMATS}, pv in {PV_FORMATS}, accumulation in {ACCUMULATIONS}; "
            f"got {qk!r}, {pv!r}, {accumulation!r}"
        )
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    if smooth_k and qk != "exact":
        k = k - k.mean(-2, keepdim=True)  # shifts each query's scores by a constant: softmax-invariant
    q, k = quantise_rows(q, qk), quantise_rows(k, qk)
    if pv == "e4m3":
        v_scale = v.abs().amax(-2, keepdim=True).clamp_min(1e-12) / 448.0
        v = _e4m3(v / v_scale)  # the kernel applies v_scale once, after the loop
    elif pv != "exact":
        v = v.to(getattr(torch, pv)).to(torch.float64)
    scale = 1 / math.sqrt(q.shape[-1])
    rows = q.shape[:-1]
    m = torch.full(rows, -math.inf, dtype=torch.float64)
    denominator = torch.zeros(rows, dtype=torch.float64)
    acc = torch.zeros(*rows, v.shape[-1], dtype=torch.float64)
    for start in range(0, k.shape[-2], block_n):
        s = q @ k[..., start : start + block_n, :].transpose(-1, -2) * scale
        m_new = torch.maximum(m, s.amax(-1))
        p = torch.exp(s - m_new[..., None])
        alpha = torch.exp(m - m_new)
        denominator = denominator * alpha + p.sum(-1)
        v_tile = v[..., start : start + block_n, :]
        acc = acc * alpha[..., None]
        if pv == "e4m3":
            acc = _fp8_accumulate(acc, _e4m3(p * P_SCALE), v_tile, accumulation)
        elif pv == "exact":
            acc = acc + p @ v_tile
        else:
            acc = acc + p.to(getattr(torch, pv)).to(torch.float64) @ v_tile
        m = m_new
    if pv == "e4m3":
        acc = acc * v_scale / P_SCALE
    return acc / denominator[..., None]


def _fp8_accumulate(acc: torch.Tensor, p: torch.Tensor, v: torch.Tensor, accumulation: str) -> torch.Tensor:
    """``acc + p @ v`` with the MMA's reduced-precision accumulator, one K step of keys at a time."""
    if accumulation == "exact":
        return acc + p @ v
    partial = torch.zeros_like(acc) if accumulation == "two-level" else acc
    for start in range(0, p.shape[-1], MMA_K_STEP):
        step = p[..., start : start + MMA_K_STEP] @ v[..., start : start + MMA_K_STEP, :]
        partial = truncate_mantissa(partial + step)
    return acc + partial if accumulation == "two-level" else partial


def exact_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Softmax attention in float64 on ``[B, H, S, D]``."""
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    return torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), -1) @ v


FAMILIES = ("random", "outliers")


def attention_family(
    family: str, heads: int = 2, s_txt: int = 512, s_img: int = 4096, head_dim: int = 128, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalised, rotated float64 ``[1, H, S, D]`` q, k, v of one input family.

    ``random``: :func:`~srpo_infer.attention.random_attention_inputs` through the stock prologue.
    ``outliers``: the same, then what real keys and queries carry: a per-channel offset
    ``b ~ N(0, 3²)`` added to every key (shared by all tokens and heads), then 4 channels of k
    multiplied by 8 and the same channels of q by 2.5.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    x = random_attention_inputs(1, heads, head_dim, s_txt, s_img, torch.float64, seed=seed)
    q, k, v = attention_prologue(x)
    if family == "outliers":
        g = torch.Generator().manual_seed(seed + 1000)
        k = k + 3.0 * torch.randn(head_dim, generator=g, dtype=torch.float64)
        channels = torch.randperm(head_dim, generator=g)[:4]
        k[..., channels] *= 8.0
        q[..., channels] *= 2.5
    return q, k, v
