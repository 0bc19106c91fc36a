"""Key formats: which one a checkpoint uses (diffusers or BFL names), and the renaming of BFL tensors
into diffusers tensors."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from .errors import CheckpointError

BFL_PREFIX = "model.diffusion_model."


def detect_format(keys: list[str]) -> str:
    """``"diffusers"`` (``transformer_blocks.N.attn.to_q…``) or ``"bfl"`` (``double_blocks.N.img_attn…``)."""
    stripped = [k.removeprefix(BFL_PREFIX) for k in keys]
    if any(k.startswith("double_blocks.") for k in stripped):
        return "bfl"
    if any(k.startswith("transformer_blocks.") for k in keys):
        return "diffusers"
    raise CheckpointError(
        "not a Flux transformer checkpoint: found neither 'transformer_blocks.*' (diffusers names) nor "
        f"'double_blocks.*' (BFL names); first keys: {sorted(keys)[:5]}"
    )


def block_count(keys: list[str], prefix: str) -> int:
    ids = {int(m.group(1)) for k in keys if (m := re.match(rf"{re.escape(prefix)}(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def bfl_to_diffusers_names(shapes: dict[str, tuple[int, ...]]) -> dict[str, list[tuple[str, int, int, bool]]]:
    """The plan that turns BFL tensors into diffusers tensors, without touching any data.

    Returns ``{bfl_name: [(diffusers_name, dim0_start, dim0_stop, swap_halves), ...]}``: each diffusers
    tensor is a row slice of one BFL tensor (fused QKV and linear1 are split along dim 0), and the final
    modulation has its shift/scale halves swapped. The mapping is the one of diffusers'
    ``convert_flux_transformer_checkpoint_to_diffusers``; that function hard-codes the FLUX.1 width
    (3072), so it cannot convert other widths such as the tiny test model. A test checks that this
    plan gives identical tensors to diffusers' converter on a full-width checkpoint.
    """
    keys = list(shapes)
    plan: dict[str, list[tuple[str, int, int, bool]]] = {}

    def whole(src: str, dst: str, swap: bool = False) -> None:
        plan.setdefault(src, []).append((dst, 0, shapes[src][0] if src in shapes else 0, swap))

    def split(src: str, dsts: list[str], sizes: list[int]) -> None:
        start = 0
        for dst, n in zip(dsts, sizes, strict=True):
            plan.setdefault(src, []).append((dst, start, start + n, False))
            start += n

    for i, o in (("in_layer", "linear_1"), ("out_layer", "linear_2")):
        for p in ("weight", "bias"):
            whole(f"time_in.{i}.{p}", f"time_text_embed.timestep_embedder.{o}.{p}")
            whole(f"vector_in.{i}.{p}", f"time_text_embed.text_embedder.{o}.{p}")
            if any(k.startswith("guidance_in.") for k in keys):
                whole(f"guidance_in.{i}.{p}", f"time_text_embed.guidance_embedder.{o}.{p}")
    for p in ("weight", "bias"):
        whole(f"txt_in.{p}", f"context_embedder.{p}")
        whole(f"img_in.{p}", f"x_embedder.{p}")
        whole(f"final_layer.linear.{p}", f"proj_out.{p}")
        whole(f"final_layer.adaLN_modulation.1.{p}", f"norm_out.linear.{p}", swap=True)

    for n in range(block_count(keys, "double_blocks.")):
        s, d = f"double_blocks.{n}.", f"transformer_blocks.{n}."
        for p in ("weight", "bias"):
            whole(f"{s}img_mod.lin.{p}", f"{d}norm1.linear.{p}")
            whole(f"{s}txt_mod.lin.{p}", f"{d}norm1_context.linear.{p}")
            rows = shapes.get(f"{s}img_attn.qkv.{p}", (0,))[0] // 3
            split(f"{s}img_attn.qkv.{p}", [f"{d}attn.to_{x}.{p}" for x in "qkv"], [rows] * 3)
            rows = shapes.get(f"{s}txt_attn.qkv.{p}", (0,))[0] // 3
            split(f"{s}txt_attn.qkv.{p}", [f"{d}attn.add_{x}_proj.{p}" for x in "qkv"], [rows] * 3)
            whole(f"{s}img_mlp.0.{p}", f"{d}ff.net.0.proj.{p}")
            whole(f"{s}img_mlp.2.{p}", f"{d}ff.net.2.{p}")
            whole(f"{s}txt_mlp.0.{p}", f"{d}ff_context.net.0.proj.{p}")
            whole(f"{s}txt_mlp.2.{p}", f"{d}ff_context.net.2.{p}")
            whole(f"{s}img_attn.proj.{p}", f"{d}attn.to_out.0.{p}")
            whole(f"{s}txt_attn.proj.{p}", f"{d}attn.to_add_out.{p}")
        whole(f"{s}img_attn.norm.query_norm.scale", f"{d}attn.norm_q.weight")
        whole(f"{s}img_attn.norm.key_norm.scale", f"{d}attn.norm_k.weight")
        whole(f"{s}txt_attn.norm.query_norm.scale", f"{d}attn.norm_added_q.weight")
        whole(f"{s}txt_attn.norm.key_norm.scale", f"{d}attn.norm_added_k.weight")

    for n in range(block_count(keys, "single_blocks.")):
        s, d = f"single_blocks.{n}.", f"single_transformer_blocks.{n}."
        # linear1 = [q; k; v; mlp] with width d = linear2's output rows and mlp = the rest.
        width = shapes.get(f"{s}linear2.weight", (0,))[0]
        for p in ("weight", "bias"):
            whole(f"{s}modulation.lin.{p}", f"{d}norm.linear.{p}")
            total = shapes.get(f"{s}linear1.{p}", (0,))[0]
            split(
                f"{s}linear1.{p}",
                [f"{d}attn.to_q.{p}", f"{d}attn.to_k.{p}", f"{d}attn.to_v.{p}", f"{d}proj_mlp.{p}"],
                [width, width, width, total - 3 * width],
            )
            whole(f"{s}linear2.{p}", f"{d}proj_out.{p}")
        whole(f"{s}norm.query_norm.scale", f"{d}attn.norm_q.weight")
        whole(f"{s}norm.key_norm.scale", f"{d}attn.norm_k.weight")
    return plan


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def apply_plan(entries: list[tuple[str, int, int, bool]], tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    for dst, a, b, swap in entries:
        # Row slices of a contiguous tensor are contiguous views: no copy of the fused QKV weights.
        part = tensor[a:b] if tensor.ndim and (a, b) != (0, tensor.shape[0]) else tensor
        yield dst, _swap_halves(part) if swap else part


def convert_bfl_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL-named Flux tensors (optionally ``model.diffusion_model.``-prefixed) → diffusers names.

    >>> convert_bfl_state_dict({"img_in.weight": torch.zeros(4, 2)})["x_embedder.weight"].shape
    torch.Size([4, 2])
    """
    state = {k.removeprefix(BFL_PREFIX): v for k, v in state.items()}
    plan = bfl_to_diffusers_names({k: tuple(v.shape) for k, v in state.items()})
    return {dst: t for src, entries in plan.items() if src in state for dst, t in apply_plan(entries, state[src])}
