"""Launchers for the Flux attention kernels: argument checks, buffers, grids and block sizes.

Callers pass the q/k/v projection outputs ``[B, S_stream, H*D]`` (column slices of a fused QKV
output are fine: only the last dim must be contiguous) of an image stream and, for double blocks, a
text stream; the result is ``[B, S_txt + S_img, H*D]``, text rows first, in the input dtype.
"""

from __future__ import annotations

import functools
import math
import os

import torch
import triton

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


# (BLOCK_M, BLOCK_N, num_warps, num_stages) tried by the autotuner for bf16/fp16 on a GPU. The first
# is the Triton flash-attention tutorial's Hopper choice for D=128; the rest trade tile size for
# occupancy. Which one wins at each Flux shape has not been measured yet (no GPU was lent when this
# was written): benchmarks/bench_attention.py records the winner (``tuned_configs``) next to the timings.
GPU_CANDIDATES = ((128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 4), (128, 32, 4, 3), (64, 64, 4, 3), (64, 128, 4, 3))


def _blocks(head_dim: int, fp8: bool) -> dict:
    """Fixed block sizes: the fp8 path (its key tile must equal the pre-pass's V-scale tile, so it is
    not autotuned) and the pre-pass.

    Under the interpreter every program is numpy work, so tiles are small (and odd lengths still
    cross tile edges).
    """
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, num_warps=1, num_stages=1)
    if head_dim <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    return dict(BLOCK_M=128, BLOCK_N=128 if fp8 else 64, num_warps=8, num_stages=3)


@functools.cache
def _tuned_attention(interpreted: bool):
    """``_attention_kernel`` under ``triton.autotune``, keyed on the sequence-length bucket and the head
    dim (never the exact length: a new image size must not re-benchmark on the request path), with the
    choices cached on disk by Triton so later processes skip the benchmark too.

    The interpreter gets one config (no benchmarking), so CPU tests run the same launch path.
    """
    if interpreted:
        configs = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    else:
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
                   for m, n, w, st in GPU_CANDIDATES]  # fmt: skip
    return triton.autotune(configs=configs, key=["S_BUCKET", "HEAD_DIM"], cache_results=True)(K._attention_kernel)


def tuned_configs() -> dict:
    """The autotuner's choice per key so far: ``{str(key): "BLOCK_M=…, BLOCK_N=…, warps, stages"}``."""
    tuner = _tuned_attention(interpreting())
    if len(tuner.configs) == 1:  # nothing to choose (interpreter): Triton keeps no cache then
        return {"any": str(tuner.configs[0])}
    return {str(key): str(cfg) for key, cfg in tuner.cache.items()}


def _check_stream(name: str, t: torch.Tensor, ref: torch.Tensor, width: int) -> None:
    if t.dim() != 3:
        raise ValueError(f"{name} must be [batch, tokens, heads*head_dim], got shape {tuple(t.shape)}")
    if t.shape[0] != ref.shape[0] or t.shape[2] != width:
        raise ValueError(f"{name} has shape {tuple(t.shape)}; expected [{ref.shape[0]}, tokens, {width}]")
    if t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(f"{name} is {t.dtype} on {t.device}; expected {ref.dtype} on {ref.device} like img_q")
    if t.stride(2) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride {t.stride(2)})")


def _stream_args(t: torch.Tensor, head_dim: int) -> list:
    return [t, t.stride(0), head_dim, t.stride(1)]


def _head_major_args(t: torch.Tensor, s_txt: int) -> list:
    """A head-major ``[B, H, S, D]`` buffer as the (text, image) stream pair the kernel expects.

    The image "stream" starts at row ``s_txt`` of the same buffer, so row r resolves to row r either way.
    """
    strides = [t.stride(0), t.stride(1), t.stride(2)]
    return [t, *strides, t[:, :, s_txt:], *strides]


