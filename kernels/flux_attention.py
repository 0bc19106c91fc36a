"""Triton kernels for Flux joint attention: q/k RMSNorm + RoPE prologue, flash attention, fp8.

Flux attention per block: q, k, v come from linear projections of a text stream (512 tokens) and an
image stream; q and k get an RMSNorm with a learned scale and a rotary embedding over 3 position
axes; the streams are concatenated (text first) and attended non-causally, 24 heads of dim 128.

Tensors are addressed as two *streams* (text rows ``[0, S_txt)``, image rows ``[S_txt, S)``), each
described by a base pointer and strides ``(batch, head, row)`` with unit stride along the head dim.
The same description covers projection outputs ``[B, S, H*D]`` (head stride D, possibly a column
slice of a fused QKV output) and head-major buffers ``[B, H, S, D]`` (one stream, ``S_txt = 0``), so
no concatenated or transposed copy is ever needed.

RoPE pairs neighbouring channels (2i, 2i+1): ``out[d] = x[d] cos[d] + sign(d) x[d ^ 1] sin[d]`` with
sign -1 on even d. The partner channel is a second load of the same (cached) rows with ``d ^ 1``.

The prologue is a pre-pass (``_prologue_kernel``): normalise + rotate q and k once, write them
head-major, then attend (``_attention_kernel``); V is read straight from the projection. A second
design that normalised and rotated every K tile inside the attention loop was measured on an H200
(2026-11-26, ``benchmarks/results/h200-2026-11-26/attention.md``) at 12.67 ms against the pre-pass's
0.991 ms at 4608 tokens (13× slower: the prologue's CUDA-core work repeated S/BLOCK_M times per K
tile), and was removed.

fp8 (e4m3): the pre-pass also quantises q and k per (token, head) row and V per (tile, head), and
the attention kernel runs both matmuls in fp8 with fp32 accumulation (see ``_attention_kernel``).
"""

from __future__ import annotations

import triton
import triton.language as tl

FP8_MAX = tl.constexpr(448.0)  # largest finite float8_e4m3fn
# P is in [0, 1]; e4m3's smallest subnormal is 2**-9, so probabilities are scaled by 2**8 before the
# cast (and the product unscaled after): values down to 2**-17 survive, and 256 < 448 cannot overflow.
P_SCALE = tl.constexpr(256.0)


@triton.jit
def _to_fp8(x, dtype, ROUND_IN_FP32: tl.constexpr):
    """Cast fp32 → e4m3, optionally rounding to a representable value first.

    Triton's CPU interpreter casts to fp8 wrongly (124.08 → 64: the carry into the exponent is lost;
    subnormals are floored). With ``ROUND_IN_FP32`` the value is first rounded to nearest-even at 3
    mantissa bits (2**-9 steps below 2**-6) in fp32, which the interpreter then casts exactly; that is
    what the hardware cast does on its own, so GPUs skip it.
    """
    if ROUND_IN_FP32:
        bits = x.to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576
        normal = bits.to(tl.float32, bitcast=True)
        x = tl.where(tl.abs(x) < 0.015625, tl.floor(x * 512.0 + 0.5) / 512.0, normal)
    return x.to(dtype)


@triton.jit
def _rows_ptr(txt_ptr, t_sb, t_sh, t_ss, img_ptr, i_sb, i_sh, i_ss, b, h, rows, cols, S_txt):
    """Pointers of a [rows, cols] tile whose rows may straddle the text/image stream boundary."""
    is_txt = rows < S_txt
    row_t = tl.where(is_txt, rows, 0)
    row_i = tl.where(is_txt, 0, rows - S_txt)
    p_t = txt_ptr + b * t_sb + h * t_sh + row_t[:, None] * t_ss + cols[None, :]
    p_i = img_ptr + b * i_sb + h * i_sh + row_i[:, None] * i_ss + cols[None, :]
    return tl.where(is_txt[:, None], p_t, p_i)


