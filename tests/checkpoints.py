"""Writing Flux checkpoints in both key formats, for the loader tests.

The diffusers → BFL mapping here is written out independently of the loader's plan, so a wrong plan
cannot cancel itself out in a round trip.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import save_file


def diffusers_to_bfl(sd: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    simple = {
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "context_embedder": "txt_in",
        "x_embedder": "img_in",
        "proj_out": "final_layer.linear",
    }
    for d, b in simple.items():
        for p in ("weight", "bias"):
            if f"{d}.{p}" in sd:
                out[f"{b}.{p}"] = sd[f"{d}.{p}"]
    for p in ("weight", "bias"):
        scale, shift = sd[f"norm_out.linear.{p}"].chunk(2)
        out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
    n_double = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"transformer_blocks\.(\d+)\.", k)))
    n_single = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"single_transformer_blocks\.(\d+)\.", k)))
    for i in range(n_double):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{b}img_mod.lin.{p}"] = sd[f"{d}norm1.linear.{p}"]
            out[f"{b}txt_mod.lin.{p}"] = sd[f"{d}norm1_context.linear.{p}"]
            out[f"{b}img_attn.qkv.{p}"] = torch.cat([sd[f"{d}attn.to_{x}.{p}"] for x in "qkv"])
            out[f"{b}txt_attn.qkv.{p}"] = torch.cat([sd[f"{d}attn.add_{x}_proj.{p}"] for x in "qkv"])
            out[f"{b}img_mlp.0.{p}"] = sd[f"{d}ff.net.0.proj.{p}"]
            out[f"{b}img_mlp.2.{p}"] = sd[f"{d}ff.net.2.{p}"]
            out[f"{b}txt_mlp.0.{p}"] = sd[f"{d}ff_context.net.0.proj.{p}"]
            out[f"{b}txt_mlp.2.{p}"] = sd[f"{d}ff_context.net.2.{p}"]
            out[f"{b}img_attn.proj.{p}"] = sd[f"{d}attn.to_out.0.{p}"]
            out[f"{b}txt_attn.proj.{p}"] = sd[f"{d}attn.to_add_out.{p}"]
        out[f"{b}img_attn.norm.query_norm.scale"] = sd[f"{d}attn.norm_q.weight"]
        out[f"{b}img_attn.norm.key_norm.scale"] = sd[f"{d}attn.norm_k.weight"]
        out[f"{b}txt_attn.norm.query_norm.scale"] = sd[f"{d}attn.norm_added_q.weight"]
        out[f"{b}txt_attn.norm.key_norm.scale"] = sd[f"{d}attn.norm_added_k.weight"]
    for i in range(n_single):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        for p in ("weight", "bias"):
            out[f"{b}modulation.lin.{p}"] = sd[f"{d}norm.linear.{p}"]
            out[f"{b}linear1.{p}"] = torch.cat(
                [sd[f"{d}attn.to_q.{p}"], sd[f"{d}attn.to_k.{p}"], sd[f"{d}attn.to_v.{p}"], sd[f"{d}proj_mlp.{p}"]]
            )
            out[f"{b}linear2.{p}"] = sd[f"{d}proj_out.{p}"]
        out[f"{b}norm.query_norm.scale"] = sd[f"{d}attn.norm_q.weight"]
        out[f"{b}norm.key_norm.scale"] = sd[f"{d}attn.norm_k.weight"]
    return {prefix + k: v.contiguous() for k, v in out.items()}


def write_checkpoint(sd: dict[str, torch.Tensor], path: Path, fmt: str = "diffusers", prefix: str = "") -> Path:
    """Save ``sd`` (diffusers names) as a safetensors file in ``fmt`` (``diffusers`` or ``bfl``)."""
    tensors = diffusers_to_bfl(sd, prefix) if fmt == "bfl" else {k: v.contiguous() for k, v in sd.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


def write_gguf(sd: dict[str, torch.Tensor], path: Path, qtype: str = "Q8_0") -> Path:
    """Save ``sd`` (diffusers names) as a GGUF file in BFL names, as the community files are: 2-D
    weights whose rows split into 32-wide blocks in ``qtype``, everything else in F32."""
    import gguf
    from gguf.quants import quantize

    kind = gguf.GGMLQuantizationType[qtype]
    writer = gguf.GGUFWriter(str(path), "flux")
    for name, t in diffusers_to_bfl(sd).items():
        array = t.float().numpy()
        if array.ndim == 2 and array.shape[1] % 32 == 0 and kind != gguf.GGMLQuantizationType.F32:
            data = quantize(array, kind)
            writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)
        else:
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_fp8(sd: dict[str, torch.Tensor], path: Path, scaled: bool) -> Path:
    """Save ``sd`` with every 2-D weight in float8_e4m3fn, ComfyUI style: ``scaled`` stores w / s with a
    per-tensor ``scale_weight`` s = amax / 448 (and the ``scaled_fp8`` marker); otherwise a plain cast."""
    out: dict[str, torch.Tensor] = {}
    for name, t in sd.items():
        if t.ndim == 2 and name.endswith(".weight"):
            if scaled:
                s = t.abs().amax().float().clamp_min(1e-12) / 448
                out[name] = (t.float() / s).to(torch.float8_e4m3fn)
                out[name.removesuffix(".weight") + ".scale_weight"] = s.reshape(())
            else:
                out[name] = t.to(torch.float8_e4m3fn)
        else:
            out[name] = t.contiguous()
    if scaled:
        out["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    save_file(out, str(path))
    return path
