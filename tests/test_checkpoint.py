"""Loading transformer checkpoints: both key formats, config inference, streaming, clear errors."""

from __future__ import annotations

import struct
import sys

import numpy as np
import pytest
import torch
from checkpoints import diffusers_to_bfl, write_checkpoint
from peak_memory import medium_state_dict, peak_memory_of_loading
from safetensors.torch import save_file

import srpo_infer
from srpo_infer.checkpoint import CheckpointError, load_transformer
from srpo_infer.checkpoint.keys import BFL_PREFIX, convert_bfl_state_dict, detect_format
from srpo_infer.checkpoint.transformer_config import infer_transformer_config
from srpo_infer.tiny import TINY_TRANSFORMER_CONFIG


def assert_same_state(model, ref: dict[str, torch.Tensor], dtype=torch.float32):
    got = model.state_dict()
    assert set(got) == set(ref)
    for k, v in ref.items():
        assert got[k].dtype == dtype, k
        torch.testing.assert_close(got[k].float(), v.to(dtype).float(), rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("fmt, prefix", [("diffusers", ""), ("bfl", ""), ("bfl", BFL_PREFIX)])
def test_round_trip_both_formats(tmp_path, tiny_state, fmt, prefix):
    path = write_checkpoint(tiny_state, tmp_path / "t.safetensors", fmt, prefix)
    model = load_transformer(str(path), dtype=torch.float32)
    assert_same_state(model, tiny_state)
    cfg = dict(model.config)
    for k, v in TINY_TRANSFORMER_CONFIG.items():
        assert cfg[k] == (list(v) if isinstance(v, tuple) else v) or tuple(cfg[k]) == v, k


def test_bf16_load_casts_every_tensor(tmp_path, tiny_state):
    path = write_checkpoint(tiny_state, tmp_path / "t.safetensors", "bfl")
    assert_same_state(load_transformer(str(path), dtype=torch.bfloat16), tiny_state, torch.bfloat16)


def test_bfl_plan_matches_diffusers_converter():
    """Our width-generic BFL plan gives the tensors diffusers' own converter gives at FLUX.1 width.

    diffusers hard-codes inner_dim=3072 but never looks at columns, so rows are full width and columns 2.
    """
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    d, c, g = 3072, 2, torch.Generator().manual_seed(0)
    rows = {
        "time_in.in_layer": d,
        "time_in.out_layer": d,
        "vector_in.in_layer": d,
        "vector_in.out_layer": d,
        "guidance_in.in_layer": d,
        "guidance_in.out_layer": d,
        "txt_in": d,
        "img_in": d,
        "final_layer.linear": 64,
        "final_layer.adaLN_modulation.1": 2 * d,
    }
    for i in range(2):
        b = f"double_blocks.{i}."
        rows |= {
            b + "img_mod.lin": 6 * d,
            b + "txt_mod.lin": 6 * d,
            b + "img_attn.qkv": 3 * d,
            b + "txt_attn.qkv": 3 * d,
            b + "img_mlp.0": 4 * d,
            b + "img_mlp.2": d,
            b + "txt_mlp.0": 4 * d,
            b + "txt_mlp.2": d,
            b + "img_attn.proj": d,
            b + "txt_attn.proj": d,
        }
    for i in range(3):
        b = f"single_blocks.{i}."
        rows |= {b + "modulation.lin": 3 * d, b + "linear1": 7 * d, b + "linear2": d}
    sd = {}
    for name, n in rows.items():
        sd[f"{name}.weight"] = torch.randn(n, c, generator=g)
        sd[f"{name}.bias"] = torch.randn(n, generator=g)
    for i in range(2):
        for s in ("img_attn", "txt_attn"):
            for q in ("query", "key"):
                sd[f"double_blocks.{i}.{s}.norm.{q}_norm.scale"] = torch.randn(128, generator=g)
    for i in range(3):
        for q in ("query", "key"):
            sd[f"single_blocks.{i}.norm.{q}_norm.scale"] = torch.randn(128, generator=g)
    want = convert_flux_transformer_checkpoint_to_diffusers({BFL_PREFIX + k: v for k, v in sd.items()})
    got = convert_bfl_state_dict({BFL_PREFIX + k: v for k, v in sd.items()})
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_folder_pipeline_folder_and_shards(tmp_path, tiny_state):
    write_checkpoint(tiny_state, tmp_path / "plain" / "diffusion_pytorch_model.safetensors")
    assert_same_state(load_transformer(str(tmp_path / "plain"), dtype=torch.float32), tiny_state)
    write_checkpoint(tiny_state, tmp_path / "pipe" / "transformer" / "model.safetensors")
    assert_same_state(load_transformer(str(tmp_path / "pipe"), dtype=torch.float32), tiny_state)
    keys = sorted(tiny_state)
    (tmp_path / "shards").mkdir()
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        save_file({k: tiny_state[k].contiguous() for k in part}, str(tmp_path / "shards" / f"m-{i}.safetensors"))
    assert_same_state(load_transformer(str(tmp_path / "shards"), dtype=torch.float32), tiny_state)


def test_repo_id_goes_through_the_downloader(tmp_path, tiny_state):
    write_checkpoint(tiny_state, tmp_path / "snap" / "diffusion_pytorch_model.safetensors", "bfl")
    asked = []

    def fake_download(repo_id):
        asked.append(repo_id)
        return str(tmp_path / "snap")

    assert_same_state(load_transformer("tencent/SRPO", download=fake_download, dtype=torch.float32), tiny_state)
    assert asked == ["tencent/SRPO"]


def test_repo_id_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        load_transformer("someone/not-cached-model")


def test_load_pipeline_with_a_checkpoint_and_tiny_base(tmp_path, tiny_state, tiny_pipe):
    path = write_checkpoint(tiny_state, tmp_path / "srpo.safetensors", "bfl", BFL_PREFIX)
    pipe = srpo_infer.load_pipeline(str(path), base="tiny-random", device="cpu", progress=False)
    a = pipe.generate("a bird", width=512, height=512, seed=2, num_inference_steps=2)
    b = tiny_pipe.generate("a bird", width=512, height=512, seed=2, num_inference_steps=2)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_base_from_a_local_pipeline_folder(tmp_path, tiny_state):
    """Base components saved with save_pretrained load back from the folder (as FLUX.1-dev would)."""
    from srpo_infer.tiny import build_tiny_base

    base = tmp_path / "flux-base"
    for name, part in build_tiny_base().items():
        part.save_pretrained(str(base / name))
    path = write_checkpoint(tiny_state, tmp_path / "t.safetensors")
    pipe = srpo_infer.load_pipeline(str(path), base=str(base), device="cpu", progress=False)
    ref = srpo_infer.load_pipeline("tiny-random", device="cpu", progress=False)
    a = pipe.generate("a bird", width=512, height=512, seed=2, num_inference_steps=1)
    b = ref.generate("a bird", width=512, height=512, seed=2, num_inference_steps=1)
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_base_folder_missing_parts_is_clear(tmp_path, tiny_state):
    (tmp_path / "half" / "vae").mkdir(parents=True)
    path = write_checkpoint(tiny_state, tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match=r"lacks the subfolders \['text_encoder'"):
        srpo_infer.load_pipeline(str(path), base=str(tmp_path / "half"), device="cpu", progress=False)


def test_transformer_that_does_not_fit_the_base(tmp_path):
    from diffusers import FluxTransformer2DModel

    other = FluxTransformer2DModel(**{**TINY_TRANSFORMER_CONFIG, "joint_attention_dim": 48})
    path = write_checkpoint(other.state_dict(), tmp_path / "t.safetensors")
    with pytest.raises(ValueError, match=r"T5 width .* is 48 but the base gives 32"):
        srpo_infer.load_pipeline(str(path), base="tiny-random", device="cpu", progress=False)


# ------------------------------------------------------------------ bad checkpoints


def _corrupt(tmp_path, tiny_state, kind):
    p = tmp_path / "bad.safetensors"
    sd = dict(tiny_state)
    if kind == "missing file":
        return tmp_path / "nope.safetensors", "does not exist"
    if kind == "empty folder":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty", "no .safetensors or .gguf file"
    if kind == "not safetensors":
        p.write_bytes(b"PK\x03\x04 this is a zip file, not safetensors" * 10)
        return p, "not a safetensors file"
    if kind == "tiny file":
        p.write_bytes(b"abc")
        return p, "only 3 bytes"
    if kind == "header not json":
        p.write_bytes(struct.pack("<Q", 10) + b"\xff" * 10 + b"\0" * 20)
        return p, "not valid JSON"
    if kind == "truncated header":
        write_checkpoint(sd, p)
        p.write_bytes(p.read_bytes()[:200])
        return p, "header is truncated"
    if kind == "truncated data":
        write_checkpoint(sd, p)
        data = p.read_bytes()
        p.write_bytes(data[: len(data) - 1000])
        return p, "is truncated: tensor"
    if kind == "not flux":
        save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(p))
        return p, "not a Flux transformer checkpoint"
    if kind == "missing keys":
        del sd["transformer_blocks.1.attn.to_k.weight"]
        write_checkpoint(sd, p)
        return p, r"1 missing keys \['transformer_blocks.1.attn.to_k.weight'\]"
    if kind == "unexpected keys":
        sd["transformer_blocks.0.attn.extra.weight"] = torch.zeros(3)
        write_checkpoint(sd, p)
        return p, r"1 unexpected keys \['transformer_blocks.0.attn.extra.weight'\]"
    if kind == "wrong shape":
        sd["transformer_blocks.0.ff.net.2.weight"] = torch.zeros(64, 100)
        write_checkpoint(sd, p)
        return p, r"'transformer_blocks.0.ff.net.2.weight' is \[64, 100\], expected \[64, 256\]"
    if kind == "bfl missing":
        bfl = diffusers_to_bfl(sd)
        del bfl["single_blocks.2.linear2.weight"]
        save_file(bfl, str(p))
        return p, "single_blocks.2.linear2.weight"
    if kind == "bad config.json":
        write_checkpoint(sd, tmp_path / "cfg" / "m.safetensors")
        (tmp_path / "cfg" / "config.json").write_text("{not json")
        return tmp_path / "cfg", "config.json is not valid JSON"
    raise AssertionError(kind)


