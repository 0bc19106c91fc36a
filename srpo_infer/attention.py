"""The attention seam: one processor on every Flux attention module picks the backend once.

Backends: ``sdpa`` (the stock math: RMSNorm → concat → RoPE → ``scaled_dot_product_attention``),
``triton`` (our fused kernels in the model's dtype), ``triton-int8`` (q·kᵀ in INT8 with K smoothed,
p·v in the model's dtype: the accurate 8-bit mode) and ``triton-int8-fp8`` (INT8 q·kᵀ, e4m3 p·v: the
fast one). Blocks never branch on the backend; :func:`set_attention_backend` swaps the processor, and
:func:`attend` runs any backend on one set of inputs.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .config import ATTENTION_BACKENDS, RING_BACKENDS

BACKENDS = ATTENTION_BACKENDS
# The one place a backend name becomes a kernel mode (srpo_infer.kernels.configs.MODES, which says what
# GPU each mode needs).
KERNEL_MODES = {"triton": "native", "triton-int8": "int8", "triton-int8-fp8": "int8-fp8"}


def supports_ring(backend: str) -> bool:
    """Whether ``backend`` can run ring attention across processes: it must return the log-sum-exp,
    which only the reference path does (our kernels return none).

    >>> supports_ring("sdpa"), supports_ring("triton")
    (True, False)
    """
    return backend in RING_BACKENDS


def kernel_bucket(tokens: int) -> int:
    """The kernels' autotuning key for a sequence of ``tokens`` (one tuning serves a whole bucket)."""
    from .kernels.launch import seq_bucket

    return seq_bucket(tokens)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Flux RoPE on ``[B, S, H, D]``: channel pairs (2i, 2i+1) rotate by the angle in cos/sin ``[S, D]``."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack([-x2, x1], dim=-1).flatten(-2)
    return (x.float() * cos[None, :, None, :] + rotated.float() * sin[None, :, None, :]).to(x.dtype)


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight.to(x.dtype)


class AttentionInputs(NamedTuple):
    """What every attention implementation takes (the reference, the prologue, the Triton launcher,
    the custom op): the q/k/v projection outputs ``[B, S_stream, H*D]`` of the image stream and, for
    double blocks, the text stream; the q/k RMSNorm weights ``[D]``; the rotary tables ``[S_txt +
    S_img, D]``; the head count and the norm's eps. A NamedTuple, so ``*inputs`` is the op's argument
    order and torch.compile traces it without a break."""

    img_q: torch.Tensor
    img_k: torch.Tensor
    img_v: torch.Tensor
    img_norm_q: torch.Tensor
    img_norm_k: torch.Tensor
    rope_cos: torch.Tensor
    rope_sin: torch.Tensor
    heads: int
    txt_q: torch.Tensor | None = None
    txt_k: torch.Tensor | None = None
    txt_v: torch.Tensor | None = None
    txt_norm_q: torch.Tensor | None = None
    txt_norm_k: torch.Tensor | None = None
    eps: float = 1e-6

    def to(self, dtype: torch.dtype) -> AttentionInputs:
        """The same inputs with every tensor cast (float64 for an exact reference)."""
        return AttentionInputs(*(t.to(dtype) if isinstance(t, torch.Tensor) else t for t in self))


