"""Loading the base components (VAE, text encoders, tokenizers, scheduler) that SRPO reuses from
FLUX.1-dev, and the transformer, into one dict of pipeline parts."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .checkpoint import cached_snapshot, is_repo_id, load_transformer
from .config import FULL_RANDOM, TINY_RANDOM, PipelineConfig

log = logging.getLogger(__name__)

BASE_SUBFOLDERS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def load_base_components(base: str, dtype: torch.dtype, device: torch.device) -> dict:
    """VAE, CLIP-L, T5-XXL, both tokenizers and the scheduler from ``base``.

    ``base`` is a Hugging Face repo id or a local diffusers pipeline folder (both work offline when
    cached; ``HF_TOKEN`` opens gated repos such as FLUX.1-dev), or ``"tiny-random"``.

    >>> sorted(load_base_components("tiny-random", torch.float32, torch.device("cpu")))[0]
    'scheduler'
    """
    if base == TINY_RANDOM:
        from .tiny import build_tiny_base

        parts = build_tiny_base()
    else:
        parts = _load_pretrained_base(base, dtype)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        parts[name] = for_inference(parts[name], device, dtype)
    return parts


def for_inference(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """Move and cast a module for inference.

    Plain ``nn.Module.to``: diffusers' override warns about fp32-kept modules even when there are none
    (as for Flux's transformer and VAE) and the warning would greet every user.
    """
    return torch.nn.Module.to(module, device=device, dtype=dtype).eval().requires_grad_(False)


def _load_pretrained_base(base: str, dtype: torch.dtype) -> dict:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    if Path(base).expanduser().exists():
        base = str(Path(base).expanduser())
        absent = [s for s in BASE_SUBFOLDERS if not (Path(base) / s).is_dir()]
        if absent:
            raise ValueError(f"base folder {base!r} is not a FLUX.1 pipeline folder: it lacks the subfolders {absent}")
    else:  # a repo id: not cached and no way to download is one line now, not ~20 s of retries
        cached_snapshot(base, ["model_index.json", *(f"{s}/*" for s in BASE_SUBFOLDERS)], "base")
    loaders = {
        "vae": lambda: AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=dtype),
        "text_encoder": lambda: CLIPTextModel.from_pretrained(base, subfolder="text_encoder", torch_dtype=dtype),
        "text_encoder_2": lambda: T5EncoderModel.from_pretrained(base, subfolder="text_encoder_2", torch_dtype=dtype),
        "tokenizer": lambda: AutoTokenizer.from_pretrained(base, subfolder="tokenizer"),
        "tokenizer_2": lambda: AutoTokenizer.from_pretrained(base, subfolder="tokenizer_2"),
        "scheduler": lambda: FlowMatchEulerDiscreteScheduler.from_pretrained(base, subfolder="scheduler"),
    }
    parts = {}
    for name, load in loaders.items():
        try:
            parts[name] = load()
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"could not load the {name!r} component from base {base!r}: {exc}. FLUX.1-dev is gated: set "
                "HF_TOKEN, or pass a local copy of the pipeline folder as base"
            ) from exc
    return parts


def check_base(base: str) -> None:
    """Fail in a line, before any weight loads, when ``base`` is neither an existing folder nor a repo id."""
    if base in (TINY_RANDOM, FULL_RANDOM) or Path(base).expanduser().exists() or is_repo_id(base):
        return
    raise ValueError(f"base {base!r}: no such folder (and not a Hugging Face repo id such as owner/name)")


def load_components(config: PipelineConfig) -> dict:
    """Transformer plus base components for a resolved :class:`PipelineConfig`."""
    check_base(config.base)
    if config.model == FULL_RANDOM:
        from .full_random import build_full_random

        return build_full_random(config.device, config.dtype)
    transformer = load_model_transformer(config)
    parts = load_base_components(config.base, config.dtype, config.device)
    parts["transformer"] = transformer
    _check_compatible(parts)
    return parts


def estimate_component_bytes(config: PipelineConfig) -> dict[str, int]:
    """What each component will weigh on the device in the compute dtype, before loading any weight:
    the checkpoint's header (or the random model's config) for the transformer, FLUX.1-dev's sizes
    for a real base."""
    from .memory import FLUX_DEV_BASE_PARAMS, estimate_bytes

    def params(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    if config.model == FULL_RANDOM:
        from diffusers import FluxTransformer2DModel

        from .full_random import FLUX_DEV_TRANSFORMER

        with torch.device("meta"):
            transformer = params(FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER))
    elif config.model == TINY_RANDOM:
        from .tiny import build_tiny_transformer

        transformer = params(build_tiny_transformer())
    else:
        from .checkpoint import count_parameters

        transformer = count_parameters(config.model)
    if config.base == TINY_RANDOM:
        from .tiny import build_tiny_base

        base = {k: params(m) for k, m in build_tiny_base().items() if k in FLUX_DEV_BASE_PARAMS}
    else:
        base = dict(FLUX_DEV_BASE_PARAMS)
    return estimate_bytes(transformer, base, config.dtype)


def load_model_transformer(config: PipelineConfig) -> torch.nn.Module:
    """The transformer alone, as :func:`load_components` would load it: the same weights on every call
    (random models are seeded), so a benchmark can take a fresh one per configuration."""
    if config.model == FULL_RANDOM:
        from .full_random import build_full_random_transformer

        return build_full_random_transformer(config.device, config.dtype)
    if config.model == TINY_RANDOM:
        from .tiny import build_tiny_transformer

        transformer = for_inference(build_tiny_transformer(), config.device, config.dtype)
    else:
        transformer = load_transformer(config.model, dtype=config.dtype, device=config.device, progress=config.progress)
    return transformer.eval().requires_grad_(False)


def _check_compatible(parts: dict) -> None:
    """The transformer's input widths must match what the base's encoders and VAE produce."""
    t = parts["transformer"].config
    checks = [
        ("T5 width (joint_attention_dim)", t.joint_attention_dim, parts["text_encoder_2"].config.d_model),
        ("CLIP width (pooled_projection_dim)", t.pooled_projection_dim, parts["text_encoder"].config.hidden_size),
        ("latent channels × 4 (in_channels)", t.in_channels, parts["vae"].config.latent_channels * 4),
    ]
    for what, want, got in checks:
        if want != got:
            raise ValueError(
                f"the transformer does not fit this base: its {what} is {want} but the base gives {got}; "
                "pair the tiny model with base='tiny-random' and real weights with FLUX.1-dev"
            )


def flux_pipeline_class():
    """diffusers' ``FluxPipeline`` class, imported without the torchvision notices its module logs."""
    # FluxPipeline's module imports image processors that log torchvision notices; they are noise here.
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        from diffusers import FluxPipeline
    finally:
        hf_logging.set_verbosity(level)
    return FluxPipeline
