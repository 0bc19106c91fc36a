"""Triton Flux attention under the interpreter (CPU) against an fp64 reference of the unfused math.

bf16 ``tl.dot`` is wrong in the interpreter, so CPU runs use fp16/fp32; bf16 and fp8 at real Flux
shapes are checked by tests/test_kernels_gpu.py on a GPU.
"""

from __future__ import annotations

import re

import pytest
import torch
from attention_inputs import as_float64, make_inputs, rel_err
from srpo_infer.kernels import launch

from srpo_infer.attention import flux_attention_reference

pytestmark = pytest.mark.skipif(
    not launch.interpreting() and not torch.cuda.is_available(), reason="needs CUDA or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float16: 2e-3, torch.float32: 1e-5}

CASES = [
    # batch, heads, head_dim, s_txt, s_img
    (1, 2, 32, 7, 37),
    (2, 1, 64, 0, 29),  # single-stream (single blocks)
    (1, 2, 64, 16, 48),  # exact tile multiples
    (1, 1, 128, 5, 19),
    (2, 3, 32, 33, 1),  # one image token
]


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_matches_fp64_reference(case, dtype):
    b, h, d, st, si = case
    kw = make_inputs(b, h, d, st, si, dtype, DEVICE, seed=hash(case) % 1000)
    ref = flux_attention_reference(as_float64(kw))
    poisoned = torch.full((b, st + si, h * d), float("nan"), dtype=dtype, device=DEVICE)
    out = launch.flux_attention(kw, out=poisoned)
    assert out.data_ptr() == poisoned.data_ptr()
    assert not out.isnan().any(), "kernel left output rows unwritten"
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)


def test_autotuning_is_keyed_on_sequence_buckets_not_lengths():
    """Flux's 1089 sizes span 1536–9728 tokens: 4 keys, so warm-up covers every request's autotuning."""
    lengths = {512 + (w // 16) * (h // 16) for w in range(512, 1537, 32) for h in range(512, 1537, 32)}
    assert len(lengths) > 300 and {launch.seq_bucket(s) for s in lengths} == {2048, 4096, 8192, 16384}
    assert all(launch.seq_bucket(s) >= s > launch.seq_bucket(s) // 2 for s in lengths)


def test_fused_qkv_column_slices():
    kw = make_inputs(1, 2, 32, 9, 23, torch.float16, DEVICE, seed=3, fused_qkv=True)
    assert kw.img_q.stride(1) == 3 * 64  # a strided view, not a copy
    ref = flux_attention_reference(as_float64(kw))
    assert rel_err(launch.flux_attention(kw), ref) < TOL[torch.float16]


# fp8: relative L2 error vs exact stays under this bound on RMS-normalised random inputs. The emulation
# in srpo_infer.attention reproduces the scheme in float64 torch; the kernel may differ from it only by
# its online softmax (p is quantised against the running row max).
FP8_BOUND = 0.08
FP8_VS_EMULATION = 0.03


@pytest.mark.parametrize("case", [(1, 2, 32, 7, 37), (1, 2, 64, 16, 50)], ids=str)
def test_fp8_error_is_bounded(case):
    from srpo_infer.attention import fp8_attention_emulation

    b, h, d, st, si = case
    kw = make_inputs(b, h, d, st, si, torch.float16, DEVICE, seed=11)
    ref = flux_attention_reference(as_float64(kw))
    out = launch.flux_attention(kw, mode="fp8")
    assert not out.isnan().any()
    err = rel_err(out, ref)
    assert 1e-4 < err < FP8_BOUND, err  # > 1e-4: it really is quantised

    # The same scheme in torch: rebuild normalised, rotated q/k from the fp64 reference path.
    from srpo_infer.attention import _rms, _rope

    f = as_float64(kw)

    def prep(name, norm):
        f = f_dict
        parts = [_rms(f[f"txt_{name}"].unflatten(-1, (h, -1)), f[f"txt_norm_{name}"], 1e-6)] if st else []
        parts.append(_rms(f[f"img_{name}"].unflatten(-1, (h, -1)), f[f"img_norm_{name}"], 1e-6))
        return _rope(torch.cat(parts, 1), f["rope_cos"], f["rope_sin"]).transpose(1, 2)

    f_dict = f._asdict()
    v = torch.cat(([f.txt_v] if st else []) + [f.img_v], 1).unflatten(-1, (h, -1)).transpose(1, 2)
    tile = launch._blocks(d, True)["BLOCK_N"]
    emu = fp8_attention_emulation(prep("q", "q"), prep("k", "k"), v, tile).transpose(1, 2).flatten(2)
    assert rel_err(out, emu) < FP8_VS_EMULATION, rel_err(out, emu)
    assert rel_err(emu, ref) < FP8_BOUND


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(heads=3), "heads must be a positive divisor"),
        (dict(heads=8), "head_dim must be one of"),
        (dict(mode="int4"), "mode must be one of"),
        (dict(img_k="half-width"), "img_k has shape"),
        (dict(img_v="float32"), "img_v is torch.float32"),
        (dict(img_q="transposed"), "contiguous in its last dim"),
        (dict(rope_cos="short"), "rope_cos must be"),
        (dict(txt_k=None), "must be given together"),
        (dict(img_norm_q="wrong"), "img_norm_q must be a [64]"),
    ],
)
def test_launcher_errors_are_clear(change, message):
    x = make_inputs(1, 2, 64, 3, 10, torch.float16, DEVICE)
    mode = change.pop("mode", "bf16")
    for key, val in change.items():
        old = getattr(x, key)
        if val == "half-width":
            val = old[..., :64].contiguous()
        elif val == "float32":
            val = old.float()
        elif val == "transposed":
            val = old.transpose(1, 2).contiguous().transpose(1, 2)
        elif val == "short":
            val = old[:5]
        elif val == "wrong":
            val = old[:10]
        x = x._replace(**{key: val})
    with pytest.raises(ValueError, match=re.escape(message)):
        launch.flux_attention(x, mode=mode)


def test_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    kw = make_inputs(1, 2, 64, 3, 10, torch.float16, "cpu")
    with pytest.raises(ValueError, match="need CUDA"):
        launch.flux_attention(kw)


def test_custom_op_schema_and_fake_impl():
    import srpo_infer.kernels.ops  # noqa: F401

    x = make_inputs(1, 2, 32, 3, 9, torch.float16, DEVICE, seed=5)
    torch.library.opcheck(torch.ops.srpo.flux_attention.default, tuple(x), {"mode": "bf16"})
    assert rel_err(torch.ops.srpo.flux_attention(*x), flux_attention_reference(x)) < 2e-3
