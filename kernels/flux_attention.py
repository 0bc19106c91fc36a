"""Triton kernels for Flux joint attention: q/k RMSNorm + RoPE pre-pass, flash attention, 8-bit modes.

Flux attention per block: q, k, v come from linear projections of a text stream (512 tokens) and an
image stream; q and k get an RMSNorm with a learned scale and a rotary embedding over 3 position
axes; the streams are concatenated (text first) and attended non-causally, 24 heads of dim 128.

Three kernels:

- ``_stats_kernel`` (8-bit modes only): per (batch, head), the sum over tokens of the normalised,
  rotated k (for K smoothing) and, when p·v runs in e4m3, each value channel's max |v|. ``CHUNKS``
  programs per head each write a partial; the pre-pass reduces them in a fixed order, so the result
  is the same on every run (atomics would make the quantisation, and so the image, vary by run).
- ``_prologue_kernel`` reads the projections as two *streams* (text rows ``[0, S_txt)``, image rows
  ``[S_txt, S)``, each a base pointer and strides ``(batch, head, row)``, unit stride along the head
  dim: a fused QKV output's column slice works as is), normalises and rotates q and k, and writes q,
  k and v head-major into ``[B*H, S_pad, D]`` buffers, text first, rows ``[S, S_pad)`` zero. The
  attention loop then sees one contiguous K/V per head and never selects between streams; with
  ``S_pad`` a multiple of every tile, no load needs a mask.
- ``_attention_kernel``: non-causal flash attention over those buffers, loading tiles either with
  pointers (``TMA=False``: any GPU) or with tensor descriptors (``TMA=True``: Hopper's TMA copies
  from host-built descriptors; also the interpreter). Full key tiles run unmasked; the last, partial
  one is peeled off and masked.

RoPE pairs neighbouring channels (2i, 2i+1): ``out[d] = x[d] cos[d] + sign(d) x[d ^ 1] sin[d]`` with
sign -1 on even d. The partner channel is a second load of the same (cached) rows with ``d ^ 1``.

8-bit modes, the scheme of SageAttention (arXiv 2410.02367) and SageAttention2 (arXiv 2411.10958):

- ``QK_INT8``: q·kᵀ in INT8 with one scale per (token, head) row, so it factors as
  ``(q8·k8) sq sk`` with an exact int32 sum. K is *smoothed* first: its mean over the tokens of the
  head is subtracted, which shifts every score of a query by the same amount (``q·mean``) and so
  leaves softmax unchanged, while removing the shared offset that real keys carry and that would
  otherwise spend the 8 bits. e4m3 (3 mantissa bits) here costs ~4× the error of INT8.
- ``PV_FP8``: p·v in e4m3. v is quantised per (head, channel) over the sequence, so ``sv`` is one
  factor per output column applied once after the loop; V is stored transposed (``[B*H, D, S_pad]``)
  so the operand is K-major, the layout Hopper's fp8 MMA reads without a shared-memory transpose.
  Probabilities leave ``exp2`` already times 2**8 (the exponent shifted). Hopper's fp8 MMA
  accumulates in reduced precision (~22 bits), so each key tile's p·v goes into a fresh accumulator
  that is then added to the fp32 running sum (two-level accumulation); accumulating the whole row in
  place would carry that reduced precision across all tiles.
"""

from __future__ import annotations

import triton
import triton.language as tl

INT8_MAX = tl.constexpr(127.0)
FP8_MAX = tl.constexpr(448.0)  # largest finite float8_e4m3fn
# P is in [0, 1]; e4m3's smallest subnormal is 2**-9, so fp8 probabilities are computed as 2**8 p (the
# exponent shifted by 8 inside exp2, no extra multiply): values down to 2**-17 survive, 256 < 448
# cannot overflow, and the factor cancels because the row sums l carry it too.
P_LOG2_SCALE = tl.constexpr(8.0)


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
def _quantise_rows_int8(x):
    """Each row of an fp32 tile to INT8 (round to nearest) with its scale: ``x ≈ x8 * scale[:, None]``."""
    scale = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-12) / INT8_MAX
    return tl.floor(x / scale[:, None] + 0.5).to(tl.int8), scale


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
    """Load a [rows, HEAD_DIM] tile of q or k and return RMSNorm(x) * w, rotated, in fp32 (rows ≥ S: 0)."""
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
def _stats_kernel(
    kt, kt_sb, kt_sh, kt_ss, ki, ki_sb, ki_sh, ki_ss,
    vt, vt_sb, vt_sh, vt_ss, vi, vi_sb, vi_sh, vi_ss,
    wk_txt, wk_img, cos_ptr, sin_ptr, rope_stride,
    k_sum, v_amax,  # [B*H, CHUNKS, D] fp32 partials: Σ k (normalised, rotated), max |v|
    S_txt, S, H, eps,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr, PV_FP8: tl.constexpr,
):
    # fmt: on
    """Program ``(c, bh)`` covers row tiles c, c + CHUNKS, c + 2·CHUNKS, … of one head."""
    c = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    cols = tl.arange(0, HEAD_DIM)
    k_acc = tl.zeros([HEAD_DIM], tl.float32)
    v_acc = tl.zeros([HEAD_DIM], tl.float32)
    for start in range(c * BLOCK, S, CHUNKS * BLOCK):
        rows = start + tl.arange(0, BLOCK)
        k = _load_norm_rope(
            kt, kt_sb, kt_sh, kt_ss, ki, ki_sb, ki_sh, ki_ss, wk_txt, wk_img, cos_ptr, sin_ptr, rope_stride, b, h,
            rows, S_txt, S, eps, HEAD_DIM,
        )
        k_acc += tl.sum(k, axis=0)
        if PV_FP8:
            ptrs = _rows_ptr(vt, vt_sb, vt_sh, vt_ss, vi, vi_sb, vi_sh, vi_ss, b, h, rows, cols, S_txt)
            v = tl.load(ptrs, mask=(rows < S)[:, None], other=0.0).to(tl.float32)
            v_acc = tl.maximum(v_acc, tl.max(tl.abs(v), axis=0))
    out = (bh * CHUNKS + c) * HEAD_DIM + cols
    tl.store(k_sum + out, k_acc)
    if PV_FP8:
        tl.store(v_amax + out, v_acc)


