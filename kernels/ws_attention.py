"""The ``ws`` attention design: warp-specialized flash attention for Hopper (sm_90a), in Gluon.

Plain ``tl`` cannot keep a tensor-core MMA in flight across the softmax on Hopper: its wgmma pipeliner
waits every q·kᵀ at depth 0, and ``tl.range(warp_specialize=True)`` changes nothing there
(``benchmarks/kernel_static.py``). Gluon (``triton.experimental.gluon``, triton >= 3.6) states the
schedule itself, FlashAttention-3's:

- one CTA = a 1-warp loader and two consumer warpgroups of ``BLOCK_M`` query rows each;
- the loader issues TMA copies of Q (once) and of K and V tiles into ``STAGES``-deep rings, each slot
  with a ready and an empty mbarrier (both consumers release a slot);
- a consumer's iteration j issues S_j = Q·K_jᵀ and O += P_{j-1}·V_{j-1} back to back (both async),
  waits with one MMA outstanding (S_j done, the P·V still on the tensor cores), runs the softmax of
  S_j, stores its row sums to shared memory, and only then waits for the P·V and rescales O by the
  new max: the softmax's exp2s run while the P·V runs;
- the two consumers take turns issuing their MMAs (a pair of mbarriers), so one's softmax also
  overlaps the other's MMAs (ping-pong).

The store of the row sums before the P·V wait is what keeps the overlap: every bundled ptxas otherwise
hoists the wait above the exp2s (``../shared/sketches/gluon-ws-attention/``; the static check counts
the exp2s inside the window from the SASS). It reads the buffers the pre-pass writes
(:mod:`.flux_attention`'s ``_prologue_kernel``): head-major ``[B*H*S_pad, D]`` q/k/v, zero past ``S``,
8-bit modes with per-token scales and (e4m3 p·v) V transposed with the stats pass's per-channel maxima.
The last key tile is masked to ``S``. Never run on a GPU yet: correct in emulation
(``srpo_infer/bench/ws_schedule.py``), unmeasured in time.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

# triton 3.6/3.7 name the TMA load async_copy_global_to_shared; 3.8 renamed it async_load (the old name
# stays as an alias there).
_tma_load = getattr(tma, "async_load", None) or tma.async_copy_global_to_shared

FP8_MAX = gl.constexpr(448.0)  # largest finite float8_e4m3fn
P_LOG2_SCALE = gl.constexpr(8.0)  # e4m3 probabilities are 2**8 p, as in flux_attention.py


# fmt: off
@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty,
            q_row, kv_row, vt_row, n_kv,
            BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, PV_FP8: gl.constexpr):
    """The loader warp: Q's two halves once, then K and V tiles into their rings as slots free up."""
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    _tma_load(q_desc, [q_row, 0], q_bar, q_smem.index(0))
    _tma_load(q_desc, [q_row + BLOCK_M, 0], q_bar, q_smem.index(1))
    for j in range(n_kv):
        slot = j % STAGES
        phase = ((j // STAGES) & 1) ^ 1  # a fresh barrier passes a wait on parity 1
        mbarrier.wait(k_empty.index(slot), phase)
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        _tma_load(k_desc, [kv_row + j * BLOCK_N, 0], k_ready.index(slot), k_smem.index(slot))
        mbarrier.wait(v_empty.index(slot), phase)
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        if PV_FP8:  # V transposed, [B*H*D, S_pad]: the tile is [D, BLOCK_N], K-major for the e4m3 MMA
            _tma_load(v_desc, [vt_row, j * BLOCK_N], v_ready.index(slot), v_smem.index(slot))
        else:
            _tma_load(v_desc, [kv_row + j * BLOCK_N, 0], v_ready.index(slot), v_smem.index(slot))


@gluon.jit
def _scores(s, k_scale, kv_row, start, S, BLOCK_N: gl.constexpr, col_s: gl.constexpr, QK_INT8: gl.constexpr,
            MASK: gl.constexpr):
    """One q·kᵀ tile in fp32 (8-bit: the exact int32 sums times the per-key scales); ``MASK`` (the first
    and last tiles only: a mask in every tile costs the loop its registers and it spills) sets keys past
    S to -inf."""
    cols = start + gl.arange(0, BLOCK_N, layout=col_s)
    if QK_INT8:
        s = s.to(gl.float32) * gl.load(k_scale + kv_row + cols)[None, :]
    if MASK:
        s = gl.where((cols < S)[None, :], s, float("-inf"))
    return s


@gluon.jit
def _step(j, q, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, turn, k_scale, kv_row, S, sq, zero_s, zero_o,
          acc, m_i, l_i, p, sums,
          HALF: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr, QK_INT8: gl.constexpr,
          PV_FP8: gl.constexpr, MASK: gl.constexpr, shift: gl.constexpr, col_s: gl.constexpr,
          row_o: gl.constexpr, p_layout: gl.constexpr):
    """Key tile j: issue S_j and P_{j-1}·V_{j-1}, wait for S_j only, softmax S_j while the P·V runs,
    then wait for it and rescale the output by the new row max."""
    pv_dtype: gl.constexpr = v_smem.dtype
    slot = j % STAGES
    phase = (j // STAGES) & 1
    prev = (j - 1) % STAGES
    prev_phase = ((j - 1) // STAGES) & 1
    mbarrier.wait(turn.index(HALF), (j + HALF - 1) & 1)  # the other consumer has issued its MMAs
    mbarrier.wait(k_ready.index(slot), phase)
    s = warpgroup_mma(q, k_smem.index(slot).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    p_op = gl.convert_layout(p.to(pv_dtype), p_layout)
    mbarrier.wait(v_ready.index(prev), prev_phase)
    if PV_FP8:  # two-level accumulation: each tile's e4m3 P·V in a fresh (reduced-precision) accumulator
        pv = warpgroup_mma(p_op, v_smem.index(prev).permute((1, 0)), zero_o, use_acc=False, is_async=True)
    else:
        pv = warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
    mbarrier.arrive(turn.index(1 - HALF))
    s = warpgroup_mma_wait(num_outstanding=1, deps=[s])  # S_j retired; P_{j-1}·V_{j-1} in flight
    mbarrier.arrive(k_empty.index(slot))
    s = _scores(s, k_scale, kv_row, j * BLOCK_N, S, BLOCK_N, col_s, QK_INT8, MASK)
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * sq)
    p = gl.exp2(s * sq[:, None] - (m_new - shift)[:, None])
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    # The row sums go to shared memory before the P·V wait: a memory operation ptxas keeps on its side
    # of the wait, which needs every exp2 of the tile, so the exp2s stay inside the overlap window.
    sums.store(l_i)
    if PV_FP8:  # an 8-bit register operand cannot pass through the wait (triton 3.9: "Unexpected bitwidth")
        pv = warpgroup_mma_wait(num_outstanding=0, deps=[pv])
        acc = (acc + pv) * gl.convert_layout(alpha, row_o)[:, None]
    else:
        pv, p_op = warpgroup_mma_wait(num_outstanding=0, deps=[pv, p_op])
        acc = pv * gl.convert_layout(alpha, row_o)[:, None]
    mbarrier.arrive(v_empty.index(prev))
    return acc, m_new, l_i, p


@gluon.jit
def _consumer(q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, turn,
              q_scale, k_scale, v_amax, out, o_ss, row0, kv_row, bh, S, n_kv, qk_scale,
              HALF: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
              STAGES: gl.constexpr, CHUNKS: gl.constexpr, QK_INT8: gl.constexpr, PV_FP8: gl.constexpr):
    """One consumer warpgroup: rows [row0 + HALF*BLOCK_M, +BLOCK_M) of one head, every key tile."""
    pv_dtype: gl.constexpr = v_smem.dtype
    QK_K: gl.constexpr = 32 if QK_INT8 else 16  # wgmma's k: 32 for 8-bit operands
    PV_K: gl.constexpr = 32 if PV_FP8 else 16
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, QK_K])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, PV_K])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout,
                                                 k_width=32 // pv_dtype.primitive_bitwidth)
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    col_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    col_o: gl.constexpr = gl.SliceLayout(0, o_layout)
    s_acc: gl.constexpr = gl.int32 if QK_INT8 else gl.float32
    shift: gl.constexpr = P_LOG2_SCALE if PV_FP8 else 0.0
    sums = gl.allocate_shared_memory(gl.float32, [BLOCK_M], gl.SwizzledSharedLayout(1, 1, 1, [0]))

    first = row0 + HALF * BLOCK_M
    mbarrier.wait(q_bar, 0)
    q = q_smem.index(HALF)
    zero_s = gl.zeros([BLOCK_M, BLOCK_N], s_acc, s_layout)
    zero_o = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    if QK_INT8:  # the per-row q scale carries the softmax scale (times log2 e): one multiply per score
        sq = gl.load(q_scale + kv_row + first + gl.arange(0, BLOCK_M, layout=row_s)) * qk_scale
    else:
        sq = gl.full([BLOCK_M], qk_scale, gl.float32, row_s)

    # Key tile 0: S_0 alone, nothing to overlap yet. Consumer 0 issues first.
    mbarrier.wait(turn.index(HALF), 0, pred=HALF == 1)
    mbarrier.wait(k_ready.index(0), 0)
    s = warpgroup_mma(q, k_smem.index(0).permute((1, 0)), zero_s, use_acc=False, is_async=True)
    mbarrier.arrive(turn.index(1 - HALF))
    s = warpgroup_mma_wait(num_outstanding=0, deps=[s])
    mbarrier.arrive(k_empty.index(0))
    s = _scores(s, k_scale, kv_row, 0, S, BLOCK_N, col_s, QK_INT8, True)
    m_i = gl.max(s, axis=1) * sq  # sq > 0: the row max of s·sq is (row max of s)·sq
    p = gl.exp2(s * sq[:, None] - (m_i - shift)[:, None])
    l_i = gl.sum(p, axis=1)
    acc = zero_o

    for j in range(1, n_kv - 1):
        acc, m_i, l_i, p = _step(j, q, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, turn, k_scale, kv_row,
                                 S, sq, zero_s, zero_o, acc, m_i, l_i, p, sums, HALF, BLOCK_N, STAGES, QK_INT8,
                                 PV_FP8, False, shift, col_s, row_o, p_layout)
    if n_kv > 1:  # the last key tile, masked to S
        acc, m_i, l_i, p = _step(n_kv - 1, q, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, turn, k_scale,
                                 kv_row, S, sq, zero_s, zero_o, acc, m_i, l_i, p, sums, HALF, BLOCK_N, STAGES,
                                 QK_INT8, PV_FP8, True, shift, col_s, row_o, p_layout)

    # The last tile's P·V.
    last = (n_kv - 1) % STAGES
    last_phase = ((n_kv - 1) // STAGES) & 1
    p_op = gl.convert_layout(p.to(pv_dtype), p_layout)
    mbarrier.wait(v_ready.index(last), last_phase)
    if PV_FP8:
        pv = warpgroup_mma(p_op, v_smem.index(last).permute((1, 0)), zero_o, use_acc=False, is_async=True)
        pv = warpgroup_mma_wait(num_outstanding=0, deps=[pv])
        acc = acc + pv
    else:
        acc = warpgroup_mma(p_op, v_smem.index(last), acc, is_async=True)
        acc, p_op = warpgroup_mma_wait(num_outstanding=0, deps=[acc, p_op])
    mbarrier.arrive(v_empty.index(last))

    cols = gl.arange(0, HEAD_DIM, layout=col_o)
    if PV_FP8:  # the per-channel V scale, as the pre-pass computed it (max over the stats partials)
        amax = gl.load(v_amax + bh * CHUNKS * HEAD_DIM + cols)
        for c in gl.static_range(1, CHUNKS):
            amax = gl.maximum(amax, gl.load(v_amax + (bh * CHUNKS + c) * HEAD_DIM + cols))
        acc = acc * (gl.maximum(amax, 1e-12) / FP8_MAX)[None, :]
    o = acc / gl.convert_layout(l_i, row_o)[:, None]
    rows = first + gl.arange(0, BLOCK_M, layout=row_o)
    gl.store(out + rows[:, None] * o_ss + cols[None, :], o.to(out.dtype.element_ty), mask=(rows < S)[:, None])


@gluon.jit
def _ws_attention_kernel(
    q_desc, k_desc, v_desc,  # TMA descriptors over the pre-pass's head-major buffers
    q_scale, k_scale, v_amax,  # 8-bit modes only (see flux_attention._prologue_kernel)
    out, o_sb, o_sh, o_ss,
    S, S_pad, H, qk_scale,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
    CHUNKS: gl.constexpr, QK_INT8: gl.constexpr, PV_FP8: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, LOADER_REGS: gl.constexpr,
):
    """2·BLOCK_M query rows of one (batch, head) per CTA; ``S`` real tokens in each head's
    ``S_pad``-row block (a multiple of 2·BLOCK_M and BLOCK_N); output ``out[b, s, h, :]``."""
    pid_m = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    kv_row = bh * S_pad
    row0 = pid_m * (2 * BLOCK_M)
    n_kv = (S + BLOCK_N - 1) // BLOCK_N

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, BLOCK_M, HEAD_DIM], q_desc.layout)
    k_smem = gl.allocate_shared_memory(k_desc.dtype, [STAGES, BLOCK_N, HEAD_DIM], k_desc.layout)
    # A starred list is not Gluon syntax: the shape is concatenated.
    v_smem = gl.allocate_shared_memory(v_desc.dtype, [STAGES] + v_desc.block_type.shape, v_desc.layout)  # noqa: RUF005
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # both consumers release a slot
        mbarrier.init(v_empty.index(i), count=2)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    fence_async_shared()

    out_bh = out + b * o_sb + h * o_sh
    gl.warp_specialize(
        [
            (_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, turn,
                         q_scale, k_scale, v_amax, out_bh, o_ss, row0, kv_row, bh, S, n_kv, qk_scale,
                         0, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CHUNKS, QK_INT8, PV_FP8)),
            (_consumer, (q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty, v_empty, turn,
                         q_scale, k_scale, v_amax, out_bh, o_ss, row0, kv_row, bh, S, n_kv, qk_scale,
                         1, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CHUNKS, QK_INT8, PV_FP8)),
            (_loader, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bar, k_ready, v_ready, k_empty,
                       v_empty, kv_row + row0, kv_row, bh * HEAD_DIM, n_kv, BLOCK_M, BLOCK_N, STAGES, PV_FP8)),
        ],
        [4, 1],
        [CONSUMER_REGS, LOADER_REGS],
    )
# fmt: on
