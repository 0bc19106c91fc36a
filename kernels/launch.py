"""Launchers for the Flux attention kernels: argument checks, buffers, grids and block sizes.

Callers pass the q/k/v projection outputs ``[B, S_stream, H*D]`` (column slices of a fused QKV
output are fine: only the last dim must be contiguous) of an image stream and, for double blocks, a
text stream; the result is ``[B, S_txt + S_img, H*D]``, text rows first, in the input dtype.

This package is a leaf: it imports nothing from ``srpo_infer`` outside itself. The inputs are any
sequence in the field order of ``srpo_infer.attention.AttentionInputs`` (that NamedTuple, in practice).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from . import configs
from . import flux_attention as K
from .configs import (
    INTERPRETER_CONFIG,
    MODES,
    WS_CONFIGS,
    WS_REGISTERS,
    KernelConfig,
    Mode,
    candidates,
    check_mode,
    device_capability,
    interpreting,
    padding,
    ws_refusal,
)

LOG2E = 1.4426950408889634
HEAD_DIMS = (32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def seq_bucket(s: int) -> int:
    """The autotuner's key for a sequence length: the next power of two. Flux's 1089 valid sizes
    (1536–9728 tokens with the text) fall in 4 buckets, so warming up one size per bucket means no
    request ever pays an autotuning benchmark.

    >>> [seq_bucket(s) for s in (1536, 2048, 2049, 4608, 9728)]
    [2048, 2048, 4096, 8192, 16384]
    """
    return 1 << max(0, s - 1).bit_length()


DESIGNS = ("pointer", "tma", "ws")
# What ``design="auto"`` runs (``SRPO_ATTENTION_DESIGN`` overrides it, e.g. to time the pipeline with
# "tma"). "tma" (tensor-descriptor loads, Hopper's TMA) is the design written for sm90, but it has only
# run under the interpreter so far: no GPU was lent when it was written. It becomes the default on
# sm >= 90 once benchmarks/bench_attention.py --sweep has timed it there.
DEFAULT_DESIGN = "pointer"
DESIGN_ENV = "SRPO_ATTENTION_DESIGN"


def _tiles(block_m: int, block_n: int, head_dim: int, pv_fp8: bool) -> tuple[list, list, list]:
    """The q, k and v tile shapes of a TMA load (e4m3 v is stored transposed)."""
    return [block_m, head_dim], [block_n, head_dim], [head_dim, block_n] if pv_fp8 else [block_n, head_dim]


def _set_block_shapes(nargs: dict) -> None:
    """Autotuner pre-hook: a config's tile sizes into the TMA descriptors."""
    if nargs["TMA"]:
        tiles = _tiles(nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["HEAD_DIM"], nargs["PV_FP8"])
        for name, tile in zip("qkv", tiles, strict=True):
            nargs[name].block_shape = tile


_TUNERS: dict[tuple, object] = {}


def _tuned_attention(mode: str, tma: bool, capability: tuple[int, int]):
    """``_attention_kernel`` under ``triton.autotune``, keyed on the sequence-length bucket and the head
    dim (never the exact length: a new image size must not re-benchmark on the request path), with the
    choices cached on disk by Triton so later processes skip the benchmark too. One tuner per
    (mode, design, candidate set)."""
    configs = candidates(mode, capability)
    key = (mode, tma, configs)
    if key not in _TUNERS:
        tuned = [
            triton.Config(
                {"BLOCK_M": c.block_m, "BLOCK_N": c.block_n},
                num_warps=c.num_warps,
                num_stages=c.num_stages,
                pre_hook=_set_block_shapes,
            )
            for c in configs
        ]
        _TUNERS[key] = triton.autotune(configs=tuned, key=["S_BUCKET", "HEAD_DIM"], cache_results=True)(
            K._attention_kernel
        )
    return _TUNERS[key]


def tuned_configs() -> dict:
    """The autotuners' choices so far: ``{"native/pointer (4096, 128)": "BLOCK_M: 128, …"}``."""
    chosen = {}
    for (mode, tma, _), tuner in _TUNERS.items():
        name = f"{mode}/{'tma' if tma else 'pointer'}"
        if len(tuner.configs) == 1:  # nothing to choose (interpreter): Triton keeps no cache then
            chosen[f"{name} any"] = str(tuner.configs[0])
        chosen.update({f"{name} {key}": str(cfg) for key, cfg in tuner.cache.items()})
    return chosen


