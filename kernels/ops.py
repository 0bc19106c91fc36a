"""``torch.library`` registration of the Flux attention kernels.

As a custom op with a fake (meta) implementation, ``torch.compile(fullgraph=True)`` sees one opaque
node with a known output shape instead of tracing into Triton launch code. A custom op's schema takes
flat tensors, so here (and only here) the attention inputs are spelled out field by field, in the
order of ``srpo_infer.attention.AttentionInputs``; callers pass ``*inputs``.
"""

from __future__ import annotations

import torch

from . import launch


@torch.library.custom_op("srpo::flux_attention", mutates_args=())
def flux_attention(
    img_q: torch.Tensor,
    img_k: torch.Tensor,
    img_v: torch.Tensor,
    img_norm_q: torch.Tensor,
    img_norm_k: torch.Tensor,
    rope_cos: torch.Tensor,
    rope_sin: torch.Tensor,
    heads: int,
    txt_q: torch.Tensor | None = None,
    txt_k: torch.Tensor | None = None,
    txt_v: torch.Tensor | None = None,
    txt_norm_q: torch.Tensor | None = None,
    txt_norm_k: torch.Tensor | None = None,
    eps: float = 1e-6,
    mode: str = "native",
    design: str = "auto",
) -> torch.Tensor:
    """``srpo::flux_attention``: see :func:`srpo_infer.kernels.launch.flux_attention`."""
    x = (
        img_q,
        img_k,
        img_v,
        img_norm_q,
        img_norm_k,
        rope_cos,
        rope_sin,
        heads,
        txt_q,
        txt_k,
        txt_v,
        txt_norm_q,
        txt_norm_k,
        eps,
    )
    return launch.flux_attention(x, mode=mode, design=design)


@flux_attention.register_fake
def _(
    img_q,
    img_k,
    img_v,
    img_norm_q,
    img_norm_k,
    rope_cos,
    rope_sin,
    heads,
    txt_q=None,
    txt_k=None,
    txt_v=None,
    txt_norm_q=None,
    txt_norm_k=None,
    eps=1e-6,
    mode="native",
    design="auto",
):
    tokens = img_q.shape[1] + (txt_q.shape[1] if txt_q is not None else 0)
    return img_q.new_empty(img_q.shape[0], tokens, img_q.shape[2])