def flux_attention(x: AttentionInputs, mode: str = "bf16", out: torch.Tensor | None = None) -> torch.Tensor:
    """Fused Flux attention: RMSNorm(q, k) → RoPE → concat(text, image) → softmax(q kᵀ/√d) v.

    ``mode="fp8"`` runs both matmuls in float8 e4m3 (CUDA sm ≥ 89, or the interpreter).
    ``out``: optional ``[B, S, H*D]`` contiguous result buffer (tests pass a NaN-poisoned one).

    >>> # out = flux_attention(AttentionInputs(q, k, v, attn.norm_q.weight, attn.norm_k.weight, cos, sin, 24))
    """
    # Long on purpose: the checks of 13 tensors, then the two launches; each step is a few lines.
    img_q, img_k, img_v, img_norm_q, img_norm_k, rope_cos, rope_sin, heads = x[:8]
    txt_q, txt_k, txt_v, txt_norm_q, txt_norm_k, eps = x[8:]
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
    fp8 = mode == "fp8"
    if fp8 and img_q.device.type == "cuda" and torch.cuda.get_device_capability(img_q.device) < (8, 9):
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
    for name, w in (
        ("img_norm_q", img_norm_q),
        ("img_norm_k", img_norm_k),
        ("txt_norm_q", txt_norm_q),
        ("txt_norm_k", txt_norm_k),
    ):
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

    batch = img_q.shape[0]
    cfg = _blocks(head_dim, fp8)
    tq, tk, tv = (txt_q, txt_k, txt_v) if has_txt else (img_q, img_k, img_v)  # unused when s_txt == 0
    wq_t, wk_t = (txt_norm_q, txt_norm_k) if has_txt else (img_norm_q, img_norm_k)
    qkv_streams = [
        *_stream_args(tq, head_dim),
        *_stream_args(img_q, head_dim),
        *_stream_args(tk, head_dim),
        *_stream_args(img_k, head_dim),
        *_stream_args(tv, head_dim),
        *_stream_args(img_v, head_dim),
    ]
    rope = [wq_t, wk_t, img_norm_q, img_norm_k, rope_cos, rope_sin, rope_cos.stride(0)]
    if out is None:
        out = torch.empty(batch, s, heads, head_dim, device=img_q.device, dtype=img_q.dtype)
    elif out.shape != (batch, s, width) or out.dtype != img_q.dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{batch}, {s}, {width}] {img_q.dtype} tensor")
    else:
        out = out.view(batch, s, heads, head_dim)
    out_args = [out, out.stride(0), out.stride(2), out.stride(1)]

    kv_dtype = torch.float8_e4m3fn if fp8 else img_q.dtype
    q = torch.empty(batch, heads, s, head_dim, device=img_q.device, dtype=kv_dtype)
    k = torch.empty_like(q)
    tile = cfg["BLOCK_N"]  # fp8: the V scale tile must equal the attention kernel's key tile
    n_tiles = triton.cdiv(s, tile)
    if fp8:
        v = torch.empty_like(q)
        qs = torch.empty(batch, heads, s, device=img_q.device, dtype=torch.float32)
        ks = torch.empty_like(qs)
        vs = torch.empty(batch, heads, n_tiles, device=img_q.device, dtype=torch.float32)
    else:
        v = qs = ks = vs = img_q.new_empty(1, dtype=torch.float32)
    K._prologue_kernel[(n_tiles, batch * heads)](
        *qkv_streams, *rope, q, k, v, qs, ks, vs, s_txt, s, heads, n_tiles, eps,
        HEAD_DIM=head_dim, BLOCK=tile, FP8=fp8, ROUND_FP8=interpreting(), num_warps=1 if interpreting() else 4,
    )  # fmt: skip
    v_args = _head_major_args(v, s_txt) if fp8 else qkv_streams[16:24]
    args = [*_head_major_args(q, s_txt), *_head_major_args(k, s_txt), *v_args, qs, ks, vs, *out_args, s_txt, s,
            seq_bucket(s), heads, n_tiles, LOG2E / math.sqrt(head_dim)]  # fmt: skip
    if fp8:  # fixed tiles: BLOCK_N is the V-scale tile the pre-pass used
        K._attention_kernel[(triton.cdiv(s, cfg["BLOCK_M"]), batch * heads)](
            *args, HEAD_DIM=head_dim, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], FP8=True,
            ROUND_FP8=interpreting(), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )  # fmt: skip
    else:
        tuned = _tuned_attention(interpreting())
        tuned[lambda meta: (triton.cdiv(s, meta["BLOCK_M"]), batch * heads)](
            *args, HEAD_DIM=head_dim, FP8=False, ROUND_FP8=False
        )
    return out.view(batch, s, width)