def resolve_design(design: str, device: torch.device, for_target: bool = False) -> str:
    """``auto`` → ``$SRPO_ATTENTION_DESIGN`` or :data:`DEFAULT_DESIGN`; ``tma`` needs host tensor
    descriptors (sm >= 90, or the interpreter); ``ws`` Hopper itself (sm_90, no interpreter), except when
    planning ``for_target`` (a compile for a GPU that is not here)."""
    if design not in ("auto", *DESIGNS):
        raise ValueError(f"design must be one of {('auto', *DESIGNS)}, got {design!r}")
    if design == "auto":
        design = os.environ.get(DESIGN_ENV) or DEFAULT_DESIGN
        if design not in DESIGNS:
            raise ValueError(f"{DESIGN_ENV} must be one of {DESIGNS}, got {design!r}")
    if design == "tma" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        raise ValueError("design='tma' needs tensor memory accelerators (sm >= 90); use design='pointer'")
    if design == "ws" and not for_target and (refusal := ws_refusal(device)):
        raise ValueError(refusal.replace("attention_design=", "design="))
    return design


class Launch(NamedTuple):
    """One kernel launch of a plan: ``kernel[grid](*args, **meta)``."""

    name: str  # "stats", "prologue" or "attention"
    kernel: object  # a @triton.jit function, or the autotuner over one
    grid: tuple | Callable
    args: list
    meta: dict


def plan(
    x: Sequence,
    mode: str = "native",
    out: torch.Tensor | None = None,
    design: str = "auto",
    config: KernelConfig | None = None,
    capability: tuple[int, int] | None = None,
) -> tuple[list[Launch], torch.Tensor]:
    """Every launch :func:`flux_attention` makes, with its buffers allocated, and the output
    ``[B, S, H*D]``; nothing runs. ``capability`` (with CPU tensors and no interpreter) plans for a
    GPU that is not here: ``benchmarks/kernel_static.py`` compiles the result for that target."""
    for_target = capability is not None and not interpreting()
    s_txt, s, head_dim = _check_inputs(x, mode, for_target)
    img_q, heads = x[0], x[7]
    design = resolve_design(design, img_q.device, for_target)
    if design == "ws" and img_q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"design='ws' runs bf16 or fp16 inputs, got {img_q.dtype}")
    tma = design == "tma"
    batch, width, dev = img_q.shape[0], img_q.shape[2], img_q.device
    if out is None:
        out = torch.empty(batch, s, heads, head_dim, device=dev, dtype=img_q.dtype)
    elif out.shape != (batch, s, width) or out.dtype != img_q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{batch}, {s}, {width}] {img_q.dtype} tensor")
    else:
        out = out.view(batch, s, heads, head_dim)
    if config is not None and not isinstance(config, KernelConfig):
        raise ValueError(f"config must be a KernelConfig, got {config!r}")
    capability = capability or device_capability(dev)
    if design == "ws":
        config = config or WS_CONFIGS[mode]
    # 1. Pre-pass: normalised, rotated q and k and the values, head-major and padded (8-bit: quantised).
    pad = padding([config] if config else candidates(mode, capability))
    buffers = _prepass_buffers(img_q, MODES[mode], batch * heads, triton.cdiv(s, pad) * pad, head_dim)
    launches = _prepass_launches(x, MODES[mode], buffers, min(pad, _prepass_rows()), s_txt, s, head_dim)
    # 2. Attention over the padded buffers.
    if design == "ws":
        launches.append(_ws_attention_launch(buffers, out, mode, config))
    else:
        launches.append(_attention_launch(buffers, out, mode, tma, config, capability))
    return launches, out.view(batch, s, width)


