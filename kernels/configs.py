"""What the attention kernels can run: the kernel modes and the block sizes each GPU autotunes over.

The modes (what each quantises, the compute capability it needs), the launch configurations
(:class:`KernelConfig`) written per mode and architecture less those a Triton version spills on, the one
configuration the interpreter runs, and how far the pre-pass pads each head so every tile of every
candidate lies inside its buffers. :mod:`.launch` plans launches from these;
``benchmarks/kernel_static.py`` compiles every candidate for GPUs that are not here.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class Mode(NamedTuple):
    """What one kernel mode quantises, and the compute capability it needs."""

    qk_int8: bool  # q·kᵀ in INT8 (per-token scales, K smoothed)
    pv_fp8: bool  # p·v in e4m3 (per-channel V scales, two-level accumulation)
    min_capability: tuple[int, int]


MODES = {
    "native": Mode(False, False, (8, 0)),  # the input dtype's own tensor-core path (bf16, fp16 or fp32)
    "int8": Mode(True, False, (8, 0)),  # accurate 8-bit: INT8 q·kᵀ, p·v in the input dtype
    "int8-fp8": Mode(True, True, (8, 9)),  # fast 8-bit: INT8 q·kᵀ, e4m3 p·v (fp8 tensor cores)
}


def check_mode(mode: str) -> None:
    """A ``ValueError`` naming the modes, for any other name."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")


class KernelConfig(NamedTuple):
    """One launch configuration of ``_attention_kernel`` (the unit the sweep times)."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    @property
    def tag(self) -> str:
        """``128x64w4s3``: tiles, warps, pipeline stages."""
        return f"{self.block_m}x{self.block_n}w{self.num_warps}s{self.num_stages}"


C = KernelConfig
# The autotuner's candidates per mode and architecture, each checked by benchmarks/kernel_static.py
# (CI): it compiles every one for its target and fails on a spill, on shared memory over the limit,
# or on a compile error. Hopper (sm90, 227 KiB of shared memory per block): on the H200 (2026-11-26)
# the autotuner picked 128x128, 8 warps, 3 stages for the native kernel (bf16), so that comes first; 4 stages of
# 128x128 bf16 tiles need 288 KiB and can never launch, so there is none. The 8-bit modes halve (q, k)
# or quarter (int8-fp8) the tile bytes, which buys a 4th stage. Ampere and Ada (sm80/sm89, 163/99 KiB):
# 128x64 with 4 warps needs 255 registers and spills on sm80, so wide tiles run with 8 warps there.
_HOPPER = {
    "native": (C(128, 128, 8, 3), C(128, 64, 4, 3), C(128, 64, 8, 4), C(64, 128, 4, 3), C(64, 64, 4, 3)),
    "int8": (C(128, 128, 8, 3), C(128, 128, 8, 4), C(128, 64, 8, 3), C(64, 128, 4, 3)),
    "int8-fp8": (C(128, 128, 8, 3), C(128, 128, 8, 4), C(128, 64, 8, 3), C(64, 128, 4, 3)),
}
_AMPERE = {
    "native": (C(128, 64, 8, 3), C(128, 32, 4, 3), C(64, 64, 4, 3), C(64, 32, 4, 4)),
    "int8": (C(128, 64, 8, 3), C(64, 64, 4, 3), C(64, 32, 4, 4)),  # 128x32w4s3 spills on sm89; 64x128 needs 121 KiB
    "int8-fp8": (C(128, 64, 8, 3), C(64, 64, 4, 3), C(64, 128, 4, 3)),
}
# Configurations dropped under one Triton (major.minor) and architecture, because that version's
# compiler makes them spill: found by benchmarks/kernel_static.py, which compiles every version in its
# matrix (results in benchmarks/results/static-2026-11-30).
_DROPPED: dict[tuple[str, str, str], tuple[KernelConfig, ...]] = {
    # triton 3.7 (what the CUDA build of torch 2.13 pins): the pointer build needs 255 registers and spills
    # 8 bytes per thread (3.6: 255, 3.9: 254, neither spills; the tma build: 254). Lists are per mode, so
    # both designs lose it.
    ("3.7", "sm90", "native"): (C(128, 64, 4, 3),),
}
# The ws design (ws_attention.py, Gluon, sm_90a only) runs one configuration per mode, not an autotuned
# list: block_m is a CTA's query rows, two consumer warpgroups of block_m / 2 each; num_warps is a
# consumer's 4 (the loader adds one warp); num_stages the depth of the K and V rings. Compiled for sm_90a
# (benchmarks/kernel_static.py, triton 3.9, 2026-12-07): 128-key tiles spill in native (52-60 bytes per
# thread once the first and last tiles are masked; 0 without the mask) and in int8-fp8 (3.3 KB), not in
# int8; 64-key tiles spill in none, and their rings are small enough for a third stage.
WS_CONFIGS = {
    "native": C(128, 64, 4, 3),
    "int8": C(128, 128, 4, 2),
    "int8-fp8": C(128, 64, 4, 3),
}
WS_REGISTERS = (240, 24)  # setmaxnreg per thread: the consumers', the loader's (FlashAttention-3's split)
WS_MIN_TRITON = (3, 6)  # gl.warp_specialize's current signature


def triton_minor() -> tuple[int, int]:
    """The imported Triton's (major, minor)."""
    return tuple(int(x) for x in triton.__version__.split(".")[:2])


