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


@pytest.mark.parametrize("design", launch.DESIGNS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_matches_fp64_reference(case, dtype, design):
    b, h, d, st, si = case
    kw = make_inputs(b, h, d, st, si, dtype, DEVICE, seed=hash(case) % 1000)
    ref = flux_attention_reference(as_float64(kw))
    poisoned = torch.full((b, st + si, h * d), float("nan"), dtype=dtype, device=DEVICE)
    out = launch.flux_attention(kw, out=poisoned, design=design)
    assert out.data_ptr() == poisoned.data_ptr()
    assert not out.isnan().any(), "kernel left output rows unwritten"
    assert out.dtype == dtype and out.shape == ref.shape
    assert rel_err(out, ref) < TOL[dtype], rel_err(out, ref)


# Tile shapes that put the peeled last key tile in each position: none (S a multiple of BLOCK_N), a
# sliver, the only tile (S < BLOCK_N), and query tiles larger or smaller than key tiles.
TILE_CASES = [
    (launch.KernelConfig(16, 16, 1, 1), 7, 25),  # S = 32: no partial tile
    (launch.KernelConfig(32, 16, 1, 1), 7, 26),  # S = 33: a one-key tail
    (launch.KernelConfig(16, 32, 1, 1), 3, 8),  # S = 11 < BLOCK_N: the tail is the whole loop
    (launch.KernelConfig(16, 32, 1, 1, warp_specialize=True), 9, 40),
]


@pytest.mark.parametrize("design", launch.DESIGNS)
@pytest.mark.parametrize("mode", launch.MODES)
@pytest.mark.parametrize("config, s_txt, s_img", TILE_CASES, ids=[str(c[1:]) for c in TILE_CASES])
def test_explicit_configs_and_peeled_tail(config, s_txt, s_img, mode, design):
    kw = make_inputs(1, 2, 32, s_txt, s_img, torch.float32, DEVICE, seed=s_img)
    ref = flux_attention_reference(as_float64(kw))
    out = launch.flux_attention(kw, mode=mode, design=design, config=config)
    bound = TOL[torch.float32] if mode == "bf16" else FP8_BOUND
    assert rel_err(out, ref) < bound, rel_err(out, ref)


def test_autotuning_is_keyed_on_sequence_buckets_not_lengths():
    """Flux's 1089 sizes span 1536–9728 tokens: 4 keys, so warm-up covers every request's autotuning."""
    lengths = {512 + (w // 16) * (h // 16) for w in range(512, 1537, 32) for h in range(512, 1537, 32)}
    assert len(lengths) > 300 and {launch.seq_bucket(s) for s in lengths} == {2048, 4096, 8192, 16384}
    assert all(launch.seq_bucket(s) >= s > launch.seq_bucket(s) // 2 for s in lengths)


def test_every_candidate_tile_fits_the_padding():
    """The attention loop loads without masks only because every tile of every candidate lies inside
    the pre-pass's padded buffers."""
    for fp8 in (False, True):
        configs = launch.BF16_CANDIDATES if not fp8 else launch.FP8_CANDIDATES
        pad = launch.padding(configs)
        sizes = [size for c in configs for size in (c.block_m, c.block_n)]
        assert all(size & (size - 1) == 0 for size in sizes)  # powers of two: the largest is a multiple of all
        assert all(pad % size == 0 for size in sizes)


@pytest.mark.parametrize("design", launch.DESIGNS)
def test_fused_qkv_column_slices(design):
    kw = make_inputs(1, 2, 32, 9, 23, torch.float16, DEVICE, seed=3, fused_qkv=True)
    assert kw.img_q.stride(1) == 3 * 64  # a strided view, not a copy
    ref = flux_attention_reference(as_float64(kw))
    assert rel_err(launch.flux_attention(kw, design=design), ref) < TOL[torch.float16]


# fp8: relative L2 error vs exact stays under this bound on RMS-normalised random inputs (e4m3 has 3
# mantissa bits: ~2.5% RMS per quantised value; benchmarks/fp8_error.py splits the total between the
# two matmuls). The emulation in srpo_infer.attention reproduces the scheme in float64 torch; the
# kernel may differ from it only by its online softmax (p is quantised against the running row max).
FP8_BOUND = 0.08
FP8_VS_EMULATION = 0.03


@pytest.mark.parametrize("design", launch.DESIGNS)
@pytest.mark.parametrize("case", [(1, 2, 32, 7, 37), (1, 2, 64, 16, 50)], ids=str)
def test_fp8_error_is_bounded_and_matches_the_emulation(case, design):
    from srpo_infer.attention import attention_prologue, fp8_attention_emulation

    b, h, d, st, si = case
    kw = make_inputs(b, h, d, st, si, torch.float16, DEVICE, seed=11)
    ref = flux_attention_reference(as_float64(kw))
    out = launch.flux_attention(kw, mode="fp8", design=design)
    assert not out.isnan().any()
    err = rel_err(out, ref)
    assert 1e-3 < err < FP8_BOUND, err  # > 1e-3: it really is quantised

    emu = fp8_attention_emulation(*attention_prologue(as_float64(kw))).transpose(1, 2).flatten(2)
    assert rel_err(out, emu) < FP8_VS_EMULATION, rel_err(out, emu)
    assert rel_err(emu, ref) < FP8_BOUND


def test_fp8_value_scale_is_per_channel():
    """One channel of v 10⁵ times larger than the rest: with a scale per (head, channel) the other
    channels keep their precision (one scale per head or tile would push them into e4m3's subnormals,
    ~50% error)."""
    kw = make_inputs(1, 2, 32, 5, 27, torch.float32, DEVICE, seed=4)
    big = kw.img_v.clone()
    big[..., 3] *= 1e5
    kw = kw._replace(img_v=big, txt_v=kw.txt_v.clone())
    kw.txt_v[..., 3] *= 1e5
    ref = flux_attention_reference(as_float64(kw))
    out = launch.flux_attention(kw, mode="fp8")
    others = [c for c in range(64) if c != 3]
    assert rel_err(out[..., others], ref[..., others]) < FP8_BOUND


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
        (dict(design="cudnn"), "design must be one of"),
        (dict(config=(16, 16, 1, 1)), "config must be a KernelConfig"),
    ],
)
def test_launcher_errors_are_clear(change, message):
    x = make_inputs(1, 2, 64, 3, 10, torch.float16, DEVICE)
    mode = change.pop("mode", "bf16")
    options = {key: change.pop(key) for key in ("design", "config") if key in change}
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
        launch.flux_attention(x, mode=mode, **options)


def test_design_from_the_environment(monkeypatch):
    monkeypatch.setenv(launch.DESIGN_ENV, "tma")
    assert launch.resolve_design("auto", torch.device(DEVICE)) == "tma"
    assert launch.resolve_design("pointer", torch.device(DEVICE)) == "pointer"
    monkeypatch.setenv(launch.DESIGN_ENV, "fast")
    with pytest.raises(ValueError, match=r"SRPO_ATTENTION_DESIGN must be one of .* got 'fast'"):
        launch.flux_attention(make_inputs(1, 2, 32, 3, 9, torch.float16, DEVICE))


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
