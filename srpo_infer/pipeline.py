"""The SRPO pipeline: prompt encoding, noise, the denoising loop (:mod:`srpo_infer.denoise`) and VAE
decoding, with per-stage timings. Flux math is diffusers' (``FluxPipeline``'s prompt encoding, latent
packing, position ids); a test checks our latents equal ``FluxPipeline.__call__``'s."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import secrets
import threading
import time
import warnings
from collections.abc import Callable

import torch

from .attention import KERNEL_MODES
from .compile import compiled_graphs, save_artifacts
from .components import flux_pipeline_class
from .config import PipelineConfig
from .denoise import (
    DenoiseInputs,
    DenoiseResult,
    EncodedPrompt,
    GenerationCancelled,
    LoopOptions,
    denoise,
    schedule,
)
from .preview import LinearDecoder, Preview, check_previews, fit_linear_decoder, preview_steps
from .prompt_cache import PromptCache
from .request import MAX_SIDE, MAX_STEPS, MIN_SIDE, GenerationRequest, request_from_fields, takes_request_fields
from .result import GenerationResult, StageClock, pil_images
from .step_cache import request_threshold

log = logging.getLogger(__name__)

# GenerationCancelled is raised by the loop (denoise.py) and caught by servers as the pipeline's.
__all__ = ["GenerationCancelled", "PromptTruncatedWarning", "SRPOPipeline", "attention_warmup_sizes"]


@contextlib.contextmanager
def _quiet_truncation_logs():
    """transformers and diffusers each log a long prompt's dropped text (twice, in full)."""
    names = ("transformers.tokenization_utils_base", "diffusers.pipelines.flux.pipeline_flux")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


class PromptTruncatedWarning(UserWarning):
    """The prompt is longer than the T5 encoder's token limit; the tail is ignored."""


# One image size per attention autotuning bucket (srpo_infer.attention.kernel_bucket), with 512 text
# tokens: 1536, 3584, 6656 and 9728 tokens fall in the 2048, 4096, 8192 and 16384 buckets.
BUCKET_SIZES = ((512, 512), (1024, 768), (1536, 1024), (1536, 1536))


