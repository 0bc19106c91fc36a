"""FLOP counting, for the achieved TFLOP/s the bench reports (and the attention benchmark's)."""

from __future__ import annotations

import torch

from ..request import GenerationRequest
from .configs import PROMPT, SEED, Setting


def attention_flops(batch: int, heads: int, head_dim: int, tokens: int) -> int:
    """Matmul FLOPs of one non-causal attention: q·kᵀ and p·v, 2·S²·D each, per head.

    >>> attention_flops(1, 24, 128, 4608)  # one FLUX.1-dev attention at 1024² (4096 + 512 tokens)
    260919263232
    """
    return 4 * batch * heads * head_dim * tokens * tokens


def transformer_flops(transformer: torch.nn.Module, inputs: dict) -> dict[str, int]:
    """FLOPs of one transformer forward: 2·in·out per row for every linear layer, plus 4·S²·D per
    head for every attention, counted with forward hooks on one call (a meta-device model works).

    Returns ``{"linear", "attention", "total"}``. FLUX.1-dev at 1024² (4096 + 512 tokens): 59.5 and
    14.9 TFLOP, as in the design notes' cost model (README, "Fast path"; a test checks it).
    """
    from diffusers.models.transformers.transformer_flux import FluxAttention

    total = {"linear": 0, "attention": 0}

    def on_linear(module, args, _out):
        x = args[0]
        total["linear"] += 2 * x.numel() // x.shape[-1] * module.in_features * module.out_features

    def on_attention(module, args, kwargs, _out):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        extra = kwargs.get("encoder_hidden_states")
        tokens = hidden.shape[1] + (extra.shape[1] if extra is not None else 0)
        total["attention"] += attention_flops(hidden.shape[0], module.heads, module.head_dim, tokens)

    hooks = [m.register_forward_hook(on_linear) for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    hooks += [
        m.register_forward_hook(on_attention, with_kwargs=True)
        for m in transformer.modules()
        if isinstance(m, FluxAttention)
    ]
    try:
        # Eager (compiled blocks would trace anew for the hooks on their linear layers), and under its own
        # cache context (a transformer with step-cache hooks refuses a call outside one).
        with torch.inference_mode(), torch.compiler.set_stance("force_eager"), transformer.cache_context("flops"):
            transformer(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return {**total, "total": total["linear"] + total["attention"]}


def count_flops(pipe, setting: Setting) -> int:
    """FLOPs of one transformer forward of ``pipe`` at ``setting`` (all ranks together under context
    parallelism), counted on the uncompiled module with the bench's prompt."""
    req = GenerationRequest(PROMPT, setting.width, setting.height, seed=SEED, num_inference_steps=1)
    with torch.inference_mode():
        embeds, pooled, text_ids, _ = pipe.encode_prompt(req.prompt)
        noise = pipe.prepare_noise([SEED], setting.width, setting.height)
        img_ids = pipe.latent_image_ids(1, setting.width, setting.height)
    inputs = dict(
        hidden_states=noise,
        timestep=torch.full((1,), 0.5, device=pipe.device, dtype=pipe.dtype),
        guidance=torch.full((1,), 4.5, device=pipe.device),
        pooled_projections=pooled,
        encoder_hidden_states=embeds,
        txt_ids=text_ids,
        img_ids=img_ids,
        return_dict=False,
    )
    cp = pipe.context_parallel
    if cp is None:
        return transformer_flops(pipe.transformer, inputs)["total"]  # the module itself, never the compiled fn
    # Split: this rank's share (its tokens' linears, its heads' or queries' attention) times the ranks.
    return transformer_flops(pipe.transformer, cp.pad(inputs))["total"] * cp.degree