# fmt: off
@triton.jit
def _load_norm_rope(
    txt_ptr, t_sb, t_sh, t_ss, img_ptr, i_sb, i_sh, i_ss,
    w_txt_ptr, w_img_ptr, cos_ptr, sin_ptr, rope_stride,
    b, h, rows, S_txt, S, eps,
    HEAD_DIM: tl.constexpr,
):
    # fmt: on
    """Load a [rows, HEAD_DIM] tile of q or k and return RMSNorm(x) * w, rotated, in fp32."""
    cols = tl.arange(0, HEAD_DIM)
    partner = cols ^ 1
    valid = (rows < S)[:, None]
    x = tl.load(
        _rows_ptr(txt_ptr, t_sb, t_sh, t_ss, img_ptr, i_sb, i_sh, i_ss, b, h, rows, cols, S_txt), mask=valid, other=0.0
    ).to(tl.float32)
    xp = tl.load(
        _rows_ptr(txt_ptr, t_sb, t_sh, t_ss, img_ptr, i_sb, i_sh, i_ss, b, h, rows, partner, S_txt),
        mask=valid,
        other=0.0,
    ).to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / HEAD_DIM + eps)
    is_txt = (rows < S_txt)[:, None]
    w = tl.where(is_txt, tl.load(w_txt_ptr + cols)[None, :], tl.load(w_img_ptr + cols)[None, :]).to(tl.float32)
    wp = tl.where(is_txt, tl.load(w_txt_ptr + partner)[None, :], tl.load(w_img_ptr + partner)[None, :])
    rope_off = rows[:, None] * rope_stride + cols[None, :]
    cos = tl.load(cos_ptr + rope_off, mask=valid, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + rope_off, mask=valid, other=0.0).to(tl.float32)
    sign = tl.where((cols % 2) == 0, -1.0, 1.0)[None, :]
    xn = x * inv_rms[:, None] * w
    xpn = xp * inv_rms[:, None] * wp.to(tl.float32)
    return xn * cos + sign * xpn * sin


# fmt: off
@triton.jit
def _prologue_kernel(
    qt, qt_sb, qt_sh, qt_ss, qi, qi_sb, qi_sh, qi_ss,  # q: text stream, image stream (ptr, strides b/h/s)
    kt, kt_sb, kt_sh, kt_ss, ki, ki_sb, ki_sh, ki_ss,
    vt, vt_sb, vt_sh, vt_ss, vi, vi_sb, vi_sh, vi_ss,
    wq_txt, wk_txt, wq_img, wk_img, cos_ptr, sin_ptr, rope_stride,
    q_out, k_out, v_out, q_scale, k_scale, v_scale,  # outputs: head-major q/k (fp8: v too) and fp8 scales
    S_txt, S, H, n_tiles, eps,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, FP8: tl.constexpr, ROUND_FP8: tl.constexpr,
):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, HEAD_DIM)
    valid = (rows < S)[:, None]
    q = _load_norm_rope(
        qt, qt_sb, qt_sh, qt_ss, qi, qi_sb, qi_sh, qi_ss, wq_txt, wq_img, cos_ptr, sin_ptr, rope_stride, b, h,
        rows, S_txt, S, eps, HEAD_DIM,
    )
    k = _load_norm_rope(
        kt, kt_sb, kt_sh, kt_ss, ki, ki_sb, ki_sh, ki_ss, wk_txt, wk_img, cos_ptr, sin_ptr, rope_stride, b, h,
        rows, S_txt, S, eps, HEAD_DIM,
    )
    out_off = bh * S * HEAD_DIM + rows[:, None] * HEAD_DIM + cols[None, :]
    if FP8:
        # Per (token, head) scales: q·k factors exactly as (q8·k8) * sq * sk.
        sq = tl.maximum(tl.max(tl.abs(q), axis=1), 1e-12) / FP8_MAX
        sk = tl.maximum(tl.max(tl.abs(k), axis=1), 1e-12) / FP8_MAX
        tl.store(q_out + out_off, _to_fp8(q / sq[:, None], q_out.dtype.element_ty, ROUND_FP8), mask=valid)
        tl.store(k_out + out_off, _to_fp8(k / sk[:, None], k_out.dtype.element_ty, ROUND_FP8), mask=valid)
        tl.store(q_scale + bh * S + rows, sq, mask=rows < S)
        tl.store(k_scale + bh * S + rows, sk, mask=rows < S)
        # V per (tile, head): a tile of V rows shares one scale, so p·v8 factors per tile.
        v = tl.load(
            _rows_ptr(vt, vt_sb, vt_sh, vt_ss, vi, vi_sb, vi_sh, vi_ss, b, h, rows, cols, S_txt), mask=valid, other=0.0
        ).to(tl.float32)
        sv = tl.maximum(tl.max(tl.max(tl.abs(v), axis=1), axis=0), 1e-12) / FP8_MAX
        tl.store(v_out + out_off, _to_fp8(v / sv, v_out.dtype.element_ty, ROUND_FP8), mask=valid)
        tl.store(v_scale + bh * n_tiles + pid, sv)
    else:
        tl.store(q_out + out_off, q.to(q_out.dtype.element_ty), mask=valid)
        tl.store(k_out + out_off, k.to(k_out.dtype.element_ty), mask=valid)


