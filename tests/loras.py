"""LoRA files for the tiny transformer, written by the tests in two key formats that encode the same
update: diffusers/PEFT names and kohya/sd-scripts names (BFL block names, fused qkv, ``alpha``)."""

from __future__ import annotations

import torch

# Random LoRA factors at this scale move the tiny model's output clearly, without blowing it up.
SCALE = 0.3


def lora_factors(width: int, blocks: int, rank: int, seed: int) -> dict:
    """Per double block: down [rank, width] shared by q/k/v (as kohya's fused qkv stores it), up
    matrices for q, k, v and the output projection (its own down)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * SCALE

    return {
        i: dict(
            down=rnd(rank, width),
            up_q=rnd(width, rank),
            up_k=rnd(width, rank),
            up_v=rnd(width, rank),
            proj_down=rnd(rank, width),
            proj_up=rnd(width, rank),
        )
        for i in range(blocks)
    }


def diffusers_lora(factors: dict) -> dict[str, torch.Tensor]:
    out = {}
    for i, f in factors.items():
        prefix = f"transformer.transformer_blocks.{i}.attn"
        for name, up in (("to_q", f["up_q"]), ("to_k", f["up_k"]), ("to_v", f["up_v"])):
            out[f"{prefix}.{name}.lora_A.weight"] = f["down"].clone()
            out[f"{prefix}.{name}.lora_B.weight"] = up.clone()
        out[f"{prefix}.to_out.0.lora_A.weight"] = f["proj_down"].clone()
        out[f"{prefix}.to_out.0.lora_B.weight"] = f["proj_up"].clone()
    return out


def kohya_lora(factors: dict) -> dict[str, torch.Tensor]:
    out = {}
    for i, f in factors.items():
        rank = f["down"].shape[0]
        qkv = f"lora_unet_double_blocks_{i}_img_attn_qkv"
        out[f"{qkv}.lora_down.weight"] = f["down"].clone()
        out[f"{qkv}.lora_up.weight"] = torch.cat([f["up_q"], f["up_k"], f["up_v"]])
        out[f"{qkv}.alpha"] = torch.tensor(float(rank))  # alpha = rank: scale 1, as the diffusers file
        proj = f"lora_unet_double_blocks_{i}_img_attn_proj"
        out[f"{proj}.lora_down.weight"] = f["proj_down"].clone()
        out[f"{proj}.lora_up.weight"] = f["proj_up"].clone()
        out[f"{proj}.alpha"] = torch.tensor(float(rank))
    return out
