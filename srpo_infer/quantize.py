"""fp8 quantization of the transformer's linear layers (and optionally the T5 encoder).

- ``fp8``: torchao ``Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())``: weights and
  activations in float8 e4m3 with per-row scales, real fp8 tensor-core GEMMs. Needs CUDA sm ≥ 89
  and pays off under ``torch.compile``.
- ``fp8-weight``: optimum-quanto ``qfloat8`` weight-only. Halves weight memory on any device, CPU
  included, but it is not a speed path: GEMMs still run in the compute dtype after dequantization
  (Marlin W8A16 kernels on sm ≥ 80), so it is usually slower than plain bf16.

The SRPO model card warns that naive fp8 can leave images under-denoised, so sensitive layers stay
in the compute dtype by default and the benchmark reports every quantized configuration's
deviation from bf16.
"""

from __future__ import annotations

import fnmatch
import logging

import torch

from .config import DEFAULT_QUANTIZE_SKIP, QUANTIZE_MODES

log = logging.getLogger(__name__)

DEFAULT_SKIP = DEFAULT_QUANTIZE_SKIP


def has_fp8_gemm(device: torch.device) -> bool:
    """True on CUDA devices with fp8 tensor cores (sm ≥ 89: Ada, Hopper, Blackwell)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def _skipped(name: str, skip: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in skip)


def quantizable_linears(model: torch.nn.Module, skip: tuple[str, ...] = DEFAULT_SKIP) -> list[str]:
    """Names of the ``nn.Linear`` layers that quantization would convert.

    >>> from srpo_infer.tiny import build_tiny_transformer
    >>> names = quantizable_linears(build_tiny_transformer())
    >>> "proj_out" in names, "single_transformer_blocks.0.proj_out" in names
    (False, True)
    """
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not _skipped(n, skip)]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by ``model``'s parameters, counting quantized weights at their stored size."""
    total = 0
    for p in model.parameters():
        data = getattr(p, "_data", None)  # optimum-quanto QTensor: fp8 payload + scale
        if data is not None:
            total += data.numel() * data.element_size() + p._scale.numel() * p._scale.element_size()
        else:
            total += p.numel() * p.element_size()
    return total


def check_quantize_available(mode: str | None, device: torch.device) -> None:
    """Raise a clear error when ``mode`` cannot run on ``device`` or its package is missing."""
    if mode is None:
        return
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be one of {['auto', *QUANTIZE_MODES, None]}, got {mode!r}")
    if mode == "fp8":
        if not has_fp8_gemm(device):
            raise ValueError(
                f"quantize='fp8' needs fp8 tensor cores (CUDA sm >= 89) and {device} has none; "
                "use quantize='fp8-weight' to save memory (weight-only, not faster)"
            )
        require_extra("torchao", "fp8")
    else:
        require_extra("optimum.quanto", "fp8-weight")


def require_extra(module: str, extra: str) -> None:
    """A one-line error naming the pip extra when ``module`` (a quantization backend) is missing."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # find_spec("optimum.quanto") imports "optimum" first
        found = False
    if not found:
        package = {"optimum.quanto": "optimum-quanto"}.get(module, module)
        raise ValueError(f"quantize={extra!r} needs {package}: pip install 'srpo-infer[{extra}]'")


def quantize_module(model: torch.nn.Module, mode: str, skip: tuple[str, ...] = DEFAULT_SKIP) -> int:
    """Quantize ``model``'s linear layers in place (except those matching ``skip``); returns how many."""
    names = quantizable_linears(model, skip)
    if mode == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

        chosen = set(names)
        quantize_(
            model,
            Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
            filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and fqn in chosen,
        )
    elif mode == "fp8-weight":
        from optimum.quanto import freeze, qfloat8, quantize

        excluded = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and _skipped(n, skip)]
        quantize(model, weights=qfloat8, exclude=excluded or None)
        freeze(model)
    else:
        raise ValueError(f"quantize must be one of {list(QUANTIZE_MODES)}, got {mode!r}")
    log.info("quantized %d linear layers to %s (kept %s in the compute dtype)", len(names), mode, list(skip))
    return len(names)
