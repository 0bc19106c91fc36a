"""The attention seam on the tiny transformer: every backend against diffusers' stock processor."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from attention_inputs import rel_err
from srpo_infer.kernels import configs, launch

import srpo_infer
from srpo_infer.attention import FluxAttentionProcessor, set_attention_backend
from srpo_infer.tiny import build_tiny_transformer

needs_kernels = pytest.mark.skipif(
    not configs.interpreting() and not torch.cuda.is_available(), reason="needs CUDA or TRITON_INTERPRET=1"
)
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32 on the CPU (the GPU file checks bf16), relative to the stock output; measured here (2026-11-30,
# the inputs below): sdpa 0 (bit-identical), triton 2.1e-7, triton-int8 2.4e-6, triton-int8-fp8 6.1e-3.
TOL = {"sdpa": 1e-6, "triton": 1e-5, "triton-int8": 1e-4, "triton-int8-fp8": 2e-2}
EIGHT_BIT = ["triton-int8", "triton-int8-fp8"]


def transformer_inputs(seed=0, batch=1, txt=5, h=3, w=7):
    """26 tokens: odd, past one 16-token interpreter tile, the text/image edge inside the first. The
    interpreter's time grows with the tiles squared (67 tokens took 3.3× as long); the kernels' own tile
    edges and tails are covered in test_kernels.py."""
    g = torch.Generator().manual_seed(seed)
    from diffusers import FluxPipeline

    img_ids = FluxPipeline._prepare_latent_image_ids(batch, h, w, "cpu", torch.float32)
    return dict(
        hidden_states=torch.randn(batch, h * w, 16, generator=g),
        encoder_hidden_states=torch.randn(batch, txt, 32, generator=g),
        pooled_projections=torch.randn(batch, 32, generator=g),
        timestep=torch.full((batch,), 0.7),
        guidance=torch.full((batch,), 3.5),
        img_ids=img_ids,
        txt_ids=torch.zeros(txt, 3),
        return_dict=False,
    )


@pytest.fixture(scope="module")
def stock_flux():
    """The tiny transformer with diffusers' own processor, and its output."""
    model = build_tiny_transformer().to(DEVICE)
    inputs = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in transformer_inputs().items()}
    with torch.inference_mode():
        return model, inputs, model(**inputs)[0]


# Fused QKV changes only how the kernels read q/k/v (strided column slices), the same in every mode.
CASES = [
    ("sdpa", False),
    ("sdpa", True),
    ("triton", False),
    ("triton", True),
    ("triton-int8", True),
    ("triton-int8-fp8", False),
]


@pytest.mark.parametrize(
    "backend, fused",
    [
        pytest.param(b, f, marks=[needs_kernels] if b != "sdpa" else [], id=f"{b}-{'fused' if f else 'unfused'}-qkv")
        for b, f in CASES
    ],
)
def test_backend_matches_stock_processor(stock_flux, backend, fused):
    model, inputs, ref = stock_flux
    ours = copy.deepcopy(model)
    if fused:
        ours.fuse_qkv_projections()
        assert ours.transformer_blocks[0].attn.fused_projections
    set_attention_backend(ours, backend)
    procs = set(map(type, ours.attn_processors.values()))
    assert procs == {FluxAttentionProcessor}
    with torch.inference_mode():
        out = ours(**inputs)[0]
    assert rel_err(out, ref) < TOL[backend], (backend, rel_err(out, ref))


@needs_kernels
@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_capability() < (9, 0), reason="tma: sm90")
@pytest.mark.parametrize(("backend", "how"), [("triton", "config"), ("triton-int8-fp8", "environment")])
def test_the_chosen_design_reaches_the_model(stock_flux, backend, how, monkeypatch):
    """``attention_design="tma"`` (PipelineConfig's field, passed down to the processor) or, for ``auto``,
    ``SRPO_ATTENTION_DESIGN=tma`` runs the descriptor design inside the transformer, same result."""
    calls = []
    real = launch.resolve_design
    monkeypatch.setattr(launch, "resolve_design", lambda d, dev, *a: calls.append(real(d, dev, *a)) or calls[-1])
    if how == "environment":
        monkeypatch.setenv(launch.DESIGN_ENV, "tma")
    model, inputs, ref = stock_flux
    ours = copy.deepcopy(model)
    set_attention_backend(ours, backend, "tma" if how == "config" else "auto")
    with torch.inference_mode():
        out = ours(**inputs)[0]
    assert calls and set(calls) == {"tma"}
    assert rel_err(out, ref) < TOL[backend], (backend, rel_err(out, ref))