def attention_prologue(x: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stock prologue: q/k RMSNorm, text + image concat, RoPE; returns q, k, v as ``[B, H, S, D]``."""

    def heads_of(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (x.heads, -1))

    q = _rms(heads_of(x.img_q), x.img_norm_q, x.eps)
    k = _rms(heads_of(x.img_k), x.img_norm_k, x.eps)
    v = heads_of(x.img_v)
    if x.txt_q is not None:
        q = torch.cat([_rms(heads_of(x.txt_q), x.txt_norm_q, x.eps), q], dim=1)
        k = torch.cat([_rms(heads_of(x.txt_k), x.txt_norm_k, x.eps), k], dim=1)
        v = torch.cat([heads_of(x.txt_v), v], dim=1)
    cos = x.rope_cos.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    sin = x.rope_sin.to(cos.dtype)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    return tuple(t.transpose(1, 2) for t in (q, k, v))


def flux_attention_reference(x: AttentionInputs, sdpa_backend=None) -> torch.Tensor:
    """The unfused math, in the inputs' dtype (``x.to(torch.float64)`` for an exact reference), as
    ``[B, S_txt + S_img, H*D]``. ``sdpa_backend`` pins a ``torch.nn.attention.SDPBackend``."""
    q, k, v = attention_prologue(x)
    if sdpa_backend is None:
        out = F.scaled_dot_product_attention(q, k, v)
    else:
        from torch.nn.attention import sdpa_kernel

        with sdpa_kernel(sdpa_backend):
            out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).flatten(2)


def random_attention_inputs(
    batch: int,
    heads: int,
    head_dim: int,
    s_txt: int,
    s_img: int,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    seed: int = 0,
    fused_qkv: bool = False,
) -> AttentionInputs:
    """:class:`AttentionInputs` with random data, for tests and benchmarks.

    Norm weights are in [0.5, 1.5), RoPE angles uniform. ``fused_qkv`` makes q/k/v column slices of
    one projection output, as after ``fuse_qkv_projections`` (strided rows, no copy).

    >>> x = random_attention_inputs(1, 2, 32, 3, 5, torch.float32)
    >>> flux_attention_reference(x).shape
    torch.Size([1, 8, 64])
    """
    g = torch.Generator().manual_seed(seed)
    width = heads * head_dim

    def stream(tokens: int) -> list[torch.Tensor]:
        if fused_qkv:
            qkv = torch.randn(batch, tokens, 3 * width, generator=g).to(device=device, dtype=dtype)
            return list(qkv.chunk(3, dim=-1))
        return [torch.randn(batch, tokens, width, generator=g).to(device=device, dtype=dtype) for _ in range(3)]

    def norm_weight() -> torch.Tensor:
        return (torch.rand(head_dim, generator=g) + 0.5).to(device=device, dtype=dtype)

    iq, ik, iv = stream(s_img)
    angles = torch.rand(s_txt + s_img, head_dim // 2, generator=g) * 6.3
    x = AttentionInputs(
        img_q=iq,
        img_k=ik,
        img_v=iv,
        img_norm_q=norm_weight(),
        img_norm_k=norm_weight(),
        rope_cos=angles.cos().repeat_interleave(2, -1).to(device),
        rope_sin=angles.sin().repeat_interleave(2, -1).to(device),
        heads=heads,
    )
    if s_txt:
        tq, tk, tv = stream(s_txt)
        x = x._replace(txt_q=tq, txt_k=tk, txt_v=tv, txt_norm_q=norm_weight(), txt_norm_k=norm_weight())
    return x


class FluxAttentionProcessor:
    """Attention processor for diffusers' ``FluxAttention`` (double and single blocks, fused or unfused
    QKV) that runs the chosen backend.

    >>> # set_attention_backend(pipe.transformer, "triton")
    """

    def __init__(self, backend: str = "sdpa", design: str = "auto"):
        if backend not in BACKENDS:
            raise ValueError(f"attention backend must be one of {list(BACKENDS)}, got {backend!r}")
        self.backend, self.design = backend, design
        # diffusers' enable_parallelism fills this on processors that have it; then this process holds a
        # slice of the tokens and attention runs across processes through `split`, which
        # srpo_infer.context_parallel installs (it sits above this module: no import back).
        self._parallel_config = None
        self.split = None

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
        token_counts=None,
        rope=None,
        key_padding=None,
    ):
        """Context parallelism passes ``token_counts`` (the image's real text and image tokens), ``rope``
        (the whole sequence's rotary tables) and, when it padded the streams, ``key_padding``
        (``[S_local]``, true for this rank's padding tokens); see :mod:`srpo_infer.context_parallel`."""
        q, k, v, eq, ek, ev = _projections(attn, hidden_states, encoder_hidden_states)
        if image_rotary_emb is None:
            raise ValueError("Flux attention needs image_rotary_emb (cos, sin)")
        if attention_mask is not None:  # never passed by Flux text-to-image; the kernels take no mask
            raise ValueError("attention masks are not supported by the srpo_infer attention processor")
        cos, sin = image_rotary_emb
        text = eq is not None
        x = AttentionInputs(
            q,
            k,
            v,
            attn.norm_q.weight,
            attn.norm_k.weight,
            cos,
            sin,
            attn.heads,
            eq,
            ek,
            ev,
            attn.norm_added_q.weight if text else None,
            attn.norm_added_k.weight if text else None,
            attn.norm_q.eps if attn.norm_q.eps is not None else torch.finfo(q.dtype).eps,
        )
        if self._parallel_config is not None:
            if self.split is None:
                raise ValueError(
                    "this processor was split by diffusers' enable_parallelism directly: split images "
                    "with load_pipeline(..., context_parallel=N)"
                )
            out = self.split(x, self._parallel_config, self.backend, token_counts, rope, key_padding, self.design)
        else:
            out = attend(x, self.backend, self.design)
        if eq is not None:
            txt_out, img_out = out.split_with_sizes([eq.shape[1], out.shape[1] - eq.shape[1]], dim=1)
            img_out = attn.to_out[1](attn.to_out[0](img_out.contiguous()))
            return img_out, attn.to_add_out(txt_out.contiguous())
        return out


def attend(inputs: AttentionInputs, backend: str = "sdpa", design: str = "auto") -> torch.Tensor:
    """One Flux attention call through ``backend`` (:data:`BACKENDS`): ``[B, S_txt + S_img, H*D]``.
    ``design``: how our kernels load tiles (``pointer``, ``tma``; ``auto``: the launcher's default).

    The seam every caller shares (the processor, the benchmarks, the tests, research code), so a
    backend is compared with another on exactly the same inputs.

    >>> x = random_attention_inputs(1, 2, 32, 3, 5, torch.float32)
    >>> attend(x, "sdpa").shape
    torch.Size([1, 8, 64])
    """
    if backend == "sdpa":
        return flux_attention_reference(inputs)
    if backend not in KERNEL_MODES:
        raise ValueError(f"attention backend must be one of {list(BACKENDS)}, got {backend!r}")
    import srpo_infer.kernels.ops  # noqa: F401  (registers torch.ops.srpo.flux_attention)

    return torch.ops.srpo.flux_attention(*inputs, mode=KERNEL_MODES[backend], design=design)


def _projections(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None):
    """q, k, v of the image stream and (or ``None``s) of the text stream, from the three projections
    or the fused one (a column slice each: the kernels read them strided, without a copy)."""
    fused = getattr(attn, "fused_projections", False)
    if fused:
        q, k, v = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    if encoder_hidden_states is None or attn.added_kv_proj_dim is None:
        return q, k, v, None, None, None
    if fused:
        return q, k, v, *attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
    e = encoder_hidden_states
    return q, k, v, attn.add_q_proj(e), attn.add_k_proj(e), attn.add_v_proj(e)


def check_backend_available(backend: str, device: torch.device, design: str = "auto") -> None:
    """Raise a clear error when ``backend`` (with kernel ``design``) cannot run on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"attention must be one of {['auto', *BACKENDS]}, got {backend!r}")
    if backend == "sdpa":
        return
    check_triton()
    from srpo_infer.kernels.configs import MODES, interpreting, ws_refusal

    if design == "ws" and (refusal := ws_refusal(device)):
        raise ValueError(refusal)

    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"attention={backend!r} needs a CUDA GPU (the Triton kernels run on CPU only under "
            "TRITON_INTERPRET=1, for testing); use attention='sdpa'"
        )
    need = MODES[KERNEL_MODES[backend]].min_capability  # the one definition of what each mode needs
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < need:
        what, instead = ("fp8 tensor cores", "triton-int8") if MODES[KERNEL_MODES[backend]].pv_fp8 else ("", "sdpa")
        raise ValueError(
            f"attention={backend!r} needs {what or 'a GPU'} of compute capability >= "
            f"{need[0]}.{need[1]}; use attention={instead!r}"
        )


def check_heads_fit(backend: str, transformer: torch.nn.Module) -> None:
    """Raise a clear error when our kernels cannot run ``transformer``'s attention heads (checked before
    any optimization changes the model; ``sdpa`` runs any head size)."""
    if backend == "sdpa":
        return
    from srpo_infer.kernels.launch import HEAD_DIMS

    head_dim = transformer.config.attention_head_dim
    if head_dim not in HEAD_DIMS:
        raise ValueError(
            f"attention={backend!r} runs heads of {', '.join(map(str, HEAD_DIMS))} dims; this transformer's "
            f"attention_head_dim is {head_dim}: use attention='sdpa'"
        )


MIN_TRITON = (3, 4)  # host tensor descriptors (triton.tools.tensor_descriptor) for the tma design


def check_triton(version: str | None = None) -> None:
    """Raise a clear error when Triton is missing or older than :data:`MIN_TRITON` (``version``: for tests)."""
    if version is None:
        try:
            import triton
        except ImportError as exc:
            raise ValueError(
                "the Triton attention backends need the 'triton' package; pip install 'srpo-infer[triton]' "
                "or use attention='sdpa'"
            ) from exc
        version = triton.__version__
    found = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if found < MIN_TRITON:
        want = ".".join(map(str, MIN_TRITON))
        raise ValueError(
            f"the Triton attention backends need triton >= {want}, found {version}; "
            "upgrade triton (and torch) or use attention='sdpa'"
        )


def set_attention_backend(transformer: torch.nn.Module, backend: str, design: str = "auto") -> None:
    """Install one :class:`FluxAttentionProcessor` for ``backend`` (and kernel ``design``) on every
    attention module."""
    if backend != "sdpa":
        import srpo_infer.kernels.ops  # noqa: F401  (registers torch.ops.srpo.flux_attention)
    transformer.set_attn_processor(FluxAttentionProcessor(backend, design))
