"""The transformer file kinds users have besides fp32/bf16 safetensors, written by the tests for the
tiny model: GGUF (Q8_0, BFL names, written with the ``gguf`` package) and fp8-e4m3 safetensors
(ComfyUI style, with and without per-tensor scales). Each loads by detection, stays close to the fp32
model, keeps host memory bounded while loading, and every bad file is refused before weights load."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from checkpoints import write_checkpoint, write_fp8, write_gguf
from helpers import standard_request
from peak_memory import medium_state_dict, peak_memory_of_loading
from safetensors.torch import save_file

import srpo_infer
from srpo_infer import CheckpointError
from srpo_infer.bench.deviation import psnr, relative_error
from srpo_infer.checkpoint import load_transformer
from srpo_infer.tiny import build_tiny_transformer

pytest.importorskip("gguf")
REQ = standard_request(num_inference_steps=4)

# Measured on the tiny model (2026-11-26, CPU): latent relative error vs the fp32 file and PSNR of the
# decoded image. GGUF Q8_0: 1.7e-2, 49.4 dB; fp8 scaled: 7.2e-2, 36.7 dB; fp8 plain cast: 5.8e-2,
# 40.9 dB. The bounds leave room for other seeds and BLAS builds.
BOUNDS = {"gguf-q8_0": (0.05, 42.0), "fp8-scaled": (0.15, 30.0), "fp8-plain": (0.15, 30.0)}


@pytest.fixture(scope="module")
def checkpoint_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("formats")
    sd = build_tiny_transformer().state_dict()
    return {
        "fp32": write_checkpoint(sd, folder / "fp32.safetensors"),
        "gguf-q8_0": write_gguf(sd, folder / "srpo-Q8_0.gguf"),
        "fp8-scaled": write_fp8(sd, folder / "fp8-scaled.safetensors", scaled=True),
        "fp8-plain": write_fp8(sd, folder / "fp8-plain.safetensors", scaled=False),
    }


def _outputs(path):
    pipe = srpo_infer.load_pipeline(str(path), base="tiny-random", device="cpu", progress=False)
    image = pipe.generate(REQ).images[0]  # the request itself: one typed request end to end
    return pipe.generate_latents(REQ), image


@pytest.mark.parametrize("kind", list(BOUNDS))
def test_quantized_files_load_by_detection_close_to_fp32(checkpoint_files, kind):
    ref_latents, ref_image = _outputs(checkpoint_files["fp32"])
    latents, image = _outputs(checkpoint_files[kind])
    max_err, min_psnr = BOUNDS[kind]
    err, db = relative_error(latents, ref_latents), psnr(image, ref_image)
    assert 1e-4 < err < max_err, err  # quantized for real, and close
    assert db > min_psnr, db


def test_gguf_and_fp8_weights_are_dequantized_exactly_as_stored(checkpoint_files):
    """Per tensor, the loaded weight equals the file's content upcast (with its scale): no silent loss."""
    from safetensors import safe_open

    loaded = load_transformer(str(checkpoint_files["fp8-scaled"]), dtype=torch.float32)
    with safe_open(str(checkpoint_files["fp8-scaled"]), "pt") as f:
        w = f.get_tensor("transformer_blocks.0.attn.to_q.weight").float()
        s = f.get_tensor("transformer_blocks.0.attn.to_q.scale_weight").float()
    assert torch.equal(loaded.transformer_blocks[0].attn.to_q.weight, w * s)
    gguf_model = load_transformer(str(checkpoint_files["gguf-q8_0"]), dtype=torch.float32)
    fp32 = build_tiny_transformer()
    q = gguf_model.transformer_blocks[0].attn.to_q.weight  # a row slice of the Q8_0 fused qkv
    assert 0 < (q - fp32.transformer_blocks[0].attn.to_q.weight).abs().max() < 0.01


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("kind", ["gguf", "fp8"])
def test_loading_keeps_peak_host_memory_near_the_model_size(tmp_path, kind):
    sd = medium_state_dict()
    path = write_gguf(sd, tmp_path / "m.gguf") if kind == "gguf" else write_fp8(sd, tmp_path / "m.safetensors", True)
    fp32_bytes = sum(t.numel() * 4 for t in sd.values())
    largest_fp32 = max(t.numel() * 4 for t in sd.values())
    del sd
    r = peak_memory_of_loading(str(path))
    assert r["model_bytes"] * 2 == fp32_bytes
    # Dequantizing or upcasting the whole file first would need its fp32 size on top of the result. Seen
    # here (10 runs each): GGUF 1.04-1.06× the bf16 model; fp8 1.03× mostly, up to 1.45× now and then
    # (allocator slack of a few freed tensors, not a whole-file copy).
    assert r["peak_delta"] < 1.15 * r["model_bytes"] + 8 * 2**20 + 4 * largest_fp32, r
    assert r["peak_delta"] < 0.8 * fp32_bytes, r


def test_bad_files_are_refused_before_any_weight_loads(tmp_path, checkpoint_files):
    import gguf

    sd = build_tiny_transformer().state_dict()
    # A quantization type we do not dequantize (IQ2_XXS: 256 values in 66 bytes per block).
    writer = gguf.GGUFWriter(str(tmp_path / "iq2.gguf"), "flux")
    writer.add_tensor(
        "img_in.weight",
        np.zeros((64, 66), dtype=np.uint8),
        raw_shape=(64, 66),
        raw_dtype=gguf.GGMLQuantizationType.IQ2_XXS,
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="GGUF type IQ2_XXS, which srpo_infer does not load"):
        load_transformer(str(tmp_path / "iq2.gguf"))
    data = checkpoint_files["gguf-q8_0"].read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        load_transformer(str(tmp_path / "cut.gguf"))
    (tmp_path / "text.gguf").write_text("hello")
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        load_transformer(str(tmp_path / "text.gguf"))
    int8 = {k: (v * 100).to(torch.int8) if v.ndim == 2 else v for k, v in sd.items()}
    save_file(int8, tmp_path / "int8.safetensors")
    with pytest.raises(CheckpointError, match="stored as I8, which srpo_infer does not load"):
        load_transformer(str(tmp_path / "int8.safetensors"))
    orphan = {**sd, "transformer_blocks.0.attn.nothing.scale_weight": torch.tensor(1.0)}
    save_file(orphan, tmp_path / "orphan.safetensors")
    with pytest.raises(CheckpointError, match="fp8 scales without a weight"):
        load_transformer(str(tmp_path / "orphan.safetensors"))
    wrong = {k: v.half() for k, v in sd.items()}
    wrong["transformer_blocks.0.attn.to_q.scale_weight"] = torch.tensor(0.5)
    save_file(wrong, tmp_path / "scaled-fp16.safetensors")
    with pytest.raises(CheckpointError, match=r"has a scale_weight but is stored as torch\.float16"):
        load_transformer(str(tmp_path / "scaled-fp16.safetensors"))