@needs_kernels
def test_compile_fullgraph_traces_the_custom_op(stock_flux):
    """torch.compile(fullgraph=True) must see the kernel as one op: no graph break, same output."""
    model, inputs, _ = stock_flux
    # One block of each kind: dynamo traces every block it inlines, and one of each is the question.
    short = copy.deepcopy(model)
    short.transformer_blocks, short.single_transformer_blocks = (
        short.transformer_blocks[:1],
        short.single_transformer_blocks[:1],
    )
    ours = copy.deepcopy(short)
    set_attention_backend(ours, "triton")
    torch._dynamo.reset()
    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    with torch.inference_mode():
        ref, out = short(**inputs)[0], compiled(**inputs)[0]
    assert rel_err(out, ref) < TOL["triton"]


def test_load_pipeline_attention_choice(monkeypatch):
    pipe = srpo_infer.load_pipeline("tiny-random", device="cpu", progress=False, attention="auto")
    assert pipe.config.attention == "sdpa"
    with pytest.raises(ValueError, match="attention must be one of"):
        srpo_infer.load_pipeline("tiny-random", device="cpu", attention="flash")
    with pytest.raises(ValueError, match="'triton-fp8' was replaced by triton-int8-fp8"):
        srpo_infer.load_pipeline("tiny-random", device="cpu", attention="triton-fp8")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        srpo_infer.load_pipeline("tiny-random", device="cpu", attention="triton")


def test_old_or_missing_triton_is_a_clear_error(monkeypatch):
    from srpo_infer.attention import check_triton

    check_triton("3.4.0")
    check_triton("3.6.0+git9a1b2c3")
    with pytest.raises(ValueError, match=r"need triton >= 3\.4, found 3\.2\.0"):
        check_triton("3.2.0")
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton → ImportError
    with pytest.raises(ValueError, match=r"need the 'triton' package; pip install 'srpo-infer\[triton\]'"):
        srpo_infer.load_pipeline("tiny-random", device="cpu", attention="triton")


@needs_kernels
def test_load_pipeline_installs_the_triton_processor():
    pipe = srpo_infer.load_pipeline("tiny-random", device=DEVICE, progress=False, attention="triton")
    procs = list(pipe.transformer.attn_processors.values())
    assert procs and all(isinstance(p, FluxAttentionProcessor) and p.backend == "triton" for p in procs)


@needs_kernels
def test_warmup_with_triton_covers_every_autotuning_bucket():
    from srpo_infer.pipeline import BUCKET_SIZES, attention_warmup_sizes

    assert attention_warmup_sizes([(1024, 1024)], 512) == [(512, 512), (1024, 768), (1536, 1536)]
    assert attention_warmup_sizes(list(BUCKET_SIZES), 512) == []
    buckets = {
        launch.seq_bucket(512 + (w // 16) * (h // 16)) for w in range(512, 1537, 32) for h in range(512, 1537, 32)
    }
    assert buckets == {launch.seq_bucket(512 + (w // 16) * (h // 16)) for w, h in BUCKET_SIZES}


@needs_kernels
@pytest.mark.parametrize("backend", ["sdpa", "triton", *EIGHT_BIT])
def test_warmup_autotunes_every_triton_backend(backend, monkeypatch):
    """Each Triton backend has its own autotuner: warm-up must cover its buckets too, not only "triton"'s."""
    from srpo_infer.pipeline import attention_warmup_sizes

    pipe = srpo_infer.load_pipeline("tiny-random", device=DEVICE, progress=False, attention=backend)
    sizes = []
    monkeypatch.setattr(pipe, "generate", lambda *a, width, height, **kw: sizes.append((width, height)))
    pipe.warmup([(1024, 1024)])
    others = attention_warmup_sizes([(1024, 1024)], 512) if backend != "sdpa" else []
    assert sizes == [(1024, 1024), *others] and (len(others) == 3 or backend == "sdpa")
