"""Memory modes: where the pipeline's components live, so SRPO runs on the GPUs people own.

FLUX SRPO in bf16 is ~24 GB of transformer plus 9.5 GB of T5-XXL: all of it on a 24 GB card does not fit.

- ``gpu``: everything on the device (the fastest; the default when it fits).
- ``offload-model``: every component waits on the host and visits the device only for its stage
  (text encoders to encode, the transformer to denoise, the VAE to decode): the peak is the largest
  component, each generation moves the weights over PCIe (SRPO bf16: ~34 GB a generation).
- ``offload-group``: diffusers' group offloading, leaf level with CUDA streams: each layer's weights
  arrive just before it runs while the previous one computes; the peak is about the VAE plus a few
  layers, and every step streams the transformer's weights (slow, but it runs on small cards).
- ``auto``: ``gpu`` when everything fits the free device memory, else ``offload-model`` when the
  largest component fits, else ``offload-group``. The log says what was chosen and the expected peak.

With ``quantize="fp8-weight"`` the transformer halves (SRPO: ~12 GB), so ``offload-model`` fits a 16 GB
card. Offloading runs eager (``compile=False``); the fp8 GEMM path (``quantize="fp8"``) needs the
weights resident. Peak GPU memory and seconds per image of each mode are measured by ``srpo-infer
bench`` on a GPU; the estimates here are sums of parameter bytes plus an activation margin.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .config import MEMORY_MODES

log = logging.getLogger(__name__)

OFFLOADED = ("text_encoder", "text_encoder_2", "transformer", "vae")
# Parameters of FLUX.1-dev's base components (T5-XXL encoder, CLIP-L text model, VAE): what a real
# base weighs before it is loaded, for the ``auto`` decision.
FLUX_DEV_BASE_PARAMS = {"text_encoder_2": 4_762_310_656, "text_encoder": 123_060_480, "vae": 83_819_683}
MIN_MARGIN = 256 * 2**20


@dataclass(frozen=True)
class MemoryPlan:
    """The chosen mode, the component sizes it was chosen from, and the expected peak device memory."""

    mode: str
    component_bytes: dict[str, int]
    expected_peak_bytes: int
    reason: str

    def describe(self) -> str:
        """The log line; on a CPU it speaks of host memory, not of a device peak.

        >>> plan_memory("auto", torch.device("cpu"), {"transformer": 4 * 2**30}).describe()
        'memory: everything in host memory (cpu), about 4.3 GiB with activations'
        """
        peak = self.expected_peak_bytes / 2**30
        if self.reason.startswith("cpu"):  # no device memory to plan: say what the host holds
            return f"memory: everything in host memory (cpu), about {peak:.1f} GiB with activations"
        return f"memory={self.mode}: expected peak {peak:.1f} GiB on the device ({self.reason})"


def activation_margin(component_bytes: dict[str, int]) -> int:
    """Room for activations at the largest image (1536², 4 images) beside the weights: 8% of the
    transformer's bytes (SRPO bf16: 1.9 GB), at least 256 MiB."""
    return max(MIN_MARGIN, int(0.08 * component_bytes.get("transformer", 0)))


def expected_peak(mode: str, sizes: dict[str, int]) -> int:
    """Device bytes a mode needs at its peak: weights resident at once plus the activation margin."""
    margin = activation_margin(sizes)
    if mode == "gpu":
        return sum(sizes.values()) + margin
    if mode == "offload-model":
        return max(sizes.values()) + margin
    # offload-group: the VAE stays; the streamed layers hold about two transformer layers at a time.
    return sizes.get("vae", 0) + sizes.get("transformer", 0) // 20 + margin


