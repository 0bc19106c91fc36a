"""``load_pipeline`` and the cached module-level ``generate``."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import replace

import torch

from .config import DEFAULT_MODEL, PipelineConfig
from .names import check_keywords
from .pipeline import SRPOPipeline
from .request import MAX_SEQUENCE_LENGTH
from .result import GenerationResult

log = logging.getLogger(__name__)


def load_pipeline(
    model: str = DEFAULT_MODEL,
    base: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    max_sequence_length: int = 512,
    attention: str = "auto",
    quantize: str | None = "auto",
    compile: bool | str = "auto",
    progress: bool = True,
    **options,
) -> SRPOPipeline:
    """Load SRPO (or any Flux transformer checkpoint) with the FLUX.1-dev base components.

    ``model``: Hugging Face repo id (default ``tencent/SRPO``), local folder, single ``.safetensors``
    file (diffusers or BFL key names), or ``"tiny-random"`` (tiny random model built in code).
    ``base``: where VAE, text encoders, tokenizers and scheduler come from (default FLUX.1-dev, or the
    tiny ones for ``"tiny-random"``). ``device`` defaults to CUDA when available; ``dtype`` to bfloat16
    on CUDA and float32 on CPU. ``attention``: ``sdpa``, ``triton``, ``triton-int8`` or
    ``triton-int8-fp8`` (our kernels); ``auto`` is ``sdpa`` until they are measured faster on the
    device. ``quantize``: ``fp8`` (torchao, CUDA sm ≥ 89), ``fp8-weight`` (optimum-quanto, any device,
    memory only) or ``None``;
    ``auto`` is ``None`` until fp8's deviation is measured on real weights. ``compile``: torch.compile
    the transformer's repeated blocks (``compile_scope="regional"``, the default; the VAE stays eager),
    or the whole transformer and the VAE decoder (``compile_scope="full"``); ``auto``: off until
    measured on a GPU. ``context_parallel=N`` splits
    each image's tokens over N processes, one per GPU, started by ``torchrun --nproc-per-node N`` (every
    rank calls this and ``generate`` alike; :attr:`SRPOPipeline.rank` 0 saves); ``ring_degree`` how many
    of them pass keys around a ring (``auto``: Ulysses as far as the heads divide). Other
    :class:`PipelineConfig` fields (``quantize_skip``, ``quantize_text_encoder``, ``compile_scope``,
    ``compile_mode``, ``compile_backend``, ``fuse_qkv``, ``cache_dir``, ``memory``, ``lora``,
    ``lora_scale``, ``lora_fuse``, ``lora_max_rank``, ``context_parallel``, ``ring_degree``) pass through
    ``options``.

    >>> pipe = load_pipeline("tiny-random", progress=False)
    >>> pipe.generate("a cat", width=512, height=512, seed=1, num_inference_steps=1).images[0].size
    (512, 512)
    """
    if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise ValueError(f"max_sequence_length must be in [1, {MAX_SEQUENCE_LENGTH}], got {max_sequence_length}")
    from dataclasses import fields

    check_keywords(load_pipeline, options, extra=[f.name for f in fields(PipelineConfig)])
    config = PipelineConfig(
        model=os.fspath(model),
        base=base,
        device=device,
        dtype=dtype,
        max_sequence_length=max_sequence_length,
        attention=attention,
        quantize=quantize,
        compile=compile,
        progress=progress,
        **options,
    ).resolved()
    config, components, lora_state = _load(config)
    pipe = SRPOPipeline(components, config, lora_state)
    log.info("srpo_infer pipeline ready: %s", config.describe())
    return pipe


def assemble_pipeline(components: dict, config: PipelineConfig) -> SRPOPipeline:
    """An :class:`SRPOPipeline` over components already loaded, such as a benchmark's shared encoders
    and VAE around a freshly loaded transformer: the checks :func:`load_pipeline` makes (options
    available on this machine, the memory mode), none of its loading. ``config`` is resolved."""
    from .optimize import check_available

    check_available(config)
    return SRPOPipeline(components, _choose_memory(config))


def diffusers_pipeline(
    model: str = DEFAULT_MODEL,
    base: str | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    acceleration: str | None = None,
    cache_threshold: float | None = None,
    cache: str | None = None,
    cache_steps: int = 28,
    progress: bool = False,
    **options,
):
    """SRPO as a stock ``diffusers.FluxPipeline``: the transformer our loader built (every form of SRPO
    :func:`load_pipeline` takes: the fp32 hub repo, BFL names, fp8 files, GGUF, a LoRA on FLUX.1-dev, or
    ``tiny-random``; streamed with bounded host memory), the base components, and the same options,
    applied by :func:`srpo_infer.optimize`. Call it as any diffusers pipeline.

    ``acceleration`` (``regular``/``high``) or ``cache_threshold`` turn on diffusers' first-block cache
    for every call (``cache="taylorseer"``/``"magcache"``: those instead, see :func:`srpo_infer.optimize`).
    What was applied is in ``pipe.srpo_steps`` (the list :func:`srpo_infer.optimize` returns).
    ``compile_scope="full"`` and ``context_parallel`` run only in our loop
    (:func:`load_pipeline`) and are refused here.

    >>> pipe = diffusers_pipeline("tiny-random")
    >>> type(pipe).__name__, pipe.srpo_steps
    ('FluxPipeline', ['attention:sdpa'])
    >>> import torch
    >>> seeded = torch.Generator().manual_seed(0)
    >>> pipe("a cat", height=256, width=256, num_inference_steps=1, generator=seeded).images[0].size
    (256, 256)
    """
    from dataclasses import fields

    from .components import flux_pipeline_class
    from .optimize import optimize_stock, refuse_ours_only
    from .step_cache import stock_cache

    check_keywords(diffusers_pipeline, options, extra=[f.name for f in fields(PipelineConfig)])
    refuse_ours_only(options)
    config = PipelineConfig(
        model=os.fspath(model), base=base, device=device, dtype=dtype, progress=progress, **options
    ).resolved()
    cached = stock_cache(
        acceleration, cache_threshold, cache, cache_steps, compiled=config.compile, cuda_graphs=config.cuda_graphs
    )
    config, components, lora_state = _load(config)
    flux = flux_pipeline_class()(**components)
    flux.set_progress_bar_config(disable=not progress)
    optimize_stock(flux, config, cached, lora_state=lora_state)
    return flux


def _load(config: PipelineConfig) -> tuple[PipelineConfig, dict, dict | None]:
    """Everything that can fail fast, then the weights: the options available on this machine (a missing
    GPU feature or package fails in a second), the process group, the LoRA read, the memory mode, and the
    components (on the host when they will be offloaded)."""
    from .components import load_components
    from .optimize import check_available

    check_available(config)
    if config.context_parallel > 1:  # likewise a missing launcher; and each rank gets its own GPU
        from .context_parallel import init_process_group

        config = replace(config, device=init_process_group(config.context_parallel, config.device))
    lora_state = None
    if config.lora is not None:  # likewise a missing or unreadable LoRA
        from .lora import read_lora

        lora_state = read_lora(config.lora)
    config = _choose_memory(config)
    load_on = config if config.memory == "gpu" else replace(config, device=torch.device("cpu"))
    return config, load_components(load_on), lora_state


def _choose_memory(config: PipelineConfig) -> PipelineConfig:
    """Resolve ``memory="auto"`` before loading, from the components' estimated sizes and the free
    device memory (so a model that does not fit is never loaded onto the device whole)."""
    from .components import estimate_component_bytes
    from .memory import plan_memory

    if config.memory != "auto":
        return config
    if config.device.type != "cuda":
        return replace(config, memory="gpu")
    plan = plan_memory("auto", config.device, estimate_component_bytes(config))
    if plan.mode != "gpu" and config.context_parallel > 1:
        raise ValueError(
            f"the pipeline does not fit {config.device} ({plan.reason}) and context_parallel holds the "
            "whole transformer on every GPU: use GPUs with more memory, or quantize='fp8'"
        )
    if plan.mode != "gpu" and (config.compile or config.quantize == "fp8"):
        raise ValueError(
            f"the pipeline does not fit {config.device} ({plan.reason}) and compile / quantize='fp8' need the "
            "weights resident: use compile=False and quantize='fp8-weight' so memory='auto' can offload, or a "
            "larger GPU"
        )
    log.info("%s", plan.describe())
    return replace(config, memory=plan.mode)


_default: dict[str, SRPOPipeline] = {}
_default_lock = threading.Lock()


def default_pipeline() -> SRPOPipeline:
    """The pipeline behind :func:`generate`, built once per ``SRPO_MODEL`` value (default ``tencent/SRPO``)."""
    model = os.environ.get("SRPO_MODEL", DEFAULT_MODEL)
    with _default_lock:
        if model not in _default:
            _default[model] = load_pipeline(model)
        return _default[model]


def generate(prompt: str, **kwargs) -> GenerationResult:
    """Generate with the default pipeline, loading it on first use; the keywords of
    :meth:`SRPOPipeline.generate`.

    >>> import os; os.environ["SRPO_MODEL"] = "tiny-random"
    >>> generate("a cat", width=512, height=512, seed=3, num_inference_steps=1, progress=False).seed
    3
    """
    check_keywords(SRPOPipeline.generate, kwargs)  # before the (long) first load, not after
    return default_pipeline().generate(prompt, **kwargs)
