"""The ``ws`` kernel's numerics without a GPU: its schedule emulated in torch
(``srpo_infer/bench/ws_schedule.py``: the delayed P·V with its rescale, the masked first and last key
tiles, each mode's operands and accumulators), against the standard online-softmax schedule of the
same quantisation and against float64 attention, within the bounds the 8-bit modes already meet.
Gluon has no interpreter, so the kernel itself is compared with this emulation on a GPU
(``test_kernels_gpu.py``)."""

from __future__ import annotations

import pytest
import torch

from srpo_infer.bench.deviation import relative_l1
from srpo_infer.bench.quantised_attention import attention_family, emulate, exact_attention
from srpo_infer.bench.ws_schedule import emulate_ws

# Relative L1 against float64 attention: the 8-bit modes' shipped bounds (benchmarks/attention_error.py);
# native: at most 1.2 × plain bf16 SDPA's own error on the same inputs (measured beside it).
BOUNDS = {"int8": {"random": 1.5e-2, "outliers": 0.08}, "int8-fp8": {"random": 4.5e-2, "outliers": 0.09}}
STANDARD = {  # the same quantisation on the standard schedule (float64): emulate()'s formats
    "native": dict(qk="exact", pv="bfloat16"),
    "int8": dict(qk="int8", pv="bfloat16"),
    "int8-fp8": dict(qk="int8", pv="e4m3"),
}


@pytest.mark.parametrize("mode", list(STANDARD))
@pytest.mark.parametrize("block_n", [64, 128])
def test_ws_schedule_computes_what_the_standard_schedule_computes(mode, block_n):
    """Delaying each tile's P·V past the next softmax and rescaling after it changes only the rounding
    (fp32 here, float64 there): 333 tokens, so the last tile is partial and masked."""
    q, k, v = torch.randn(3, 1, 2, 333, 128, generator=torch.Generator().manual_seed(block_n), dtype=torch.float64)
    ws = emulate_ws(q, k, v, mode, block_n=block_n).double()
    standard = emulate(*(t.to(torch.bfloat16).double() for t in (q, k, v)), block_n=block_n, **STANDARD[mode])
    assert relative_l1(ws, standard) < {"native": 1e-5, "int8": 1e-3, "int8-fp8": 2e-3}[mode]
    assert relative_l1(ws, exact_attention(q, k, v)) < 0.05


def test_ws_schedule_is_wrong_without_the_rescale():
    """The check above can fail: the same loop adding P·V without its α rescale is far off."""
    q, k, v = torch.randn(3, 1, 1, 300, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    k[..., 200:, :] *= 4  # later keys raise the row max, so the earlier tiles' α < 1 matter
    exact = exact_attention(q, k, v)
    assert relative_l1(emulate_ws(q, k, v, block_n=64).double(), exact) < 1e-2
    from srpo_infer.bench import ws_schedule

    real_exp2 = torch.exp2
    try:  # α = 1 everywhere it multiplies the output: the rescale forgotten
        ws_schedule.torch.exp2 = lambda x: torch.ones_like(x) if x.dim() == 3 else real_exp2(x)
        broken = emulate_ws(q, k, v, block_n=64).double()
    finally:
        ws_schedule.torch.exp2 = real_exp2
    assert relative_l1(broken, exact) > 0.1


def _check_mode_bounds(family: str, s_img: int, modes: list[str]) -> dict:
    q, k, v = attention_family(family, heads=1, s_img=s_img)  # 512 text tokens + s_img
    exact = exact_attention(q, k, v)
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(t.to(torch.bfloat16) for t in (q, k, v)))
    errors = {"sdpa-bf16": relative_l1(sdpa.double(), exact)}
    for mode in modes:
        errors[mode] = relative_l1(emulate_ws(q, k, v, mode).double(), exact)
        bound = BOUNDS[mode][family] if mode in BOUNDS else 1.2 * errors["sdpa-bf16"]
        assert errors[mode] <= bound, (family, s_img, mode, errors)
    return errors


def test_ws_schedule_at_1440x512_within_each_modes_bound():
    """3392 tokens (1440×512 and the text: a partial last tile), random inputs."""
    errors = _check_mode_bounds("random", 2880, ["native", "int8"])
    assert errors["int8"] > errors["native"] > 0  # the 8-bit operands cost something, as they must


@pytest.mark.slow  # ~25 s: e4m3's truncated accumulator in torch, and 4608² float64 references
@pytest.mark.parametrize("family", ["random", "outliers"])
@pytest.mark.parametrize("s_img", [2880, 4096])  # 1440×512 and 1024×1024: 3392 and 4608 tokens
def test_ws_schedule_within_each_modes_bound_at_flux_sizes(family, s_img):
    _check_mode_bounds(family, s_img, ["native", "int8", "int8-fp8"])
