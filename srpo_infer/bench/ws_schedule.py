"""The ``ws`` attention kernel's schedule emulated in torch: its numerics, checked without a GPU.

Gluon has no interpreter, so ``kernels/ws_attention.py`` cannot run on a CPU. :func:`emulate_ws`
computes what it computes, in its order and at its widths:

- operands as the pre-pass writes them: q, k, v in the input dtype (bf16/fp16); in the 8-bit modes q
  and k (K smoothed: its per-head mean over the tokens subtracted) in INT8 with one scale per token;
  in ``int8-fp8`` v in e4m3 with one scale per channel, applied once after the loop;
- key tiles of ``block_n`` in order, keys past ``S`` masked (to -inf) in the first and the last tile
  only, as the kernel peels them (every tile between is whole);
- tile 0's softmax alone; then for each tile j, P_{j-1}·V_{j-1} (issued before S_j's softmax, in
  flight across it) added to the output, which is rescaled by α_j = 2^(m_{j-1} − m_j) once the new
  row max is known; the last tile's P·V after the loop; scores and sums in fp32, base-2 exponentials
  with the softmax scale (times log2 e) folded into the per-row q factor;
- P cast to the p·v operand type before its MMA: the input dtype, or e4m3 of 2^8 p; the e4m3 P·V of
  each tile in a fresh accumulator of the MMA's reduced precision (22 bits, truncated after each MMA
  step of 32 keys), added to the fp32 output (two-level accumulation).

The two consumer warpgroups of a CTA hold different query rows and read the same K and V tiles, so a
row's arithmetic does not depend on which half holds it: the rows are emulated together.
"""

from __future__ import annotations

import math

import torch

from .quantised_attention import MMA_K_STEP, truncate_mantissa

LOG2E = 1.4426950408889634
P_SHIFT = 8.0  # e4m3 probabilities are 2**8 p
MODES = ("native", "int8", "int8-fp8")


def _int8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row INT8 values (as fp32) and scales, as the pre-pass rounds them."""
    scale = x.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127.0
    return torch.round(x / scale).clamp(-127, 127), scale.squeeze(-1)


def _e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float8_e4m3fn).to(torch.float32)


def emulate_ws(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mode: str = "native",
    dtype: torch.dtype = torch.bfloat16,
    block_n: int | None = None,
) -> torch.Tensor:
    """The ``ws`` kernel's output for normalised, rotated ``[B, H, S, D]`` q, k, v, in fp32.

    ``mode``: ``native``, ``int8`` or ``int8-fp8``; ``dtype``: the model's (bf16 or fp16);
    ``block_n``: keys per tile (default: the mode's ``WS_CONFIGS`` entry).

    >>> x = torch.randn(3, 1, 2, 200, 64, dtype=torch.float64)
    >>> exact = torch.softmax(x[0] @ x[1].transpose(-1, -2) / 8, -1) @ x[2]
    >>> bool((emulate_ws(*x, block_n=64) - exact).abs().max() < 2e-2)
    True
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    if block_n is None:
        from ..kernels.configs import WS_CONFIGS

        block_n = WS_CONFIGS[mode].block_n
    s_len, head_dim = q.shape[-2], q.shape[-1]
    q, k, v = (t.to(dtype).to(torch.float32) for t in (q, k, v))  # what the pre-pass writes (native)
    qk_scale = LOG2E / math.sqrt(head_dim)
    if mode == "native":
        sq = torch.full(q.shape[:-1], qk_scale)
        sk = torch.ones(k.shape[:-1])
    else:
        k = k - k.mean(-2, keepdim=True)  # smoothed: softmax-invariant
        (q, sq), (k, sk) = _int8_rows(q), _int8_rows(k)
        sq = sq * qk_scale
    v_scale = None
    if mode == "int8-fp8":
        v_scale = v.abs().amax(-2, keepdim=True).clamp_min(1e-12) / 448.0
        v = _e4m3(v / v_scale)
    shift = P_SHIFT if mode == "int8-fp8" else 0.0
    n_tiles = -(-s_len // block_n)

    def scores(j: int) -> torch.Tensor:
        keys = slice(j * block_n, (j + 1) * block_n)
        s = q @ k[..., keys, :].transpose(-1, -2)  # int8 modes: exact integer sums (< 2**24)
        s = s * sk[..., None, keys]
        if j in (0, n_tiles - 1):  # the kernel's peeled, masked tiles; the others are whole
            cols = torch.arange(j * block_n, j * block_n + s.shape[-1])
            s = s.masked_fill(cols >= s_len, -math.inf)
        return s

    def p_operand(p: torch.Tensor) -> torch.Tensor:
        return _e4m3(p) if mode == "int8-fp8" else p.to(dtype).to(torch.float32)

    def pv_product(p: torch.Tensor, j: int) -> torch.Tensor:
        tile = v[..., j * block_n : (j + 1) * block_n, :]
        if mode != "int8-fp8":
            return p_operand(p) @ tile
        fresh = torch.zeros(*p.shape[:-1], tile.shape[-1])  # the MMA's reduced-precision accumulator
        p8 = p_operand(p)
        for start in range(0, p.shape[-1], MMA_K_STEP):
            step = p8[..., start : start + MMA_K_STEP] @ tile[..., start : start + MMA_K_STEP, :]
            fresh = truncate_mantissa(fresh + step)
        return fresh

    s = scores(0)
    m = s.amax(-1) * sq
    p = torch.exp2(s * sq[..., None] - (m - shift)[..., None])
    denominator = p.sum(-1)
    acc = torch.zeros(*q.shape[:-1], v.shape[-1])
    for j in range(1, n_tiles):
        pv = pv_product(p, j - 1)  # issued with S_j, in flight across its softmax
        s = scores(j)
        m_new = torch.maximum(m, s.amax(-1) * sq)
        p = torch.exp2(s * sq[..., None] - (m_new - shift)[..., None])
        alpha = torch.exp2(m - m_new)
        denominator = denominator * alpha + p.sum(-1)
        acc = (acc + pv) * alpha[..., None]
        m = m_new
    acc = acc + pv_product(p, n_tiles - 1)
    if v_scale is not None:
        acc = acc * v_scale
    return acc / denominator[..., None]