class _Buffers(NamedTuple):
    """What the pre-pass writes and the attention pass reads: q, k and v head-major with ``s_pad`` rows
    per head, and (8-bit modes) the per-token scales and the stats pass's per-head partials."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    qs: torch.Tensor
    ks: torch.Tensor
    k_sum: torch.Tensor
    v_amax: torch.Tensor
    s_pad: int
    chunks: int


def _prepass_rows() -> int:
    # Read from configs per plan (not bound at import): a test plans the pre-pass as it shipped before.
    return INTERPRETER_CONFIG.block_m if interpreting() else configs.PROLOGUE_ROWS


def _prepass_buffers(img_q: torch.Tensor, flags: Mode, bh: int, s_pad: int, head_dim: int) -> _Buffers:
    dev = img_q.device
    chunks = 2 if interpreting() else configs.STATS_CHUNKS
    qk_dtype = torch.int8 if flags.qk_int8 else img_q.dtype
    q = torch.empty(bh * s_pad, head_dim, device=dev, dtype=qk_dtype)
    k = torch.empty_like(q)
    if flags.pv_fp8:
        v = torch.empty(bh * head_dim, s_pad, device=dev, dtype=torch.float8_e4m3fn)  # transposed: K-major
    else:
        v = torch.empty(bh * s_pad, head_dim, device=dev, dtype=img_q.dtype)
    f32 = dict(device=dev, dtype=torch.float32)
    unused = torch.empty(1, **f32)  # a mode's pointer arguments it never reads
    qs = torch.empty(bh * s_pad, **f32) if flags.qk_int8 else unused
    ks = torch.empty(bh * s_pad, **f32) if flags.qk_int8 else unused
    k_sum = torch.empty(bh, chunks, head_dim, **f32) if flags.qk_int8 else unused
    v_amax = torch.empty(bh, chunks, head_dim, **f32) if flags.pv_fp8 else unused
    return _Buffers(q, k, v, qs, ks, k_sum, v_amax, s_pad, chunks)


def _prepass_launches(
    x: Sequence, flags: Mode, b: _Buffers, rows: int, s_txt: int, s: int, head_dim: int
) -> list[Launch]:
    """The stats pass (8-bit modes: each head's mean key, each value channel's max) and the pre-pass."""
    img_q, img_k, img_v, img_norm_q, img_norm_k, rope_cos, rope_sin, heads = x[:8]
    txt_q, txt_k, txt_v, txt_norm_q, txt_norm_k, eps = x[8:]
    bh = img_q.shape[0] * heads
    has_txt = txt_q is not None
    tq, tk, tv = (txt_q, txt_k, txt_v) if has_txt else (img_q, img_k, img_v)  # unused when s_txt == 0
    wq_t, wk_t = (txt_norm_q, txt_norm_k) if has_txt else (img_norm_q, img_norm_k)
    streams = [a for t in (tq, img_q, tk, img_k, tv, img_v) for a in (t, t.stride(0), head_dim, t.stride(1))]
    rope = [rope_cos, rope_sin, rope_cos.stride(0)]
    warps = 1 if interpreting() else configs.PROLOGUE_WARPS
    launches = []
    if flags.qk_int8 or flags.pv_fp8:
        launches.append(
            Launch(
                "stats",
                K._stats_kernel,
                (b.chunks, bh),
                [*streams[8:], wk_t, img_norm_k, *rope, b.k_sum, b.v_amax, s_txt, s, heads, eps],
                dict(HEAD_DIM=head_dim, BLOCK=rows, CHUNKS=b.chunks, PV_FP8=flags.pv_fp8, num_warps=warps),
            )
        )
    norms = [wq_t, wk_t, img_norm_q, img_norm_k]
    outputs = [b.q, b.k, b.v, b.qs, b.ks, b.k_sum, b.v_amax]
    meta = dict(HEAD_DIM=head_dim, BLOCK=rows, CHUNKS=b.chunks, QK_INT8=flags.qk_int8, PV_FP8=flags.pv_fp8)
    launches.append(
        Launch(
            "prologue",
            K._prologue_kernel,
            (b.s_pad // rows, bh),
            [*streams, *norms, *rope, *outputs, s_txt, s, b.s_pad, heads, eps],
            dict(**meta, ROUND_FP8=interpreting(), num_warps=warps),
        )
    )
    return launches


def _attention_launch(
    b: _Buffers, out: torch.Tensor, mode: str, tma: bool, config: KernelConfig | None, capability: tuple[int, int]
) -> Launch:
    """The flash attention pass: autotuned per sequence bucket, or at ``config``; TMA descriptors get
    their tile shapes from the config."""
    flags = MODES[mode]
    batch, s, heads, head_dim = out.shape
    bh = batch * heads
    q, k, v = b.q, b.k, b.v
    if tma:
        first = config or candidates(mode, capability)[0]  # the autotuner's pre-hook resets the tiles per config
        tiles = _tiles(first.block_m, first.block_n, head_dim, flags.pv_fp8)
        q, k, v = (TensorDescriptor.from_tensor(t, tile) for t, tile in zip((q, k, v), tiles, strict=True))
    strides = [out.stride(0), out.stride(2), out.stride(1)]
    scale = LOG2E / math.sqrt(head_dim)
    args = [q, k, v, b.qs, b.ks, b.v_amax, out, *strides, s, b.s_pad, seq_bucket(s), heads, scale]
    meta = dict(HEAD_DIM=head_dim, CHUNKS=b.chunks, QK_INT8=flags.qk_int8, PV_FP8=flags.pv_fp8)
    meta |= dict(ROUND_FP8=interpreting(), TMA=tma)
    if config is None:
        grid = lambda m: (triton.cdiv(s, m["BLOCK_M"]), bh)  # noqa: E731
        return Launch("attention", _tuned_attention(mode, tma, capability), grid, args, meta)
    meta |= dict(
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, num_warps=config.num_warps, num_stages=config.num_stages
    )
    return Launch("attention", K._attention_kernel, (triton.cdiv(s, config.block_m), bh), args, meta)


def _ws_attention_launch(b: _Buffers, out: torch.Tensor, mode: str, config: KernelConfig) -> Launch:
    """The ``ws`` design's one launch (:mod:`.ws_attention`): Gluon's own TMA descriptors, one fixed
    configuration per mode (:data:`~.configs.WS_CONFIGS`), a CTA per 2 × ``block_m / 2`` query rows."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor

    from .ws_attention import _ws_attention_kernel

    flags = MODES[mode]
    batch, s, heads, head_dim = out.shape
    half = config.block_m // 2
    tiles = _tiles(half, config.block_n, head_dim, flags.pv_fp8)
    elements = {
        torch.bfloat16: gl.bfloat16,
        torch.float16: gl.float16,
        torch.int8: gl.int8,
        torch.float8_e4m3fn: gl.float8e4nv,
    }
    descriptors = [
        GluonDescriptor.from_tensor(t, tile, gl.NVMMASharedLayout.get_default_for(tile, elements[t.dtype]))
        for t, tile in zip((b.q, b.k, b.v), tiles, strict=True)
    ]
    strides = [out.stride(0), out.stride(2), out.stride(1)]
    args = [*descriptors, b.qs, b.ks, b.v_amax, out, *strides, s, b.s_pad, heads, LOG2E / math.sqrt(head_dim)]
    meta = dict(
        HEAD_DIM=head_dim,
        BLOCK_M=half,
        BLOCK_N=config.block_n,
        STAGES=config.num_stages,
        CHUNKS=b.chunks,
        QK_INT8=flags.qk_int8,
        PV_FP8=flags.pv_fp8,
        CONSUMER_REGS=WS_REGISTERS[0],
        LOADER_REGS=WS_REGISTERS[1],
        num_warps=config.num_warps,
    )
    return Launch("attention", _ws_attention_kernel, (triton.cdiv(s, config.block_m), batch * heads), args, meta)


