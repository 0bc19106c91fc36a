"""Launchers for the Flux attention kernels: argument checks, buffers, grids and block sizes.

Callers pass the q/k/v projection outputs ``[B, S_stream, H*D]`` (column slices of a fused QKV
output are fine: only the last dim must be contiguous) of an image stream and, for double blocks, a
text stream; the result is ``[B, S_txt + S_img, H*D]``, text rows first, in the input dtype.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple

import torch
import triton
from triton.tools.tensor_descriptor import TensorDescriptor

from srpo_infer.attention import AttentionInputs

from . import flux_attention as K

LOG2E = 1.4426950408889634
HEAD_DIMS = (32, 64, 128)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MODES = ("bf16", "fp8")


def seq_bucket(s: int) -> int:
    """The autotuner's key for a sequence length: the next power of two. Flux's 1089 valid sizes
    (1536–9728 tokens with the text) fall in 4 buckets, so warming up one size per bucket means no
    request ever pays an autotuning benchmark.

    >>> [seq_bucket(s) for s in (1536, 2048, 2049, 4608, 9728)]
    [2048, 2048, 4096, 8192, 16384]
    """
    return 1 << max(0, s - 1).bit_length()


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


DESIGNS = ("pointer", "tma")
# What ``design="auto"`` runs (``SRPO_ATTENTION_DESIGN`` overrides it, e.g. to time the pipeline with
# "tma"). "tma" (tensor-descriptor loads, Hopper's TMA) is the design written for sm90, but it has only
# run under the interpreter so far: no GPU was lent when it was written. It becomes the default on
# sm >= 90 once benchmarks/bench_attention.py --sweep has timed it there.
DEFAULT_DESIGN = "pointer"
DESIGN_ENV = "SRPO_ATTENTION_DESIGN"


class KernelConfig(NamedTuple):
    """One launch configuration of ``_attention_kernel`` (the unit the sweep times)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    warp_specialize: bool = False


# Tried by the autotuner on a GPU. On the H200 (2026-11-26, benchmarks/results/h200-2026-11-26/
# attention.json) the autotuner picked 128x128, 8 warps, 3 stages for the pre-pass design at 3392 and
# 4608 tokens, so that comes first; the Triton tutorial keeps 8 warps on sm90 only for 128x128 tiles,
# so the smaller tiles run with 4. fp8 prefers wide key tiles (its MMA's K step is 32). Which one
# wins for the padded-buffer kernel is not measured yet: the benchmark records the autotuner's choice
# (``tuned_configs``) and ``--sweep`` times every one of them side by side.
BF16_CANDIDATES = (
    KernelConfig(128, 128, 8, 3), KernelConfig(128, 128, 8, 4), KernelConfig(128, 64, 4, 3),
    KernelConfig(128, 64, 4, 4), KernelConfig(64, 128, 4, 3), KernelConfig(64, 64, 4, 3),
)  # fmt: skip
FP8_CANDIDATES = (
    KernelConfig(128, 128, 8, 3), KernelConfig(128, 128, 8, 4), KernelConfig(128, 64, 4, 3),
    KernelConfig(64, 128, 4, 3),
)  # fmt: skip
# Under the interpreter every program is numpy work: small tiles (odd lengths still cross tile edges).
INTERPRETER_CONFIG = KernelConfig(16, 16, 1, 1)
PROLOGUE_ROWS = 64  # rows per pre-pass program on a GPU (memory-bound: any divisor of the padding)


def candidates(fp8: bool) -> tuple[KernelConfig, ...]:
    """The autotuner's configurations for this mode (one under the interpreter)."""
    if interpreting():
        return (INTERPRETER_CONFIG,)
    return FP8_CANDIDATES if fp8 else BF16_CANDIDATES


def padding(configs) -> int:
    """Rows the pre-pass pads each head to a multiple of: every tile of every configuration then lies
    inside the buffers, so the attention loop loads without masks. Block sizes are powers of two, so the
    largest is a multiple of all."""
    return max(max(c.block_m, c.block_n) for c in configs)


def _tiles(block_m: int, block_n: int, head_dim: int, fp8: bool) -> tuple[list, list, list]:
    """The q, k and v tile shapes of a TMA load (fp8 v is stored transposed)."""
    return [block_m, head_dim], [block_n, head_dim], [head_dim, block_n] if fp8 else [block_n, head_dim]


def _set_block_shapes(nargs: dict) -> None:
    """Autotuner pre-hook: a config's tile sizes into the TMA descriptors."""
    if nargs["TMA"]:
        tiles = _tiles(nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["HEAD_DIM"], nargs["FP8"])
        for name, tile in zip("qkv", tiles, strict=True):
            nargs[name].block_shape = tile


_TUNERS: dict[tuple, object] = {}


