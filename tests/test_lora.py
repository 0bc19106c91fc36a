"""LoRA on the tiny model, from files the tests write: both key formats, scale, fuse/unfuse, hotswap
under compile without recompiling, and clear refusals that leave nothing half-loaded."""

from __future__ import annotations

import pytest
import torch
from helpers import standard_request
from loras import diffusers_lora, kohya_lora, lora_factors
from safetensors.torch import save_file

import srpo_infer
from srpo_infer.bench.deviation import relative_error
from srpo_infer.lora import LoraError, has_adapter

pytest.importorskip("peft")
REQ = standard_request()
WIDTH, BLOCKS, RANK = 64, 2, 4  # the tiny transformer: 2 heads × 32, 2 double blocks


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    factors = lora_factors(WIDTH, BLOCKS, RANK, seed=1)
    paths = {
        "diffusers": folder / "a-diffusers.safetensors",
        "kohya": folder / "a-kohya.safetensors",
        "other": folder / "b-diffusers.safetensors",
    }
    save_file(diffusers_lora(factors), paths["diffusers"])
    save_file(kohya_lora(factors), paths["kohya"])
    save_file(diffusers_lora(lora_factors(WIDTH, BLOCKS, RANK, seed=2)), paths["other"])
    return paths


@pytest.fixture(scope="module")
def plain(tiny_pipe):
    return tiny_pipe.generate_latents(REQ)


def load(**kw):
    return srpo_infer.load_pipeline("tiny-random", device="cpu", progress=False, **kw)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_a_lora_in_either_key_format_changes_the_output_the_same_way(lora_files, plain, fmt):
    got = load(lora=str(lora_files[fmt])).generate_latents(REQ)
    assert relative_error(got, plain) > 1e-3  # it did something
    reference = load(lora=str(lora_files["diffusers"])).generate_latents(REQ)
    assert relative_error(got, reference) < 1e-5  # kohya's fused qkv + alpha = the same update


def test_scale_zero_equals_no_lora_bit_for_bit_and_scale_is_live(lora_files, plain):
    pipe = load(lora=str(lora_files["diffusers"]), lora_scale=0.0, lora_fuse=False)
    assert has_adapter(pipe.transformer)
    assert torch.equal(pipe.generate_latents(REQ), plain)
    pipe.set_lora_scale(1.0)
    full = load(lora=str(lora_files["diffusers"])).generate_latents(REQ)
    assert relative_error(pipe.generate_latents(REQ), full) < 1e-5  # separate at 1.0 = fused


def test_fuse_then_unfuse_round_trips_the_weights(lora_files):
    pipe = load(lora=str(lora_files["diffusers"]), lora_fuse=False)
    layer = pipe.transformer.transformer_blocks[0].attn.to_q.base_layer
    before = layer.weight.detach().clone()
    separate = pipe.generate_latents(REQ)
    pipe.fuse_lora()
    assert not torch.equal(layer.weight, before)
    assert relative_error(pipe.generate_latents(REQ), separate) < 1e-5
    pipe.unfuse_lora()
    torch.testing.assert_close(layer.weight, before, rtol=0, atol=1e-6)


@pytest.mark.slow  # a compile trace of its own (~20 s); per-request adapters under compile: test_lora_requests
def test_swapping_a_lora_under_compile_does_not_recompile(lora_files):
    torch._dynamo.reset()
    pipe = load(
        lora=str(lora_files["diffusers"]), lora_fuse=False, compile=True, compile_backend="eager", cache_dir=None
    )
    assert "fuse_qkv" not in pipe.optimized.steps  # the adapters sit on to_q/to_k/to_v
    first = pipe.generate_latents(REQ)
    graphs = pipe.compiled_graphs()
    pipe.load_lora(lora_files["other"])
    swapped = pipe.generate_latents(REQ)
    assert pipe.compiled_graphs() == graphs, "the swap recompiled"
    expected = load(lora=str(lora_files["other"])).generate_latents(REQ)
    assert relative_error(swapped, expected) < 1e-4 and relative_error(swapped, first) > 1e-3


def test_a_lora_can_be_loaded_into_an_eager_pipeline_later(lora_files, plain):
    pipe = load()
    pipe.load_lora(lora_files["kohya"], scale=0.0)
    assert torch.equal(pipe.generate_latents(REQ), plain)


def _no_adapter_left(pipe) -> bool:
    return not has_adapter(pipe.transformer) and not any("lora" in n for n, _ in pipe.transformer.named_modules())


def test_bad_loras_are_refused_clearly_and_leave_nothing_behind(tmp_path, plain):
    pipe = load()
    other_model = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
    }
    save_file(other_model, tmp_path / "sdxl.safetensors")
    with pytest.raises(LoraError, match="another model"):
        pipe.load_lora(tmp_path / "sdxl.safetensors")
    wrong_width = diffusers_lora(lora_factors(WIDTH * 2, BLOCKS, RANK, seed=3))  # another model's widths
    save_file(wrong_width, tmp_path / "wide.safetensors")
    with pytest.raises(LoraError, match="does not fit"):
        pipe.load_lora(tmp_path / "wide.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoraError, match="not a readable safetensors file"):
        pipe.load_lora(tmp_path / "junk.safetensors")
    with pytest.raises(LoraError, match="does not exist"):
        pipe.load_lora(tmp_path / "missing.safetensors")
    save_file({"x": torch.zeros(2)}, tmp_path / "empty.safetensors")
    with pytest.raises(LoraError, match="no LoRA matrices"):
        pipe.load_lora(tmp_path / "empty.safetensors")
    assert _no_adapter_left(pipe)
    assert torch.equal(pipe.generate_latents(REQ), plain)  # nothing half-loaded


def test_lora_options_that_cannot_work_together_are_refused(lora_files):
    with pytest.raises(ValueError, match="cannot be quantized"):
        load(lora=str(lora_files["diffusers"]), lora_fuse=False, quantize="fp8-weight")
    with pytest.raises(ValueError, match="fuse_qkv=True cannot keep a separate LoRA"):
        load(lora=str(lora_files["diffusers"]), lora_fuse=False, fuse_qkv=True)
    with pytest.raises(LoraError, match="does not exist"):
        load(lora="/no/such/lora.safetensors")
    compiled = load(compile=True, compile_backend="eager", cache_dir=None)
    with pytest.raises(LoraError, match="lora_fuse=False"):
        compiled.load_lora(lora_files["diffusers"])