def flux_attention(
    x: Sequence,
    mode: str = "native",
    out: torch.Tensor | None = None,
    design: str = "auto",
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Fused Flux attention: RMSNorm(q, k) → RoPE → concat(text, image) → softmax(q kᵀ/√d) v.

    ``x``: the fields of ``srpo_infer.attention.AttentionInputs``, in order.
    ``mode``: ``native`` (the input dtype's own tensor-core path throughout: bf16, fp16 or fp32),
    ``int8`` (INT8 q·kᵀ with K smoothed, p·v in the input dtype; CUDA sm ≥ 80) or ``int8-fp8`` (INT8
    q·kᵀ, e4m3 p·v; sm ≥ 89); see :data:`MODES`.
    ``out``: optional ``[B, S, H*D]`` contiguous result buffer (tests pass a NaN-poisoned one).
    ``design``: how the attention loop loads tiles (``pointer``, ``tma``; ``auto`` = :data:`DEFAULT_DESIGN`),
    or ``ws``: the warp-specialized Gluon kernel for Hopper (:mod:`.ws_attention`; sm_90 only, never run yet).
    ``config``: run this :class:`KernelConfig` instead of the autotuner's choice (benchmark sweeps, tests).

    >>> # out = flux_attention(AttentionInputs(q, k, v, attn.norm_q.weight, attn.norm_k.weight, cos, sin, 24))
    """
    launches, result = plan(x, mode, out, design, config)
    for launch in launches:
        launch.kernel[launch.grid](*launch.args, **launch.meta)
    return result


def _check_inputs(x: Sequence, mode: str, for_target: bool = False) -> tuple[int, int, int]:
    """Every argument check, before anything is allocated or launched: ``(s_txt, s, head_dim)``."""
    img_q, img_k, img_v, img_norm_q, img_norm_k, rope_cos, rope_sin, heads = x[:8]
    txt_q, txt_k, txt_v, txt_norm_q, txt_norm_k, _ = x[8:]
    check_mode(mode)
    if img_q.dim() != 3:
        raise ValueError(f"img_q must be [batch, tokens, heads*head_dim], got shape {tuple(img_q.shape)}")
    if not isinstance(heads, int) or heads < 1 or img_q.shape[2] % heads:
        raise ValueError(f"heads must be a positive divisor of the width {img_q.shape[2]}, got {heads!r}")
    width = img_q.shape[2]
    head_dim = width // heads
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"head_dim must be one of {HEAD_DIMS}, got {head_dim} ({width} / {heads} heads)")
    if img_q.dtype not in DTYPES:
        raise ValueError(f"img_q dtype must be one of {DTYPES}, got {img_q.dtype}")
    if img_q.device.type != "cuda" and not interpreting() and not for_target:
        raise ValueError(f"tensors are on {img_q.device}; the Triton kernels need CUDA (or TRITON_INTERPRET=1)")
    need = MODES[mode].min_capability
    if img_q.device.type == "cuda" and torch.cuda.get_device_capability(img_q.device) < need:
        raise ValueError(f"mode={mode!r} needs a GPU with compute capability >= {need[0]}.{need[1]}; use mode='native'")
    has_txt = txt_q is not None
    if has_txt != (txt_k is not None) or has_txt != (txt_v is not None):
        raise ValueError("txt_q, txt_k and txt_v must be given together")
    if has_txt and (txt_norm_q is None or txt_norm_k is None):
        raise ValueError("the text stream needs txt_norm_q and txt_norm_k")
    for name, t in (("img_k", img_k), ("img_v", img_v)):
        _check_stream(name, t, img_q, width)
        if t.shape[1] != img_q.shape[1]:
            raise ValueError(f"{name} has {t.shape[1]} tokens, img_q has {img_q.shape[1]}")
    _check_stream("img_q", img_q, img_q, width)
    if has_txt:
        for name, t in (("txt_q", txt_q), ("txt_k", txt_k), ("txt_v", txt_v)):
            _check_stream(name, t, img_q, width)
            if t.shape[1] != txt_q.shape[1]:
                raise ValueError(f"{name} has {t.shape[1]} tokens, txt_q has {txt_q.shape[1]}")
    s_txt = txt_q.shape[1] if has_txt else 0
    s = s_txt + img_q.shape[1]
    norms = (
        ("img_norm_q", img_norm_q),
        ("img_norm_k", img_norm_k),
        ("txt_norm_q", txt_norm_q),
        ("txt_norm_k", txt_norm_k),
    )
    for name, w in norms:
        if w is not None and (w.shape != (head_dim,) or w.device != img_q.device):
            raise ValueError(f"{name} must be a [{head_dim}] tensor on {img_q.device}, got {tuple(w.shape)}")
    for name, t in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
        if t.dim() != 2 or t.shape != (s, head_dim) or t.stride(1) != 1 or t.device != img_q.device:
            raise ValueError(
                f"{name} must be [{s}, {head_dim}] (text + image tokens) on {img_q.device}, "
                f"contiguous in the last dim; got {tuple(t.shape)}"
            )
    if rope_sin.stride(0) != rope_cos.stride(0):
        raise ValueError("rope_cos and rope_sin must have the same row stride")
    return s_txt, s, head_dim


def _check_stream(name: str, t: torch.Tensor, ref: torch.Tensor, width: int) -> None:
    if t.dim() != 3:
        raise ValueError(f"{name} must be [batch, tokens, heads*head_dim], got shape {tuple(t.shape)}")
    if t.shape[0] != ref.shape[0] or t.shape[2] != width:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [{ref.shape[0]}, tokens, {width}]")
    if t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"{name} is {t.dtype} on {t.device}; expected {ref.dtype} on {ref.device} like img_q")
    if t.stride(2) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride {t.stride(2)})")