def attention_warmup_sizes(sizes: list[tuple[int, int]], text_tokens: int) -> list[tuple[int, int]]:
    """Sizes to add to a warm-up of ``sizes`` so every attention autotuning bucket is covered."""
    from .attention import kernel_bucket

    def bucket(width: int, height: int) -> int:
        return kernel_bucket(text_tokens + (width // 16) * (height // 16))

    covered = {bucket(w, h) for w, h in sizes}
    return [size for size in BUCKET_SIZES if bucket(*size) not in covered]


class SRPOPipeline:
    """A loaded SRPO (Flux) pipeline. Build it with :func:`srpo_infer.load_pipeline`.

    >>> pipe = load_pipeline(model="tiny-random")                              # doctest: +SKIP
    >>> pipe.generate("a T-Rex on a beach", width=1440, height=512, seed=1).images[0].size  # doctest: +SKIP
    (1440, 512)
    """

    def __init__(self, components: dict, config: PipelineConfig, lora_state: dict | None = None):
        from .optimize import apply_optimizations

        self.config = config
        self.flux = flux_pipeline_class()(**components)
        self.flux.set_progress_bar_config(disable=True)
        self._lock = threading.RLock()  # one generation at a time: the modules are shared state
        self.optimized = apply_optimizations(self.flux, config, lora_state=lora_state)
        self.prompt_cache = PromptCache(config.prompt_cache_mb * 2**20)
        self.memory_plan, self._residency = self.optimized.memory_plan, self.optimized.residency

    # ------------------------------------------------------------------ LoRA

    def load_lora(self, source, scale: float = 1.0) -> None:
        """Load a LoRA (file, folder or repo id; diffusers, kohya or BFL key names) kept separate, so
        :meth:`set_lora_scale` and another ``load_lora`` can change it. A pipeline built with
        ``lora=..., lora_fuse=False`` swaps in place (with ``compile=True``: without recompiling, up to
        the rank it was built for, ``lora_max_rank``).

        >>> pipe.load_lora("loras/srpo-rank64.safetensors", scale=0.8)  # doctest: +SKIP
        """
        from .lora import read_lora
        from .optimize import load_lora_after

        state = read_lora(source)
        with self._lock:
            load_lora_after(self.flux, self.config, state, scale)

    def set_lora_scale(self, scale: float) -> None:
        """The strength of the separate LoRA (0 = as without it)."""
        self._require_lora().set_adapters(["srpo"], [float(scale)])

    def fuse_lora(self) -> None:
        """Merge the separate LoRA into the weights at its scale (faster steps; :meth:`unfuse_lora` undoes it)."""
        self._require_lora().fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=["srpo"])

    def unfuse_lora(self) -> None:
        """Take a merged LoRA back out of the weights."""
        self._require_lora().unfuse_lora(components=["transformer"])

    @property
    def lora_cache(self):
        """Per-request adapters read so far, kept in host memory (:class:`~srpo_infer.lora.LoraCache`)."""
        if getattr(self, "_lora_cache", None) is None:
            from .lora import LoraCache

            self._lora_cache = LoraCache()
        return self._lora_cache

    def _request_loras(self, loras: tuple[tuple[str, float], ...]):
        if not loras:
            return contextlib.nullcontext()
        from .lora import request_adapter

        return request_adapter(self, loras)

    def _require_lora(self):
        from .lora import LoraError, has_adapter, has_slot

        if has_slot(self.transformer):
            raise LoraError("this pipeline's LoRA slot serves the loras requests name; no LoRA of its own is loaded")
        if not has_adapter(self.transformer):
            raise LoraError("no separate LoRA is loaded (a fused one is part of the weights)")
        return self.flux

    # Components, for code that wants to reach in.
    @property
    def transformer(self):
        """The Flux transformer (``diffusers.FluxTransformer2DModel``)."""
        return self.flux.transformer

    @property
    def vae(self):
        """The VAE."""
        return self.flux.vae

    @property
    def device(self) -> torch.device:
        """Where the pipeline runs."""
        return self.config.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype."""
        return self.config.dtype

    @property
    def context_parallel(self):
        """The :class:`~srpo_infer.context_parallel.ContextParallel` state when the image is split over
        processes (``context_parallel=N``), else None."""
        return self.optimized.runtime.context_parallel

    @property
    def rank(self) -> int:
        """This process's rank when the image is split over processes (``context_parallel``), else 0.
        Every rank generates; rank 0 is the one that should save or answer."""
        cp = self.context_parallel
        return 0 if cp is None else cp.rank

    @takes_request_fields
    def generate(
        self,
        prompt: str | GenerationRequest,
        *,
        image_size: str | dict | None = None,
        progress: bool | None = None,
        cache_threshold: float | None = None,
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int, torch.Tensor], None] | None = None,
        previews: int = 0,
        on_preview: Callable[[Preview], None] | None = None,
        **request,
    ) -> GenerationResult:
        """Generate ``num_images`` images of ``width``×``height`` (default 1024×768) for ``prompt``.

        The request's keywords are the fields of :class:`~srpo_infer.request.GenerationRequest`
        (``width``, ``height``, ``seed``, ``num_inference_steps``, ``guidance_scale``, ``num_images``,
        ``acceleration``; the ``flux/srpo`` rules, see :func:`srpo_infer.request.validate_request`), or
        ``prompt`` may be a whole ``GenerationRequest`` (what the server and the CLI build).
        ``image_size`` takes a preset name, ``"WIDTHxHEIGHT"`` or ``{"width", "height"}`` instead of
        the two sides. Image ``i`` uses seed ``seed + i``; ``seed=None`` draws a random one, reported in
        the result. ``acceleration``: ``none`` (exact), ``regular`` or ``high`` first-block caching (see
        :mod:`srpo_infer.step_cache`); ``cache_threshold`` sets the cache's threshold directly (research).
        ``result.transformer_evaluations`` counts the full transformer evaluations. ``should_stop`` is
        asked before every denoising step; when it returns true, :class:`GenerationCancelled` is raised
        (a server stops the job of a client that hung up this way). ``on_step(step, latents)`` is called
        after each denoising step (0-based) with the packed latents ``(num_images, image_tokens,
        in_channels)`` (see :meth:`generate_latents`); keep a ``.clone()``, the loop reuses them.
        ``previews=N`` calls ``on_preview(preview)`` N times at evenly spread steps (never the last; fewer
        when there are not N - 1 steps before it) with a :class:`~srpo_infer.preview.Preview`: a cheap
        linear RGB sketch of the current clean-image estimate at the requested size (see
        :mod:`srpo_infer.preview`); the final images are the same with or without previews.

        >>> r = pipe.generate("a T-Rex on a beach", width=1440, height=512, seed=490733907)  # doctest: +SKIP
        >>> r.images[0].size, r.seed                                                        # doctest: +SKIP
        ((1440, 512), 490733907)
        """
        if isinstance(prompt, GenerationRequest):  # checked when it was built: trusted as it is
            if request or image_size is not None:
                raise ValueError("pass either a GenerationRequest or the request's fields, not both")
            req = prompt
        else:
            req = request_from_fields(prompt, image_size=image_size, **request)  # names checked by the decorator
        cp = self.context_parallel
        if req.seed is None:  # with context parallelism rank 0 draws it for all: every rank needs the same noise
            seed = secrets.randbelow(2**32)
            req = req.with_fields(seed=seed if cp is None else cp.broadcast(seed))
        loop = LoopOptions(
            self.config.progress if progress is None else progress,
            request_threshold(req.acceleration, cache_threshold),
            should_stop,
            on_step,
        )
        previews = check_previews(previews, on_preview, MAX_STEPS)
        with self._lock, self._request_loras(req.loras), torch.inference_mode():
            if previews:
                loop = dataclasses.replace(loop, preview=self._previewer(req, previews, on_preview))
            clock = StageClock(self.device)
            denoised = self._run(req, loop, clock)
            images = self.decode(denoised.latents, req.width, req.height)
            clock.mark("decode")
            timings = clock.seconds()  # no wait between stages: the decode's copy to the host waited
        timings["inference"] = timings["encode"] + timings["denoise"] + timings["decode"]
        return GenerationResult(
            images=images,
            request=req,
            timings=timings,
            has_nsfw_concepts=[None] * req.num_images,
            tokens_used=req.num_images * req.image_tokens + denoised.text_tokens,
            transformer_evaluations=denoised.transformer_evaluations,
        )

    def preview_decoder(self) -> LinearDecoder:
        """The linear latent → RGB map previews use, fitted against this pipeline's VAE on first use."""
        if getattr(self, "_preview_decoder", None) is None:
            with self._lock, self._stage("vae"):
                self._preview_decoder = fit_linear_decoder(self.flux, self.device, self.dtype)
        return self._preview_decoder

    def _previewer(self, req: GenerationRequest, previews: int, on_preview: Callable[[Preview], None]):
        """``(steps, emit)`` for :meth:`denoise`: ``emit(step, x0)`` sends one :class:`Preview`."""
        decoder, steps = self.preview_decoder(), preview_steps(req.num_inference_steps, previews)

        def emit(step: int, x0: torch.Tensor) -> None:
            images = decoder.images(self.flux, x0, req.width, req.height)
            on_preview(Preview(steps.index(step), step + 1, req.num_inference_steps, images))

        return steps, emit

    def warmup(
        self,
        sizes: list[tuple[int, int]] | None = None,
        num_images: int = 1,
        accelerations: tuple[str, ...] = ("none",),
    ) -> dict[str, float]:
        """Compile (or load compiled artifacts) for ``sizes`` ahead of the first request.

        Runs a 2-step generation per size and acceleration level (two steps, so CUDA graphs record too;
        ``regular``/``high`` run the step cache's stages). With a Triton attention backend one size per
        autotuning bucket is added, so no request pays a kernel benchmark. A compiled VAE decoder also decodes at the
        smallest and the largest valid size, because convolution guards split it into a small and a
        large graph; after warm-up no valid size compiles anything new. When compiled, the compile
        caches are saved so the next process starts warm. Returns seconds per size and level.

        >>> pipe.warmup([(1024, 1024), (1440, 512)])  # doctest: +SKIP
        """
        sizes = list(sizes or [(1024, 768)])
        if self.config.attention in KERNEL_MODES:  # their autotuners key on 4 sequence buckets: warm them all
            sizes += attention_warmup_sizes(sizes, self.config.max_sequence_length)
        from .lora import has_slot, slot_on

        timings = {}
        # With a LoRA slot, its two states (off: no request LoRA; on: one) are two sets of graphs.
        for slot in ("", ":lora-slot") if has_slot(self.transformer) else ("",):
            with slot_on(self.transformer) if slot else contextlib.nullcontext():
                for width, height in sizes:
                    for level in accelerations:
                        t0 = time.perf_counter()
                        self.generate(
                            "warm-up",
                            width=width,
                            height=height,
                            seed=0,
                            num_inference_steps=2,
                            num_images=num_images,
                            acceleration=level,
                            progress=False,
                        )
                        timings[f"{width}x{height}:{level}{slot}"] = time.perf_counter() - t0
        if self.optimized.needs_dynamic_marks:  # the VAE decoder is compiled too
            for side in (MIN_SIDE, MAX_SIDE):
                t0 = time.perf_counter()
                zeros = torch.zeros(num_images, self.latent_tokens(side, side), self.transformer.config.in_channels)
                with self._lock, torch.inference_mode():
                    self.decode(zeros.to(self.device, self.dtype), side, side)
                timings[f"decode:{side}x{side}"] = time.perf_counter() - t0
        if self.optimized.compiled and self.optimized.cache_file is not None:
            save_artifacts(self.optimized.cache_file)
        return timings

    def worth_warming_up(self) -> bool:
        """Whether :meth:`warmup` leaves anything a request reuses: compiled graphs, the Triton kernels'
        tuning, a GPU's lazy set-up. An eager pipeline on a CPU keeps none of it (warming the real model
        there would delay readiness by minutes for nothing)."""
        return self.optimized.compiled or self.config.attention in KERNEL_MODES or self.device.type != "cpu"

    def compiled_graphs(self) -> int:
        """Graphs torch.compile has built in this process (the recompile counter)."""
        return compiled_graphs()

    def generate_latents(
        self, req: GenerationRequest, progress: bool = False, cache_threshold: float | None = None
    ) -> torch.Tensor:
        """The final packed latents of a validated request, no decoding: ``(num_images, image_tokens,
        in_channels)``, with ``image_tokens = (height // 16) * (width // 16)`` and ``in_channels`` the
        transformer's (64 for FLUX.1: 16 latent channels × 2×2 patches; 16 for ``tiny-random``).

        Benchmarks and numerical checks compare these; ``req.seed`` must be set.
        """
        with self._lock, self._request_loras(req.loras):
            return self.run(req, progress, request_threshold(req.acceleration, cache_threshold)).latents

    # ------------------------------------------------------------------ stages

    @property
    def resident(self) -> set[str] | None:
        """With ``memory="offload-model"``: the components on the device right now (else None: all are)."""
        return set(self._residency.resident) if self._residency is not None else None

    def _stage(self, *names: str):
        """With ``memory="offload-model"``: only these components on the device while the block runs."""
        return self._residency.use(*names) if self._residency is not None else contextlib.nullcontext()

    def run(
        self, req: GenerationRequest, progress: bool = False, cache_threshold: float | None = None, **hooks
    ) -> DenoiseResult:
        """Encode the prompt and denoise: a request with its seed set → :class:`DenoiseResult`.

        The public path for benchmarks and numerical checks that time or compare latents; decode them
        with :meth:`decode`. ``cache_threshold``: the first-block cache threshold (``None``: exact);
        ``hooks``: ``should_stop``, ``on_step``, ``preview`` (see :class:`LoopOptions`).
        """
        return self._run(req, LoopOptions(progress, cache_threshold, **hooks))

    def _run(self, req: GenerationRequest, loop: LoopOptions, clock: StageClock | None = None) -> DenoiseResult:
        """``clock``: the caller's, which reads the stages after its own (``timings`` is then empty);
        without one, the run's stages are timed here."""
        if req.seed is None:
            raise ValueError("run() needs a request with its seed set (generate() draws one)")
        runtime, own = self.optimized.runtime, clock is None
        if loop.cache_threshold is not None:
            runtime.refuse_threshold(req.acceleration)  # before any work
        with self._lock, torch.inference_mode():
            clock = clock or StageClock(self.device)
            text = self.encode_prompt(req.prompt, req.num_images)  # the encoders visit only for a new prompt
            clock.mark("encode")
            inputs = self.prepare(req, text)
            steps, tokens = req.num_inference_steps, inputs.noise.shape[1]
            scheduler, timesteps = schedule(self.flux.scheduler, tokens, steps, self.device)
            with self._stage("transformer"), runtime.request(inputs, loop.cache_threshold) as model:
                latents = denoise(model, scheduler, timesteps, inputs.noise, loop)
                evaluations = model.evaluations
            clock.mark("denoise")
        return DenoiseResult(latents, clock.seconds() if own else {}, text.text_tokens, evaluations)

    def prepare(self, req: GenerationRequest, text: EncodedPrompt) -> DenoiseInputs:
        """The loop's inputs for a request (seed set) and its encoded prompt: noise and position ids."""
        noise = self.prepare_noise(req.seeds, req.width, req.height)
        return DenoiseInputs(req, noise, text, self.latent_image_ids(req.num_images, req.width, req.height))

    def encode_prompt(self, prompt: str, num_images: int = 1) -> EncodedPrompt:
        """CLIP pooled + T5 sequence embeddings, repeated ``num_images`` times, and the T5 token count;
        a prompt seen before comes from :attr:`prompt_cache` (``prompt_cache_mb``) without running the
        encoders.

        Warns with :class:`PromptTruncatedWarning` when T5 drops tokens past ``max_sequence_length``.
        """
        max_len = self.config.max_sequence_length
        key = (prompt, max_len, id(self.flux.text_encoder), id(self.flux.text_encoder_2))
        text = self.prompt_cache.get(key)
        if text is None:
            with self._lock, self._stage("text_encoder", "text_encoder_2"):
                text = self._encode(prompt, max_len)
            self.prompt_cache.put(key, text)
        if text.text_tokens > max_len:
            warnings.warn(
                f"prompt is {text.text_tokens} T5 tokens; only the first {max_len} are used (and CLIP's first 77)",
                PromptTruncatedWarning,
                stacklevel=4,
            )
        embeds, pooled, text_ids, n_tokens = text
        if num_images > 1:  # what diffusers' num_images_per_prompt does for one prompt
            embeds, pooled = embeds.repeat(num_images, 1, 1), pooled.repeat(num_images, 1)
        return EncodedPrompt(embeds, pooled, text_ids, min(n_tokens, max_len))

    def _encode(self, prompt: str, max_len: int) -> EncodedPrompt:
        """One prompt through both encoders; ``text_tokens`` is T5's count before truncation."""
        with _quiet_truncation_logs():  # our one warning says it; theirs print the dropped text
            n_tokens = len(self.flux.tokenizer_2(prompt, truncation=False).input_ids)
            prompt_embeds, pooled, text_ids = self.flux.encode_prompt(
                prompt=prompt, prompt_2=None, device=self.device, num_images_per_prompt=1, max_sequence_length=max_len
            )
        return EncodedPrompt(prompt_embeds, pooled, text_ids, n_tokens)

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        """``(channels, latent_height, latent_width)`` of the unpacked noise for an image size."""
        f = self.flux.vae_scale_factor * 2
        return self.transformer.config.in_channels // 4, 2 * (height // f), 2 * (width // f)

    def latent_image_ids(self, batch: int, width: int, height: int) -> torch.Tensor:
        """The image tokens' position ids ``(tokens, 3)`` that Flux's RoPE reads (diffusers' own helper)."""
        _, h, w = self.latent_shape(width, height)
        return self.flux._prepare_latent_image_ids(batch, h // 2, w // 2, self.device, self.dtype)

    def latent_tokens(self, width: int, height: int) -> int:
        """Packed latent tokens of an image size (2×2 latent patches)."""
        _, h, w = self.latent_shape(width, height)
        return (h // 2) * (w // 2)

    def prepare_noise(self, seeds: list[int], width: int, height: int) -> torch.Tensor:
        """Packed noise ``(len(seeds), tokens, in_channels)``, one CPU generator per seed.

        Drawn in float32 on the CPU and then cast and moved, so a seed gives the same noise on any
        device and in any dtype, and image ``i`` of a batch equals a single run with ``seeds[i]``.
        """
        c, h, w = self.latent_shape(width, height)
        noise = torch.stack(
            [
                torch.randn((c, h, w), generator=torch.Generator("cpu").manual_seed(s), dtype=torch.float32)
                for s in seeds
            ]
        )
        packed = self.flux._pack_latents(noise, len(seeds), c, h, w)
        return packed.to(device=self.device, dtype=self.dtype)

    def decode(self, latents: torch.Tensor, width: int, height: int) -> list:
        """Packed latents → PIL images."""
        vae = self.vae
        x = self.flux._unpack_latents(latents, height, width, self.flux.vae_scale_factor)
        x = x / vae.config.scaling_factor + vae.config.shift_factor
        x = x.to(vae.dtype).contiguous()
        if self.optimized.needs_dynamic_marks:
            for dim in (0, 2, 3):
                torch._dynamo.maybe_mark_dynamic(x, dim)
        with self._stage("vae"):
            image = self.optimized.vae_decode(x, return_dict=False)[0]
            if not self.flux.image_processor.config.do_normalize:  # not Flux's VAE: diffusers' own way
                return self.flux.image_processor.postprocess(image, output_type="pil")
            return pil_images(image)