def _tuned_attention(fp8: bool, tma: bool):
    """``_attention_kernel`` under ``triton.autotune``, keyed on the sequence-length bucket and the head
    dim (never the exact length: a new image size must not re-benchmark on the request path), with the
    choices cached on disk by Triton so later processes skip the benchmark too. One tuner per
    (mode, design, interpreter)."""
    key = (fp8, tma, interpreting())
    if key not in _TUNERS:
        configs = [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n, "WARP_SPECIALIZE": c.warp_specialize},
                                 num_warps=c.num_warps, num_stages=c.num_stages, pre_hook=_set_block_shapes)
                   for c in candidates(fp8)]  # fmt: skip
        _TUNERS[key] = triton.autotune(configs=configs, key=["S_BUCKET", "HEAD_DIM"], cache_results=True)(
            K._attention_kernel
        )
    return _TUNERS[key]


def tuned_configs() -> dict:
    """The autotuners' choices so far: ``{"bf16/pointer (4096, 128)": "BLOCK_M: 128, …"}``."""
    chosen = {}
    for (fp8, tma, _), tuner in _TUNERS.items():
        name = f"{'fp8' if fp8 else 'bf16'}/{'tma' if tma else 'pointer'}"
        if len(tuner.configs) == 1:  # nothing to choose (interpreter): Triton keeps no cache then
            chosen[f"{name} any"] = str(tuner.configs[0])
        chosen.update({f"{name} {key}": str(cfg) for key, cfg in tuner.cache.items()})
    return chosen


def resolve_design(design: str, device: torch.device) -> str:
    """``auto`` → ``$SRPO_ATTENTION_DESIGN`` or :data:`DEFAULT_DESIGN`; ``tma`` needs host tensor
    descriptors (sm >= 90, or the interpreter)."""
    if design not in ("auto", *DESIGNS):
        raise ValueError(f"design must be one of {('auto', *DESIGNS)}, got {design!r}")
    if design == "auto":
        design = os.environ.get(DESIGN_ENV) or DEFAULT_DESIGN
        if design not in DESIGNS:
            raise ValueError(f"{DESIGN_ENV} must be one of {DESIGNS}, got {design!r}")
    if design == "tma" and device.type == "cuda" and torch.cuda.get_device_capability(device) < (9, 0):
        raise ValueError("design='tma' needs tensor memory accelerators (sm >= 90); use design='pointer'")
    return design


def _check_stream(name: str, t: torch.Tensor, ref: torch.Tensor, width: int) -> None:
    if t.dim() != 3:
        raise ValueError(f"{name} must be [batch, tokens, heads*head_dim], got shape {tuple(t.shape)}")
    if t.shape[0] != ref.shape[0] or t.shape[2] != width:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [{ref.shape[0]}, tokens, {width}]")
    if t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"{name} is {t.dtype} on {t.device}; expected {ref.dtype} on {ref.device} like img_q")
    if t.stride(2) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride {t.stride(2)})")