KINDS = [
    "missing file",
    "empty folder",
    "not safetensors",
    "tiny file",
    "header not json",
    "truncated header",
    "truncated data",
    "not flux",
    "missing keys",
    "unexpected keys",
    "wrong shape",
    "bfl missing",
    "bad config.json",
]


@pytest.mark.parametrize("kind", KINDS)
def test_bad_checkpoints_fail_clearly(tmp_path, tiny_state, kind):
    path, message = _corrupt(tmp_path, tiny_state, kind)
    with pytest.raises(CheckpointError, match=message):
        load_transformer(str(path))


def test_bad_checkpoint_through_load_pipeline_and_nothing_is_cached(tmp_path, tiny_state):
    path, _ = _corrupt(tmp_path, tiny_state, "missing keys")
    with pytest.raises(CheckpointError):
        srpo_infer.load_pipeline(str(path), base="tiny-random", device="cpu")


def test_config_inference_for_full_flux_shapes():
    d = 3072
    shapes = {
        "x_embedder.weight": (d, 64),
        "context_embedder.weight": (d, 4096),
        "transformer_blocks.0.attn.norm_q.weight": (128,),
        "transformer_blocks.18.attn.norm_q.weight": (128,),
        "single_transformer_blocks.37.attn.norm_q.weight": (128,),
        "time_text_embed.text_embedder.linear_1.weight": (d, 768),
        "proj_out.weight": (64, d),
        "time_text_embed.guidance_embedder.linear_1.weight": (d, 256),
    }
    cfg = infer_transformer_config(shapes)
    assert cfg == dict(
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


def test_detect_format():
    assert detect_format(["transformer_blocks.0.attn.to_q.weight"]) == "diffusers"
    assert detect_format(["double_blocks.0.img_attn.qkv.weight"]) == "bfl"
    assert detect_format([BFL_PREFIX + "double_blocks.0.img_attn.qkv.weight"]) == "bfl"


# ------------------------------------------------------------------ bounded host memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
@pytest.mark.parametrize("fmt", ["diffusers", "bfl"])
def test_fp32_to_bf16_streaming_keeps_peak_memory_near_bf16_size(tmp_path, fmt):
    """A 150 MB fp32 checkpoint loads as bf16 with a peak of about the bf16 size, not the fp32 size."""
    sd = medium_state_dict()
    path = write_checkpoint(sd, tmp_path / "fp32.safetensors", fmt)
    fp32_bytes = sum(t.numel() * 4 for t in sd.values())
    del sd
    r = peak_memory_of_loading(str(path))
    assert r["model_bytes"] * 2 == fp32_bytes
    # Loading the fp32 file whole would need >= fp32_bytes on top of the result.
    assert r["peak_delta"] < 1.15 * r["model_bytes"] + 8 * 2**20, r
    assert r["peak_delta"] < 0.75 * fp32_bytes, r