@triton.jit
def _attention_kernel(
    qt, qt_sb, qt_sh, qt_ss, qi, qi_sb, qi_sh, qi_ss,  # q: text stream, image stream (ptr, strides b/h/s)
    kt, kt_sb, kt_sh, kt_ss, ki, ki_sb, ki_sh, ki_ss,
    vt, vt_sb, vt_sh, vt_ss, vi, vi_sb, vi_sh, vi_ss,
    q_scale, k_scale, v_scale,
    out, o_sb, o_sh, o_ss,
    S_txt, S, S_BUCKET, H, n_tiles, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    FP8: tl.constexpr, ROUND_FP8: tl.constexpr,
):
    """Non-causal flash attention forward (online softmax in base 2, fp32 accumulation).

    q and k come normalised and rotated from ``_prologue_kernel``. ``S_BUCKET`` is not used here:
    it is the autotuner's key (the sequence length rounded up to a power of two).
    ``FP8``: q, k, v are e4m3 with scales from ``_prologue_kernel``; BLOCK_N equals its V tile.
    Output rows are written as ``out[b, s, h, :]``, so ``[B, S, H, D]`` flattens to ``[B, S, H*D]``
    for the output projection without a transpose.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)

    q = tl.load(
        _rows_ptr(qt, qt_sb, qt_sh, qt_ss, qi, qi_sb, qi_sh, qi_ss, b, h, rows, cols, S_txt),
        mask=(rows < S)[:, None],
        other=0.0,
    )
    if FP8:
        # Fold the softmax scale into q's per-row scale: one multiply per score instead of two.
        sq = tl.load(q_scale + bh * S + rows, mask=rows < S, other=0.0) * qk_scale

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, S, BLOCK_N):
        keys = start + tl.arange(0, BLOCK_N)
        kvalid = (keys < S)[:, None]
        k = tl.load(
            _rows_ptr(kt, kt_sb, kt_sh, kt_ss, ki, ki_sb, ki_sh, ki_ss, b, h, keys, cols, S_txt), mask=kvalid, other=0.0
        )
        s = tl.dot(q, tl.trans(k))
        if FP8:
            sk = tl.load(k_scale + bh * S + keys, mask=keys < S, other=0.0)
            s = s * sq[:, None] * sk[None, :]
        else:
            s = s * qk_scale
        s = tl.where((keys < S)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]
        v = tl.load(
            _rows_ptr(vt, vt_sb, vt_sh, vt_ss, vi, vi_sb, vi_sh, vi_ss, b, h, keys, cols, S_txt), mask=kvalid, other=0.0
        )
        if FP8:
            sv = tl.load(v_scale + bh * n_tiles + start // BLOCK_N)
            pv = tl.dot(_to_fp8(p * P_SCALE, v.dtype, ROUND_FP8), v)
            acc += pv * (sv / P_SCALE)
        else:
            acc += tl.dot(p.to(v.dtype), v)
        m_i = m_new

    o = acc / l_i[:, None]
    o_ptr = out + b * o_sb + h * o_sh + rows[:, None] * o_ss + cols[None, :]
    tl.store(o_ptr, o.to(out.dtype.element_ty), mask=(rows < S)[:, None])
# fmt: on