def flux_attention(
    x: AttentionInputs,
    mode: str = "bf16",
    out: torch.Tensor | None = None,
    design: str = "auto",
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """Fused Flux attention: RMSNorm(q, k) → RoPE → concat(text, image) → softmax(q kᵀ/√d) v.

    ``mode="fp8"`` runs both matmuls in float8 e4m3 (CUDA sm ≥ 89, or the interpreter).
    ``out``: optional ``[B, S, H*D]`` contiguous result buffer (tests pass a NaN-poisoned one).
    ``design``: how the attention loop loads tiles (``pointer``, ``tma``; ``auto`` = :data:`DEFAULT_DESIGN`).
    ``config``: run this :class:`KernelConfig` instead of the autotuner's choice (benchmark sweeps, tests).

    >>> # out = flux_attention(AttentionInputs(q, k, v, attn.norm_q.weight, attn.norm_k.weight, cos, sin, 24))
    """
    s_txt, s, head_dim = _check_inputs(x, mode)
    img_q, img_k, img_v, img_norm_q, img_norm_k, rope_cos, rope_sin, heads = x[:8]
    txt_q, txt_k, txt_v, txt_norm_q, txt_norm_k, eps = x[8:]
    fp8 = mode == "fp8"
    tma = resolve_design(design, img_q.device) == "tma"
    batch, width, dev = img_q.shape[0], img_q.shape[2], img_q.device
    if out is None:
        out = torch.empty(batch, s, heads, head_dim, device=dev, dtype=img_q.dtype)
    elif out.shape != (batch, s, width) or out.dtype != img_q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{batch}, {s}, {width}] {img_q.dtype} tensor")
    else:
        out = out.view(batch, s, heads, head_dim)
    if config is not None and not isinstance(config, KernelConfig):
        raise ValueError(f"config must be a KernelConfig, got {config!r}")

    # 1. Pre-pass: normalised, rotated q and k and the values, head-major and padded (fp8: quantised).
    pad = padding([config] if config else candidates(fp8))
    s_pad = triton.cdiv(s, pad) * pad
    bh = batch * heads
    has_txt = txt_q is not None
    tq, tk, tv = (txt_q, txt_k, txt_v) if has_txt else (img_q, img_k, img_v)  # unused when s_txt == 0
    wq_t, wk_t = (txt_norm_q, txt_norm_k) if has_txt else (img_norm_q, img_norm_k)
    streams = [a for t in (tq, img_q, tk, img_k, tv, img_v) for a in (t, t.stride(0), head_dim, t.stride(1))]
    rope = [wq_t, wk_t, img_norm_q, img_norm_k, rope_cos, rope_sin, rope_cos.stride(0)]
    rows = min(pad, INTERPRETER_CONFIG.block_m if interpreting() else PROLOGUE_ROWS)
    prologue_warps = 1 if interpreting() else 4
    buf_dtype = torch.float8_e4m3fn if fp8 else img_q.dtype
    q = torch.empty(bh * s_pad, head_dim, device=dev, dtype=buf_dtype)
    k = torch.empty_like(q)
    if fp8:
        v = torch.empty(bh * head_dim, s_pad, device=dev, dtype=buf_dtype)  # transposed: K-major for p·v
        qs = torch.empty(bh * s_pad, device=dev, dtype=torch.float32)
        ks = torch.empty_like(qs)
        vs = torch.zeros(bh, head_dim, device=dev, dtype=torch.float32)  # per (head, channel) max |v|
        K._value_amax_kernel[(s_pad // rows, bh)](
            *streams[16:], vs, s_txt, s, heads, HEAD_DIM=head_dim, BLOCK=rows, num_warps=prologue_warps
        )
    else:
        v = torch.empty_like(q)
        qs = ks = vs = q.new_empty(1, dtype=torch.float32)
    K._prologue_kernel[(s_pad // rows, bh)](
        *streams, *rope, q, k, v, qs, ks, vs, s_txt, s, s_pad, heads, eps,
        HEAD_DIM=head_dim, BLOCK=rows, FP8=fp8, ROUND_FP8=interpreting(), num_warps=prologue_warps,
    )  # fmt: skip

    # 2. Attention over the padded buffers; TMA descriptors get their tile shapes from the config.
    if tma:
        first = config or candidates(fp8)[0]  # the autotuner's pre-hook resets the tiles per config
        tiles = _tiles(first.block_m, first.block_n, head_dim, fp8)
        q, k, v = (TensorDescriptor.from_tensor(t, tile) for t, tile in zip((q, k, v), tiles, strict=True))
    args = [q, k, v, qs, ks, vs, out, out.stride(0), out.stride(2), out.stride(1),
            s, s_pad, seq_bucket(s), heads, LOG2E / math.sqrt(head_dim)]  # fmt: skip
    meta = dict(HEAD_DIM=head_dim, FP8=fp8, ROUND_FP8=interpreting(), TMA=tma)
    if config is None:
        _tuned_attention(fp8, tma)[lambda m: (triton.cdiv(s, m["BLOCK_M"]), bh)](*args, **meta)
    else:
        K._attention_kernel[(triton.cdiv(s, config.block_m), bh)](
            *args, **meta, BLOCK_M=config.block_m, BLOCK_N=config.block_n, WARP_SPECIALIZE=config.warp_specialize,
            num_warps=config.num_warps, num_stages=config.num_stages,
        )  # fmt: skip
    return out.view(batch, s, width)


def _check_inputs(x: AttentionInputs, mode: str) -> tuple[int, int, int]:
    """Every argument check, before anything is allocated or launched: ``(s_txt, s, head_dim)``."""
    img_q, img_k, img_v, img_norm_q, img_norm_k, rope_cos, rope_sin, heads = x[:8]
    txt_q, txt_k, txt_v, txt_norm_q, txt_norm_k, _ = x[8:]
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
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
    if img_q.device.type != "cuda" and not interpreting():
        raise ValueError(f"tensors are on {img_q.device}; the Triton kernels need CUDA (or TRITON_INTERPRET=1)")
    if mode == "fp8" and img_q.device.type == "cuda" and torch.cuda.get_device_capability(img_q.device) < (8, 9):
        raise ValueError("mode='fp8' needs a GPU with fp8 tensor cores (sm >= 89); use mode='bf16'")
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
    norms = (("img_norm_q", img_norm_q), ("img_norm_k", img_norm_k), ("txt_norm_q", txt_norm_q),
             ("txt_norm_k", txt_norm_k))  # fmt: skip
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
