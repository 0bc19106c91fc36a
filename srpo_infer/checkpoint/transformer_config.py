"""The transformer's configuration, read off its tensors' shapes."""

from __future__ import annotations

from .errors import CheckpointError
from .keys import block_count


def infer_transformer_config(shapes: dict[str, tuple[int, ...]], extra_config: dict | None = None) -> dict:
    """``FluxTransformer2DModel`` keyword arguments read off diffusers-named tensor shapes.

    ``axes_dims_rope`` is not stored in the weights: it comes from a ``config.json`` next to the
    checkpoint when there is one (``extra_config``), else from FLUX.1's rule (head_dim/8, 7/16, 7/16 of
    the head dim), which gives (16, 56, 56) for the real model.
    """
    need = [
        "x_embedder.weight",
        "context_embedder.weight",
        "transformer_blocks.0.attn.norm_q.weight",
        "time_text_embed.text_embedder.linear_1.weight",
        "proj_out.weight",
    ]
    missing = [k for k in need if k not in shapes]
    if missing:
        raise CheckpointError(f"not a complete Flux transformer checkpoint: missing {missing[:5]}")
    keys = list(shapes)
    inner, in_channels = shapes["x_embedder.weight"]
    head_dim = shapes["transformer_blocks.0.attn.norm_q.weight"][0]
    if inner % head_dim:
        raise CheckpointError(f"inner width {inner} is not a multiple of the head dim {head_dim}")
    config = dict(
        patch_size=1,
        in_channels=in_channels,
        out_channels=shapes["proj_out.weight"][0] if shapes["proj_out.weight"][0] != in_channels else None,
        num_layers=block_count(keys, "transformer_blocks."),
        num_single_layers=block_count(keys, "single_transformer_blocks."),
        attention_head_dim=head_dim,
        num_attention_heads=inner // head_dim,
        joint_attention_dim=shapes["context_embedder.weight"][1],
        pooled_projection_dim=shapes["time_text_embed.text_embedder.linear_1.weight"][1],
        guidance_embeds=any(k.startswith("time_text_embed.guidance_embedder.") for k in keys),
    )
    extra = extra_config or {}
    if "axes_dims_rope" in extra:
        axes = tuple(extra["axes_dims_rope"])
    else:
        axes = (head_dim // 8, head_dim * 7 // 16, head_dim * 7 // 16)
    if sum(axes) != head_dim or any(a % 2 for a in axes):
        raise CheckpointError(
            f"cannot infer the RoPE axes for head dim {head_dim} (got {axes}); put a config.json with "
            "'axes_dims_rope' next to the checkpoint"
        )
    config["axes_dims_rope"] = axes
    return config
