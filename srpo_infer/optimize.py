"""The one ordered place where optimizations are applied, to our pipeline and to any diffusers Flux
pipeline: LoRA (or a slot for per-request LoRAs) → fuse QKV → quantize → attention backend → context
parallelism → compile → step cache → memory placement. Each step is switchable from
:class:`PipelineConfig`, logged, and listed in ``steps`` so benchmarks can ablate them one at a time.
:func:`optimize` is the public form for a stock ``diffusers.FluxPipeline`` (or any pipeline with a Flux
transformer); :class:`SRPOPipeline` is built through :func:`apply_optimizations` too."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .attention import check_backend_available, check_heads_fit, set_attention_backend
from .compile import cache_key, compile_module, compile_regions, load_artifacts
from .config import PipelineConfig
from .quantize import check_quantize_available, quantize_module

if TYPE_CHECKING:
    from .runtime import ModelRuntime

log = logging.getLogger(__name__)


@dataclass
class Optimized:
    """What :func:`apply_optimizations` leaves: the model the loop calls (a
    :class:`~srpo_infer.runtime.ModelRuntime`: the transformer with its compile and hooks, the step cache,
    the request constants, context parallelism), the VAE decoder, and a record of what ran."""

    runtime: ModelRuntime
    vae_decode: Any
    steps: list[str] = field(default_factory=list)
    cache_file: Path | None = None  # where warm-up saves compiled artifacts
    scope: str | None = None  # "regional" | "full" when compiled
    memory_plan: Any = None  # a srpo_infer.memory.MemoryPlan (None: the weights were left where they were)
    residency: Any = None  # a srpo_infer.memory.Residency with memory="offload-model" in our loop

    @property
    def compiled(self) -> bool:
        return self.runtime.compiled

    @property
    def needs_dynamic_marks(self) -> bool:
        """Whole-graph compiles need their inputs' size-varying dims marked dynamic on every call;
        regions compile with ``dynamic=True`` and need nothing."""
        return self.runtime.dynamic_marks


def check_available(config: PipelineConfig) -> None:
    """Raise a clear error when a configured optimization cannot run on this machine (no fp8 tensor
    cores, no GPU for the kernels, a package missing); ``load_pipeline`` calls it before any weight loads."""
    check_backend_available(config.attention, config.device, config.attention_design)
    check_quantize_available(config.quantize, config.device)
    may_offload = config.memory == "auto" and config.device.type == "cuda"  # auto offloads on a small GPU
    if config.memory in ("offload-model", "offload-group") or may_offload:
        import importlib.util

        if importlib.util.find_spec("accelerate") is None:
            raise ValueError(
                f"memory={config.memory!r} offloads with diffusers' hooks, which need accelerate (a "
                "dependency of srpo-infer that is missing here): pip install accelerate"
            )
    if config.quantize_text_encoder:
        try:
            check_quantize_available("fp8-weight", config.device)
        except ValueError as exc:
            raise ValueError(str(exc).replace("quantize='fp8-weight'", "quantize_text_encoder=True")) from None


def apply_optimizations(
    flux,
    config: PipelineConfig,
    *,
    lora_state: dict | None = None,
    stock_cache: tuple[object, str] | None = None,
    stock: bool = False,
    memory_placement: bool = True,
) -> Optimized:
    """The one ordered function: apply ``config`` to ``flux`` (a diffusers ``FluxPipeline``) in place.

    LoRA → fuse QKV → quantize → attention backend → context parallelism → compile → step cache →
    memory placement. LoRA first: its keys name the unfused projections. The step cache (diffusers'
    cache hooks: ``stock_cache`` = (config, label) from :func:`~srpo_infer.step_cache.stock_cache` on a
    ``stock`` pipeline, the first-block cache per request in our loop) goes after the regional
    compile, so its hooks wrap the compiled blocks and run eagerly around them (no graph break, nothing
    new compiled when a step is skipped). Memory last: the weights it moves are the final ones.
    """
    transformer = flux.transformer
    check_heads_fit(config.attention, transformer)  # before anything changes
    steps = []
    if config.lora is not None:
        from .lora import apply_lora, max_rank, read_lora

        state = lora_state if lora_state is not None else read_lora(config.lora)
        if config.compile and not config.lora_fuse:  # swapping later must not recompile
            flux.enable_lora_hotswap(target_rank=config.lora_max_rank or max_rank(state))
        apply_lora(flux, state, config.lora_scale, fuse=config.lora_fuse)
        steps.append(f"lora:{'fused' if config.lora_fuse else 'separate'}({config.lora_scale:g})")
    if config.lora_slot:
        from .lora import MAX_REQUEST_RANK, add_slot

        layers = add_slot(flux, config.lora_slot, config.lora_max_rank or MAX_REQUEST_RANK)
        steps.append(f"lora_slot({layers} layers)")
    if config.fuse_qkv:
        # One GEMM instead of three per attention; compiled graphs gain most from it.
        transformer.fuse_qkv_projections()
        steps.append("fuse_qkv")
    if config.quantize:
        n = quantize_module(transformer, config.quantize, tuple(config.quantize_skip))
        steps.append(f"quantize:{config.quantize}({n} linears)")
    if config.quantize_text_encoder:
        quantize_module(flux.text_encoder_2, "fp8-weight", ())
        steps.append("quantize:t5:fp8-weight")
    set_attention_backend(transformer, config.attention, config.attention_design)
    design = f"({config.attention_design})" if config.attention != "sdpa" and config.attention_design != "auto" else ""
    steps.append(f"attention:{config.attention}{design}")
    context_parallel = None
    if config.context_parallel > 1:
        # After the processors exist (diffusers hands them its config) and before compile traces them.
        from .context_parallel import ContextParallel, plan_degrees

        degrees = plan_degrees(config.context_parallel, config.ring_degree, transformer.config.num_attention_heads)
        context_parallel = ContextParallel(transformer, degrees, config.device, config.attention)
        steps.append(f"context_parallel:{degrees.describe()}")
    transformer_fn, decode_fn, cache_file = _compile(flux, config, steps)
    step_cache = request_constants = None
    if stock and stock_cache is not None:
        from .cache_context import provide_cache_context

        transformer.enable_cache(stock_cache[0])
        provide_cache_context(transformer)  # most Flux pipelines open none; diffusers' hooks need one
        steps.append(stock_cache[1])
    elif not stock and context_parallel is None and not _whole_model_compile(config):
        # Left out split over processes (each would decide on its own tokens) and under the whole-model
        # compile (its one graph would break at the skip decision, and recompile per size after it).
        from .first_block_cache import RequestCache
        from .request_constants import RequestConstants

        step_cache = RequestCache(transformer)
        request_constants = RequestConstants(transformer)  # per request, as the cache: ours only
    memory_plan, residency = _apply_memory_mode(flux, config, stock) if memory_placement else (None, None)
    if memory_plan is not None and memory_plan.mode != "gpu":
        steps.append(f"memory:{memory_plan.mode}")
    log.info("optimizations: %s", " → ".join(steps))
    from .runtime import ModelRuntime

    scope = config.compile_scope if config.compile else None
    runtime = ModelRuntime(
        transformer_fn,
        guidance_embeds=bool(transformer.config.guidance_embeds),
        compiled=bool(config.compile),
        dynamic_marks=scope == "full",
        step_cache=step_cache,
        constants=request_constants,
        context_parallel=context_parallel,
    )
    return Optimized(
        runtime=runtime,
        vae_decode=decode_fn,
        steps=steps,
        cache_file=cache_file,
        scope=scope,
        memory_plan=memory_plan,
        residency=residency,
    )


def load_lora_after(flux, config: PipelineConfig, state: dict, scale: float) -> None:
    """A LoRA loaded after :func:`apply_optimizations` (``SRPOPipeline.load_lora``), under the rules its
    order set: swapped into the adapter already there (compiled: without recompiling, up to the rank it
    was prepared for), else loaded separate, and refused where fused QKV or a compile without an adapter
    to swap into leaves no place for it."""
    from .lora import LoraError, apply_lora, has_adapter, has_slot

    if has_slot(flux.transformer):
        raise LoraError(
            "this pipeline's LoRA slot (lora_slot) takes the adapters requests name in loras, one request at a "
            "time: name yours there, or build a pipeline with lora=FILE, lora_fuse=False to load your own"
        )
    swap = has_adapter(flux.transformer)
    if not swap and (config.compile or config.fuse_qkv):
        raise LoraError(
            "this pipeline fused QKV or compiled without a LoRA slot: load it with "
            "load_pipeline(..., lora=FIRST_LORA, lora_fuse=False) to swap LoRAs later"
        )
    apply_lora(flux, state, scale, fuse=False, hotswap=swap)


def _whole_model_compile(config: PipelineConfig) -> bool:
    return bool(config.compile) and config.compile_scope == "full"


def _compile(flux, config: PipelineConfig, steps: list[str]):
    """Compile in place (``regional``: the blocks, which the eager transformer then runs) or wrap the
    whole transformer and the VAE decoder (``full``). Returns what to call and the artifacts file."""
    transformer, vae = flux.transformer, flux.vae
    if not config.compile:
        return transformer, vae.decode, None
    cache_file = _compile_cache_file(transformer, config)
    how = dict(
        device=config.device, backend=config.compile_backend, mode=config.compile_mode, cuda_graphs=config.cuda_graphs
    )
    if config.compile_scope == "regional":
        compile_regions(transformer, **how)  # the VAE decodes once per image and stays eager
        transformer_fn, decode_fn = transformer, vae.decode
    else:
        transformer_fn = compile_module(transformer, **how)
        decode_fn = compile_module(vae.decode, **how)
    steps.append(f"compile:{config.compile_backend}:{config.compile_scope}:{config.compile_mode}")
    return transformer_fn, decode_fn, cache_file


def _compile_cache_file(transformer, config: PipelineConfig) -> Path | None:
    """Where warm-up saves the compiled artifacts for this model and configuration (loaded now if there)."""
    if config.cache_dir is None:
        return None
    key = cache_key(
        dict(
            model=dict(transformer.config),
            dtype=str(config.dtype),
            device=str(config.device),
            attention=config.attention,
            quantize=config.quantize,
            backend=config.compile_backend,
            scope=config.compile_scope,
            mode=config.compile_mode,
            cuda_graphs=config.cuda_graphs,
            context_parallel=config.context_parallel,
            ring_degree=str(config.ring_degree),
        )
    )
    cache_file = config.cache_dir / f"{key}.bin"
    load_artifacts(cache_file)
    return cache_file


def _apply_memory_mode(flux, config: PipelineConfig, stock: bool):
    """Put the components where the memory mode keeps them. Our loop moves whole components per stage
    (:class:`~srpo_infer.memory.Residency`); a stock pipeline gets diffusers' model offloading instead."""
    from .memory import Residency, component_bytes, move_components, plan_memory, weight_budget

    components = {name: getattr(flux, name) for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}
    plan = plan_memory(config.memory, config.device, component_bytes(components))
    if stock and plan.mode == "offload-model":
        flux.enable_model_cpu_offload(device=config.device)
    else:
        move_components(components, plan.mode, config.device)
    log.info("%s", plan.describe())
    if plan.mode != "offload-model" or stock:
        return plan, None
    return plan, Residency(components, config.device, weight_budget(config.device, plan.component_bytes))