# fmt: off
@triton.jit
def _prologue_kernel(
    qt, qt_sb, qt_sh, qt_ss, qi, qi_sb, qi_sh, qi_ss,  # q: text stream, image stream (ptr, strides b/h/s)
    kt, kt_sb, kt_sh, kt_ss, ki, ki_sb, ki_sh, ki_ss,
    vt, vt_sb, vt_sh, vt_ss, vi, vi_sb, vi_sh, vi_ss,
    wq_txt, wk_txt, wq_img, wk_img, cos_ptr, sin_ptr, rope_stride,
    q_out, k_out, v_out,  # head-major [B*H, S_pad, D]; PV_FP8: v transposed, [B*H, D, S_pad]
    q_scale, k_scale,  # QK_INT8: [B*H, S_pad] per-row scales (outputs)
    k_sum, v_amax,  # QK_INT8 / PV_FP8: the stats kernel's [B*H, CHUNKS, D] partials (inputs)
    S_txt, S, S_pad, H, eps,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, CHUNKS: tl.constexpr,
    QK_INT8: tl.constexpr, PV_FP8: tl.constexpr, ROUND_FP8: tl.constexpr,
):
    """One [BLOCK, HEAD_DIM] tile of rows per program; rows in [S, S_pad) are written as zeros."""
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
    v = tl.load(
        _rows_ptr(vt, vt_sb, vt_sh, vt_ss, vi, vi_sb, vi_sh, vi_ss, b, h, rows, cols, S_txt), mask=valid, other=0.0,
    )
    out_off = (bh * S_pad + rows)[:, None] * HEAD_DIM + cols[None, :]
    partials = (bh * CHUNKS + tl.arange(0, CHUNKS))[:, None] * HEAD_DIM + cols[None, :]
    if QK_INT8:
        k_mean = tl.sum(tl.load(k_sum + partials), axis=0) / S  # fixed order: the same on every run
        k = tl.where(valid, k - k_mean[None, :], 0.0)
        q8, sq = _quantise_rows_int8(q)
        k8, sk = _quantise_rows_int8(k)
        tl.store(q_out + out_off, q8)
        tl.store(k_out + out_off, k8)
        tl.store(q_scale + bh * S_pad + rows, sq)
        tl.store(k_scale + bh * S_pad + rows, sk)
    else:
        tl.store(q_out + out_off, q.to(q_out.dtype.element_ty))
        tl.store(k_out + out_off, k.to(k_out.dtype.element_ty))
    if PV_FP8:
        sv = tl.maximum(tl.max(tl.load(v_amax + partials), axis=0), 1e-12) / FP8_MAX
        v8 = _to_fp8(v.to(tl.float32) / sv[None, :], v_out.dtype.element_ty, ROUND_FP8)
        # Transposed store: consecutive rows are consecutive bytes of one channel's row.
        tl.store(v_out + (bh * HEAD_DIM + cols)[:, None] * S_pad + rows[None, :], tl.trans(v8))
    else:
        tl.store(v_out + out_off, v)


@triton.jit
def _tile(src, row, col, ROWS: tl.constexpr, COLS: tl.constexpr, row_stride, TMA: tl.constexpr):
    """A [ROWS, COLS] tile at (row, col) of a row-major 2-D buffer: a TMA copy or a pointer load.

    No mask: the buffers are padded so that every tile the kernel asks for is in bounds.
    """
    if TMA:
        return src.load([row, col])
    else:
        offs = (row + tl.arange(0, ROWS))[:, None] * row_stride + col + tl.arange(0, COLS)[None, :]
        return tl.load(src + offs)


