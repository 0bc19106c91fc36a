"""``full-random``: every FLUX.1-dev component at its real size, random weights, built on the GPU.

It lets the full benchmark run on a machine with no network and no weights: the cost of every
layer is real, only the numbers are not (so images are noise, and step caching behaves differently
than with trained weights). Tokenizers are the tiny byte-level ones; token ids stay in every vocab.
"""

from __future__ import annotations

import torch

FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,
    out_channels=None,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_DEV_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=1024,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
CLIP_L = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    projection_dim=768,
    hidden_act="quick_gelu",
)
T5_XXL = dict(
    vocab_size=32128,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
)


def _check_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise ValueError("model='full-random' builds ~17 B parameters on the GPU; it needs CUDA (use 'tiny-random')")


def build_full_random_transformer(device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """The FLUX.1-dev transformer with random weights; the same ``seed`` gives the same weights, so a
    benchmark can build a fresh copy per configuration instead of deep-copying 24 GB."""
    from diffusers import FluxTransformer2DModel

    _check_cuda(device)
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[device]), torch.device(device):
        torch.manual_seed(seed)
        torch.set_default_dtype(dtype)
        try:
            model = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
        finally:
            torch.set_default_dtype(previous)
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_full_random(device: torch.device, dtype: torch.dtype, seed: int = 0) -> dict:
    """All pipeline components at FLUX.1-dev size on ``device`` (CUDA only: ~17 B parameters)."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from .tiny import build_tiny_base

    _check_cuda(device)
    parts = build_tiny_base(seed)  # tokenizers and scheduler
    parts["transformer"] = build_full_random_transformer(device, dtype, seed)
    previous = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[device]), torch.device(device):
        torch.manual_seed(seed + 1)
        torch.set_default_dtype(dtype)
        try:
            clip_tok, t5_tok = parts["tokenizer"], parts["tokenizer_2"]
            parts["vae"] = AutoencoderKL(**FLUX_DEV_VAE)
            parts["text_encoder"] = CLIPTextModel(
                CLIPTextConfig(
                    **CLIP_L,
                    bos_token_id=clip_tok.bos_token_id,
                    eos_token_id=clip_tok.eos_token_id,
                    pad_token_id=clip_tok.pad_token_id,
                )
            )
            parts["text_encoder_2"] = T5EncoderModel(
                T5Config(**T5_XXL, pad_token_id=t5_tok.pad_token_id, eos_token_id=t5_tok.eos_token_id)
            )
        finally:
            torch.set_default_dtype(previous)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        parts[name] = parts[name].to(device=device, dtype=dtype).eval().requires_grad_(False)
    return parts