# --------------------------------------------------------------------------- any diffusers Flux pipeline

OURS_ONLY = {
    "compile_scope": (
        "regional",
        "compile_scope='full' compiles the stages of srpo_infer's own denoising loop: on a "
        "stock pipeline use compile_scope='regional' (the default), or srpo_infer.load_pipeline(..., "
        "compile_scope='full')",
    ),
    "context_parallel": (
        1,
        "context parallelism with padding runs in srpo_infer's own loop: use "
        "srpo_infer.load_pipeline(..., context_parallel=N) under torchrun",
    ),
    "ring_degree": (
        "auto",
        "ring_degree goes with context_parallel, which runs in srpo_infer's own loop: use "
        "srpo_infer.load_pipeline(..., context_parallel=N, ring_degree=R) under torchrun",
    ),
}


def optimize(
    pipe,
    *,
    attention: str = "sdpa",
    quantize: str | None = None,
    compile: bool = False,
    acceleration: str | None = None,
    cache_threshold: float | None = None,
    cache: str | None = None,
    cache_steps: int = 28,
    memory: str | None = None,
    lora: str | None = None,
    lora_scale: float = 1.0,
    lora_fuse: bool = True,
    fuse_qkv: bool | str = "auto",
    **options,
) -> list[str]:
    """Make any diffusers pipeline whose ``transformer`` is a ``FluxTransformer2DModel`` faster, in place
    (``FluxPipeline``, Img2Img, Kontext, ControlNet pipelines, other Flux fine-tunes), in the same order
    and with the same options as :func:`srpo_infer.load_pipeline`; returns the steps applied.

    ``attention``: ``sdpa`` or our Triton kernels (``triton``, ``triton-int8``, ``triton-int8-fp8``).
    ``quantize``: ``fp8`` (torchao) or ``fp8-weight``. ``compile``: regional (the repeated blocks,
    every size from one set of graphs). ``acceleration``: ``regular``/``high`` turn on diffusers' first-block
    cache at 0.08/0.12 (``cache_threshold`` sets it directly), for every call of the pipeline;
    ``cache="taylorseer"`` or ``"magcache"`` (with ``cache_steps``, the calls' step count) take
    diffusers' TaylorSeer or MagCache instead, and alone apply it at its defaults
    (:func:`~srpo_infer.step_cache.stock_cache`).
    ``memory``: ``gpu``, ``offload-model`` (diffusers' model offloading), ``offload-group`` (None: leave
    the weights where they are). ``lora``: a LoRA file, folder or repo id. Also ``quantize_skip``,
    ``quantize_text_encoder``, ``compile_mode``, ``compile_backend``, ``cache_dir``, ``lora_max_rank``.

    >>> pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev")  # doctest: +SKIP
    >>> srpo_infer.optimize(pipe.to("cuda"), quantize="fp8", compile=True)     # doctest: +SKIP
    ['fuse_qkv', 'quantize:fp8(570 linears)', 'attention:sdpa', 'compile:inductor:regional:default']
    """
    from .config import PipelineConfig
    from .guards import check_cache_fits, resolve_fuse_qkv
    from .names import check_keywords
    from .step_cache import stock_cache

    transformer = _flux_transformer(pipe)
    refuse_ours_only(options)
    for name in OURS_ONLY:
        options.pop(name, None)
    check_keywords(
        optimize,
        options,
        extra=[
            "quantize_skip",
            "quantize_text_encoder",
            "compile_mode",
            "compile_backend",
            "cache_dir",
            "lora_max_rank",
        ],
    )
    fuse_qkv = resolve_fuse_qkv(transformer, fuse_qkv)
    param = next(transformer.parameters())
    config = PipelineConfig(
        model="(a diffusers pipeline)",
        base="(a diffusers pipeline)",
        device=param.device,
        dtype=param.dtype,
        attention=attention,
        quantize=quantize,
        compile=compile,
        memory=memory or "gpu",
        lora=lora,
        lora_scale=lora_scale,
        lora_fuse=lora_fuse,
        fuse_qkv=fuse_qkv,
        progress=False,
        **options,
    ).resolved()
    cached = stock_cache(
        acceleration, cache_threshold, cache, cache_steps, compiled=config.compile, cuda_graphs=config.cuda_graphs
    )
    check_cache_fits(pipe, None if cached is None else cache or "first-block")
    check_available(config)
    return optimize_stock(pipe, config, cached, memory_placement=memory is not None)


