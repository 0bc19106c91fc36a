"""Pipeline configuration: one dataclass that says what to load and how to run it."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .quantize import DEFAULT_SKIP, check_quantize_available

log = logging.getLogger(__name__)

DEFAULT_MODEL = "tencent/SRPO"
DEFAULT_BASE = "black-forest-labs/FLUX.1-dev"
TINY_RANDOM = "tiny-random"
FULL_RANDOM = "full-random"  # FLUX.1-dev sizes, random weights, built on the GPU
COMPILE_SCOPES = ("regional", "full")
COMPILE_MODES = ("default", "max-autotune")


def default_cache_dir() -> Path:
    """Where compiled artifacts persist: ``$SRPO_CACHE_DIR/compile``, else ``~/.cache/srpo_infer/compile``.

    Read when a config is made, never at import, so a process can set the variable late.
    """
    return Path(os.environ.get("SRPO_CACHE_DIR", Path.home() / ".cache" / "srpo_infer")) / "compile"


_DTYPES = {
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float32": torch.float32,
    "fp32": torch.float32,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when available, else CPU. A CUDA device without CUDA is a clear error."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available on this machine; use 'cpu'")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``None`` means bfloat16 on CUDA (the official SRPO setting) and float32 on CPU."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        return _DTYPES[dtype]
    if dtype not in _DTYPES.values():
        raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
    return dtype


@dataclass
class PipelineConfig:
    """What :func:`srpo_infer.load_pipeline` loads and how the pipeline runs.

    ``model`` is a Hugging Face repo id, a local folder, a single ``.safetensors`` file, or
    ``"tiny-random"``. ``base`` supplies VAE, text encoders, tokenizers and scheduler; ``"tiny-random"``
    pairs any transformer with the tiny in-code components.

    >>> PipelineConfig(model="tiny-random").resolved().device.type in ("cpu", "cuda")
    True
    """

    model: str = DEFAULT_MODEL
    base: str | None = None  # None: "tiny-random" for the tiny model, else DEFAULT_BASE
    device: torch.device | str | None = None
    dtype: torch.dtype | str | None = None
    max_sequence_length: int = 512
    attention: str = "auto"  # auto | sdpa | triton | triton-fp8
    quantize: str | None = "auto"  # auto | fp8 | fp8-weight | None
    quantize_skip: tuple[str, ...] = field(default_factory=lambda: DEFAULT_SKIP)
    quantize_text_encoder: bool = False  # T5 in fp8-weight: ~4.7 GB less memory
    compile: bool | str = "auto"  # auto: off until measured on a GPU (see resolve_compile)
    compile_scope: str = "regional"  # regional: the repeated blocks only | full: whole transformer + VAE decoder
    compile_mode: str = "default"  # default | max-autotune (GEMM + coordinate-descent tuning, CUDA graphs)
    compile_backend: str = "inductor"
    fuse_qkv: bool = False  # implied by compile
    cache_dir: Path | None = field(default_factory=default_cache_dir)  # compiled artifacts; None: do not persist
    progress: bool = True

    def resolved(self) -> PipelineConfig:
        """A copy with ``device``, ``dtype`` and ``base`` turned into concrete values."""
        from .attention import resolve_backend

        device = resolve_device(self.device)
        base = self.base
        if base is None:
            base = self.model if self.model in (TINY_RANDOM, FULL_RANDOM) else DEFAULT_BASE
        return PipelineConfig(
            model=os.fspath(self.model),
            base=os.fspath(base),
            device=device,
            dtype=resolve_dtype(self.dtype, device),
            max_sequence_length=self.max_sequence_length,
            attention=resolve_backend(self.attention, device),
            quantize=resolve_quantize(self.quantize, device),
            quantize_skip=tuple(self.quantize_skip),
            quantize_text_encoder=bool(self.quantize_text_encoder),
            compile=resolve_compile(self.compile, device),
            compile_scope=_one_of("compile_scope", self.compile_scope, COMPILE_SCOPES),
            compile_mode=_one_of("compile_mode", self.compile_mode, COMPILE_MODES),
            compile_backend=self.compile_backend,
            fuse_qkv=bool(self.fuse_qkv),
            cache_dir=Path(self.cache_dir).expanduser() if self.cache_dir is not None else None,
            progress=self.progress,
        )

    def describe(self) -> dict:
        """Plain-JSON view, for logs and benchmark records."""
        d = asdict(self)
        d["device"] = str(self.device)
        d["dtype"] = str(self.dtype).replace("torch.", "")
        d["quantize_skip"] = list(self.quantize_skip)
        d["cache_dir"] = None if self.cache_dir is None else str(self.cache_dir)
        return d


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def resolve_quantize(mode: str | None, device: torch.device) -> str | None:
    """``auto`` → no quantization, on every device, until the benchmark has measured fp8's deviation
    from bf16 on real SRPO weights (the model card warns naive fp8 can under-denoise)."""
    if mode == "auto":
        return None
    check_quantize_available(mode, device)
    return mode


def resolve_compile(value: bool | str, device: torch.device) -> bool:
    """``auto`` → eager, on every device, for now: the compiled GPU path (Inductor, CUDA graphs,
    dynamic sizes) has not run on a GPU yet, and a default must not be the first test of it. On a CPU
    compiling costs more than it saves. ``compile=True`` opts in."""
    if value == "auto":
        return False
    if not isinstance(value, bool):
        raise ValueError(f"compile must be True, False or 'auto', got {value!r}")
    return value
