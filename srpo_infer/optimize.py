"""The one ordered place where optimizations are applied: fuse QKV → quantize → attention backend →
context parallelism → compile. Each step is switchable from :class:`PipelineConfig`, logged, and listed in ``steps`` so
benchmarks can ablate them one at a time."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .attention import check_backend_available, set_attention_backend
from .compile import cache_key, compile_module, compile_regions, load_artifacts
from .config import PipelineConfig
from .quantize import check_quantize_available, quantize_module
from .step_cache import FluxStages

log = logging.getLogger(__name__)


@dataclass
class Optimized:
    """What the pipeline calls: the transformer (maybe compiled) and the VAE decoder."""

    transformer: Any
    vae_decode: Any
    stages: tuple[Any, Any, Any]  # front, rest, head of the first-block cache (each compiled separately)
    compiled: bool = False
    steps: list[str] = field(default_factory=list)
    cache_file: Path | None = None  # where warm-up saves compiled artifacts
    scope: str | None = None  # "regional" | "full" when compiled
    context_parallel: Any = None  # a srpo_infer.context_parallel.ContextParallel when the image is split

    @property
    def marks_inputs(self) -> bool:
        """Whole-graph compiles need their inputs' size-varying dims marked dynamic on every call;
        regions compile with ``dynamic=True`` and need nothing."""
        return self.compiled and self.scope == "full"


def check_available(config: PipelineConfig) -> None:
    """Raise a clear error when a configured optimization cannot run on this machine (no fp8 tensor
    cores, no GPU for the kernels, a package missing); ``load_pipeline`` calls it before any weight loads."""
    check_backend_available(config.attention, config.device)
    check_quantize_available(config.quantize, config.device)
    may_offload = config.memory == "auto" and config.device.type == "cuda"  # auto offloads on a small GPU
    if config.memory in ("offload-model", "offload-group") or may_offload:
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise ValueError(f"memory={config.memory!r} offloads with diffusers' hooks, which need accelerate (a "
                             "dependency of srpo-infer that is missing here): pip install accelerate")  # fmt: skip
    if config.quantize_text_encoder:
        try:
            check_quantize_available("fp8-weight", config.device)
        except ValueError as exc:
            raise ValueError(str(exc).replace("quantize='fp8-weight'", "quantize_text_encoder=True")) from None


def optimize(components: dict, config: PipelineConfig) -> Optimized:
    """Apply the configured optimizations to ``components`` in place, in the one fixed order."""
    check_available(config)
    transformer, vae = components["transformer"], components["vae"]
    steps = []
    if config.fuse_qkv:
        # One GEMM instead of three per attention; compiled graphs gain most from it.
        transformer.fuse_qkv_projections()
        steps.append("fuse_qkv")
    if config.quantize:
        n = quantize_module(transformer, config.quantize, tuple(config.quantize_skip))
        steps.append(f"quantize:{config.quantize}({n} linears)")
    if config.quantize_text_encoder:
        quantize_module(components["text_encoder_2"], "fp8-weight", ())
        steps.append("quantize:t5:fp8-weight")
    set_attention_backend(transformer, config.attention)
    steps.append(f"attention:{config.attention}")
    context_parallel = None
    if config.context_parallel > 1:
        # After the processors exist (diffusers hands them its config) and before compile traces them.
        from .context_parallel import ContextParallel, plan_degrees

        degrees = plan_degrees(config.context_parallel, config.ring_degree, transformer.config.num_attention_heads)
        context_parallel = ContextParallel(transformer, degrees, config.device, config.attention)
        steps.append(f"context_parallel:{degrees.describe()}")
    transformer_fn, decode_fn, cache_file = transformer, vae.decode, None
    split = FluxStages(transformer)
    stages = (split.front, split.rest, split.head)
    if config.compile:
        if config.cache_dir is not None:
            key = cache_key(
                dict(model=dict(transformer.config), dtype=str(config.dtype), device=str(config.device),
                     attention=config.attention, quantize=config.quantize, backend=config.compile_backend,
                     scope=config.compile_scope, mode=config.compile_mode, context_parallel=config.context_parallel,
                     ring_degree=str(config.ring_degree))
            )  # fmt: skip
            cache_file = config.cache_dir / f"{key}.bin"
            load_artifacts(cache_file)
        how = dict(device=config.device, backend=config.compile_backend, mode=config.compile_mode)
        if config.compile_scope == "regional":
            # The blocks are compiled in place, so the eager transformer and the step cache's eager
            # stages both run the compiled regions; the VAE decodes once per image and stays eager.
            compile_regions(transformer, **how)
        else:
            transformer_fn = compile_module(transformer, **how)
            decode_fn = compile_module(vae.decode, **how)
            # Step caching decides between the stages in Python, so each stage is its own full graph.
            stages = tuple(compile_module(fn, **how) for fn in stages)
        steps.append(f"compile:{config.compile_backend}:{config.compile_scope}:{config.compile_mode}")
    log.info("optimizations: %s", " → ".join(steps))
    scope = config.compile_scope if config.compile else None
    return Optimized(
        transformer_fn, decode_fn, stages, bool(config.compile), steps, cache_file, scope, context_parallel
    )