def optimize_stock(
    pipe, config: PipelineConfig, cached: tuple[object, str] | None, *, lora_state=None, memory_placement=True
) -> list[str]:
    """The one path that optimizes a stock diffusers pipeline, for :func:`optimize` (a pipeline the user
    built) and :func:`~srpo_infer.diffusers_pipeline` (one we loaded): :func:`apply_optimizations` with
    the stock cache, then the record and the guards of :func:`mark_optimized`. Returns the steps."""
    optimized = apply_optimizations(
        pipe, config, lora_state=lora_state, stock_cache=cached, stock=True, memory_placement=memory_placement
    )
    mark_optimized(pipe, optimized.steps)
    return optimized.steps


def mark_optimized(pipe, steps: list[str]) -> None:
    """Record on a stock pipeline what was applied (``pipe.srpo_steps``, as :func:`optimize` returns it),
    and remember what changed the transformer for good (fused, quantized, compiled, cached, a LoRA), so a
    second :func:`optimize` cannot apply it twice; an attention backend alone can be set again."""
    from .guards import guard_after_optimize

    pipe.srpo_steps = list(steps)
    if any(not step.startswith("attention:") for step in steps):
        pipe.transformer._srpo_optimized = steps
    guard_after_optimize(pipe.transformer, compiled=any(step.startswith("compile:") for step in steps))


def refuse_ours_only(options: dict) -> None:
    """One line naming the way that works for an option only our own loop runs (:data:`OURS_ONLY`)."""
    for name, (default, instead) in OURS_ONLY.items():
        if options.get(name, default) != default:
            raise ValueError(instead)


def _flux_transformer(pipe):
    """``pipe.transformer`` when it is a Flux transformer not optimized yet, else a one-line error."""
    from diffusers import FluxTransformer2DModel

    if hasattr(pipe, "optimized") and hasattr(pipe, "flux"):
        raise ValueError("an SRPOPipeline is optimized when it loads: pass the options to srpo_infer.load_pipeline")
    transformer = getattr(pipe, "transformer", None)
    if not isinstance(transformer, FluxTransformer2DModel):
        raise ValueError(
            f"optimize() takes a diffusers pipeline whose transformer is a FluxTransformer2DModel; "
            f"this {type(pipe).__name__}'s is {type(transformer).__name__}"
        )
    if getattr(transformer, "_srpo_optimized", None) is not None:
        raise ValueError(
            f"this pipeline is optimized already ({' → '.join(transformer._srpo_optimized)}): "
            "build a fresh one to optimize it differently"
        )
    return transformer