def plan_memory(mode: str, device: torch.device, sizes: dict[str, int], free_bytes: int | None = None) -> MemoryPlan:
    """Choose where the components live (see the module docstring).

    >>> sizes = {"transformer": 24 * 2**30, "text_encoder_2": 9 * 2**30, "text_encoder": 2**28, "vae": 2**28}
    >>> cuda = torch.device("cuda")
    >>> plan_memory("auto", cuda, sizes, free_bytes=80 * 2**30).mode
    'gpu'
    >>> plan_memory("auto", cuda, sizes, free_bytes=30 * 2**30).mode
    'offload-model'
    >>> plan_memory("auto", cuda, sizes, free_bytes=16 * 2**30).mode
    'offload-group'
    """
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {list(MEMORY_MODES)}, got {mode!r}")
    if device.type != "cuda":  # an offload mode still runs its code with nothing to move: tests use that
        chosen = "gpu" if mode == "auto" else mode
        return MemoryPlan(chosen, sizes, expected_peak(chosen, sizes), f"{device}: the weights live in host memory")
    if mode != "auto":
        return MemoryPlan(mode, sizes, expected_peak(mode, sizes), "asked for")
    if free_bytes is None:
        free_bytes = torch.cuda.mem_get_info(device)[0]
    for choice in ("gpu", "offload-model", "offload-group"):
        need = expected_peak(choice, sizes)
        if need <= free_bytes or choice == "offload-group":
            why = f"{free_bytes / 2**30:.1f} GiB free on {device}; {need / 2**30:.1f} GiB needed"
            return MemoryPlan(choice, sizes, need, why)
    raise AssertionError("unreachable")


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers as stored (quantized weights at their stored size)."""
    from .quantize import weight_bytes

    return weight_bytes(module) + sum(b.numel() * b.element_size() for b in module.buffers())


def component_bytes(components: dict) -> dict[str, int]:
    """Bytes of each offloadable component."""
    return {name: module_bytes(components[name]) for name in OFFLOADED if name in components}


def estimate_bytes(transformer_params: int, base_params: dict[str, int], dtype: torch.dtype) -> dict[str, int]:
    """Component bytes before loading: parameter counts at the compute dtype's size."""
    size = torch.empty((), dtype=dtype).element_size()
    return {"transformer": transformer_params * size, **{k: n * size for k, n in base_params.items()}}


def move_components(components: dict, mode: str, device: torch.device) -> None:
    """Move the components where ``mode`` keeps them between stages (see :class:`Residency`):
    ``offload-group`` also installs diffusers' group-offloading hooks."""
    if mode == "gpu":
        for name in OFFLOADED:
            components[name].to(device)
    elif mode == "offload-model":
        for name in OFFLOADED:
            components[name].to("cpu")
    elif mode == "offload-group":
        from diffusers.hooks import apply_group_offloading

        components["vae"].to(device)
        for name in ("transformer", "text_encoder", "text_encoder_2"):
            components[name].to("cpu")  # the offload device: hooks bring each layer over when it runs
        # Leaf level: every Linear/Norm is its own group, so any call path (the step cache calls the
        # blocks directly) finds its weights on the device. Streams overlap the copies with compute;
        # record_stream lets the compute stream keep an onloaded weight alive instead of the host
        # synchronizing the stream at every offload (the 2026-12-07 audit counted ~1,300 waits a step).
        stream = device.type == "cuda"
        for name in ("transformer", "text_encoder", "text_encoder_2"):
            apply_group_offloading(
                components[name],
                onload_device=device,
                offload_device="cpu",
                offload_type="leaf_level",
                use_stream=stream,
                record_stream=stream,
            )
    else:
        raise ValueError(f"memory mode must be one of gpu, offload-model, offload-group, got {mode!r}")


# Which component leaves the device first when another needs room: T5 (needed again only for a prompt
# not in the prompt cache), CLIP, the VAE (small), and the transformer last (every request needs it).
EVICTION_ORDER = ("text_encoder_2", "text_encoder", "vae", "transformer")


class Residency:
    """``offload-model``: ``with residency.use("transformer"):`` brings the named components to the
    device, first sending others back to the host until they fit ``budget_bytes`` (device bytes for
    weights; ``None``: every other component leaves, so one stage's weights at a time).

    With a budget, what fits stays across stages and requests: on a card that holds the transformer
    and the VAE but not T5 as well, a request whose prompt is cached moves nothing at all.
    """

    def __init__(self, components: dict, device: torch.device, budget_bytes: int | None = None):
        self.components, self.device, self.budget = components, device, budget_bytes
        self.sizes = component_bytes(components)
        self.resident: set[str] = set()

    @contextmanager
    def use(self, *names: str) -> Iterator[None]:
        incoming = [name for name in names if name not in self.resident]
        need = sum(self.sizes.get(name, 0) for name in incoming)
        evicted = False
        for other in EVICTION_ORDER:
            if other in names or other not in self.resident:
                continue
            if self.budget is not None and sum(self.sizes.get(n, 0) for n in self.resident) + need <= self.budget:
                break
            self.components[other].to("cpu")
            self.resident.discard(other)
            evicted = True
        if evicted and self.device.type == "cuda":
            torch.cuda.empty_cache()  # give the freed blocks back before the next component arrives
        for name in incoming:
            self.components[name].to(self.device)
            self.resident.add(name)
        yield


def weight_budget(device: torch.device, sizes: dict[str, int]) -> int | None:
    """Device bytes ``offload-model`` may keep weights in: what is free with every component on the
    host, less the activation margin. ``None`` off CUDA (nothing to plan: one stage at a time)."""
    if device.type != "cuda":
        return None
    return max(0, torch.cuda.mem_get_info(device)[0] - activation_margin(sizes))