def ws_refusal(device: torch.device) -> str | None:
    """Why the ``ws`` design cannot run on ``device`` (None: it can). Gluon has no interpreter and the
    kernel is written for Hopper's wgmma, TMA and setmaxnreg."""
    where = None
    if interpreting():
        where = "under TRITON_INTERPRET=1 (Gluon has no interpreter)"
    elif device.type != "cuda":
        where = f"on {device.type}"
    elif torch.cuda.get_device_capability(device)[0] != 9:
        major, minor = torch.cuda.get_device_capability(device)
        where = f"on sm_{major}{minor}"
    elif triton_minor() < WS_MIN_TRITON:
        return f"attention_design='ws' needs triton >= 3.6 (Gluon's warp_specialize), this is {triton.__version__}"
    if where is None:
        return None
    return (
        f"attention_design='ws' runs on Hopper GPUs only (sm_90: H100, H200), not {where}; "
        "use attention_design='pointer' or attention_design='tma'"
    )


# Under the interpreter every program is numpy work: small tiles (odd lengths still cross tile edges).
INTERPRETER_CONFIG = KernelConfig(16, 16, 1, 1)
# The pre-pass and the stats pass: rows per program and warps. Memory-bound, but a [rows, 128] fp32
# tile of q, k and their RoPE partners lives in registers: 64 rows on 4 warps spilled 6.9 KB per
# thread on sm90 (benchmarks/results/static-2026-11-29); 32 rows on 8 warps fits.
PROLOGUE_ROWS, PROLOGUE_WARPS = 32, 8
STATS_CHUNKS = 8  # programs per head in the stats pass (a power of two: the pre-pass reduces them at once)


def device_capability(device: torch.device | None = None) -> tuple[int, int]:
    """The compute capability whose candidates run: the GPU's, or Hopper's where there is none."""
    on_gpu = torch.cuda.is_available() if device is None else device.type == "cuda"
    if on_gpu:
        return torch.cuda.get_device_capability(device)
    return (9, 0)


def candidates(mode: str, capability: tuple[int, int] | None = None) -> tuple[KernelConfig, ...]:
    """The autotuner's configurations for this mode and GPU (one under the interpreter)."""
    if interpreting():
        check_mode(mode)
        return (INTERPRETER_CONFIG,)
    return gpu_candidates(mode, capability or device_capability())


def all_gpu_candidates(mode: str, capability: tuple[int, int]) -> tuple[KernelConfig, ...]:
    """Every configuration written for this mode and compute capability, under any Triton."""
    check_mode(mode)
    return (_HOPPER if capability >= (9, 0) else _AMPERE)[mode]


def gpu_candidates(
    mode: str, capability: tuple[int, int], triton_version: str | None = None
) -> tuple[KernelConfig, ...]:
    """The configurations a GPU of this compute capability autotunes over under this Triton (default: the
    one imported): :func:`all_gpu_candidates` less those :data:`_DROPPED` for its version. What the static
    check compiles and requires to be free of spills."""
    version = ".".join((triton_version or triton.__version__).split(".")[:2])
    arch = "sm90" if capability >= (9, 0) else f"sm{capability[0]}{capability[1]}"
    dropped = _DROPPED.get((version, arch, mode), ())
    return tuple(c for c in all_gpu_candidates(mode, capability) if c not in dropped)


def padding(configs: Sequence[KernelConfig]) -> int:
    """Rows the pre-pass pads each head to a multiple of: every tile of every configuration then lies
    inside the buffers, so the attention loop loads without masks. Block sizes are powers of two, so the
    largest is a multiple of all."""
    return max(max(c.block_m, c.block_n) for c in configs)