@triton.jit
def _attend(
    acc, l_i, m_i, q, sq, k, v, k_scale, kv_row, v_row, lo, hi, S, S_pad,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, QK_INT8: tl.constexpr, PV_FP8: tl.constexpr,
    ROUND_FP8: tl.constexpr, TMA: tl.constexpr, MASK: tl.constexpr,
):
    """Online-softmax update over key tiles [lo, hi); ``MASK`` only for the peeled last tile."""
    for start in range(lo, hi, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        kt = _tile(k, kv_row + start, 0, BLOCK_N, HEAD_DIM, HEAD_DIM, TMA)
        if QK_INT8:
            s = tl.dot(q, tl.trans(kt)).to(tl.float32)  # exact int32 sums
            s = s * tl.load(k_scale + kv_row + start + tl.arange(0, BLOCK_N))[None, :]
        else:
            s = tl.dot(q, tl.trans(kt))
        if MASK:
            s = tl.where((start + tl.arange(0, BLOCK_N) < S)[None, :], s, float("-inf"))
        # sq > 0, so the row max of s * sq is (row max of s) * sq: the scale then rides on one FMA per
        # score inside exp2 instead of a multiply and a subtract.
        m_new = tl.maximum(m_i, tl.max(s, axis=1) * sq)
        if PV_FP8:
            p = tl.math.exp2(s * sq[:, None] - (m_new - P_LOG2_SCALE)[:, None])
        else:
            p = tl.math.exp2(s * sq[:, None] - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if PV_FP8:
            vt = _tile(v, v_row, start, HEAD_DIM, BLOCK_N, S_pad, TMA)  # [D, BLOCK_N]: K-major for p·v
            # Two-level accumulation: a fresh accumulator per tile (the fp8 MMA of Ada and Hopper keeps
            # ~22 bits), added to the fp32 sum here. A non-zero max_num_imprecise_acc keeps Triton from
            # folding the add back into the dot (it does so on sm89 otherwise: benchmarks/kernel_static.py).
            pv = tl.dot(_to_fp8(p, vt.dtype, ROUND_FP8), tl.trans(vt), max_num_imprecise_acc=BLOCK_N)
            acc = acc * alpha[:, None] + pv
        else:
            vv = _tile(v, kv_row + start, 0, BLOCK_N, HEAD_DIM, HEAD_DIM, TMA)
            acc = tl.dot(p.to(vv.dtype), vv, acc * alpha[:, None])
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _attention_kernel(
    q, k, v,  # the pre-pass's buffers as 2-D row-major tensors, or (TMA) tensor descriptors over them
    q_scale, k_scale, v_amax,  # 8-bit modes only (see _prologue_kernel)
    out, o_sb, o_sh, o_ss,
    S, S_pad, S_BUCKET, H, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr,
    QK_INT8: tl.constexpr, PV_FP8: tl.constexpr, ROUND_FP8: tl.constexpr, TMA: tl.constexpr,
):
    """Non-causal flash attention forward (online softmax in base 2, fp32 accumulation).

    ``S_BUCKET`` is not used here: it is the autotuner's key (the sequence length rounded up to a
    power of two). The softmax scale (times log2 e) rides on q's per-row factor ``sq``: one multiply
    per score. Output rows are written as ``out[b, s, h, :]``, so ``[B, S, H, D]`` flattens to
    ``[B, S, H*D]`` for the output projection without a transpose.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, HEAD_DIM)
    kv_row = bh * S_pad
    qt = _tile(q, kv_row + pid_m * BLOCK_M, 0, BLOCK_M, HEAD_DIM, HEAD_DIM, TMA)
    if QK_INT8:
        sq = tl.load(q_scale + kv_row + rows) * qk_scale
    else:
        sq = tl.full([BLOCK_M], qk_scale, tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    full = (S // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attend(
        acc, l_i, m_i, qt, sq, k, v, k_scale, kv_row, bh * HEAD_DIM, 0, full, S, S_pad,
        HEAD_DIM, BLOCK_N, QK_INT8, PV_FP8, ROUND_FP8, TMA, False,
    )
    if full < S:
        acc, l_i, m_i = _attend(
            acc, l_i, m_i, qt, sq, k, v, k_scale, kv_row, bh * HEAD_DIM, full, full + BLOCK_N, S, S_pad,
            HEAD_DIM, BLOCK_N, QK_INT8, PV_FP8, ROUND_FP8, TMA, True,
        )
    if PV_FP8:  # the per-channel V scale, as in the pre-pass (max over the stats partials)
        partials = (bh * CHUNKS + tl.arange(0, CHUNKS))[:, None] * HEAD_DIM + cols[None, :]
        sv = tl.maximum(tl.max(tl.load(v_amax + partials), axis=0), 1e-12) / FP8_MAX
        acc = acc * sv[None, :]
    o = acc / l_i[:, None]
    o_ptr = out + b * o_sb + h * o_sh + rows[:, None] * o_ss + cols[None, :]
    tl.store(o_ptr, o.to(out.dtype.element_ty), mask=(rows < S)[:, None])
# fmt: on
