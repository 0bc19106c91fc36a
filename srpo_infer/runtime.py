"""What the denoising loop calls: the transformer as :func:`~srpo_infer.optimize.apply_optimizations`
left it (compiled or not, its processors and hooks installed), opened for one request.

:class:`ModelRuntime` is built once per pipeline; :meth:`ModelRuntime.request` turns one request's
prepared inputs into a :class:`RequestModel`, the callable the loop runs: ``model(latents, t)`` → the
noise prediction. Everything that differs between configurations happens inside it, not in the loop:
the first-block cache and the per-request constants are hooks on the transformer, opened around the
request here; context parallelism pads the streams and agrees on stopping; a whole-model compile marks
the size-varying dims dynamic; CUDA graphs get a step mark per call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from .compile import mark_dynamic

if TYPE_CHECKING:
    from .context_parallel import ContextParallel
    from .denoise import DenoiseInputs
    from .first_block_cache import RequestCache
    from .request_constants import RequestConstants


@dataclass(frozen=True)
class ModelRuntime:
    """The transformer callable and what wraps its calls for a request (see the module docstring)."""

    transformer: Callable[..., Any]
    guidance_embeds: bool  # FLUX.1-dev's distilled guidance is an input of the transformer
    compiled: bool = False
    dynamic_marks: bool = False  # a whole-model compile: mark the size-varying dims on every call
    step_cache: RequestCache | None = None
    constants: RequestConstants | None = None
    context_parallel: ContextParallel | None = None

    def refuse_threshold(self, acceleration: str) -> None:
        """A one-line error when this runtime cannot cache steps (``acceleration``: the request's level)."""
        if self.step_cache is not None:
            return
        if acceleration != "none":
            what, instead = f"acceleration {acceleration!r}", "acceleration 'none'"
        else:
            what, instead = "cache_threshold", "no cache_threshold"
        if self.context_parallel is not None:
            raise ValueError(
                f"{what} (first-block caching) does not run with context_parallel={self.context_parallel.degree} "
                f"yet: each process would decide to skip on its own tokens; use {instead}"
            )
        raise ValueError(
            f"{what} (first-block caching) does not run under the whole-model compile (compile_scope='full'), "
            f"whose one graph the skip decision would break: use compile_scope='regional' (the default) or {instead}"
        )

    @contextlib.contextmanager
    def request(self, inputs: DenoiseInputs, cache_threshold: float | None = None) -> Iterator[RequestModel]:
        """The model for one request's loop: its step cache at ``cache_threshold`` (``None``: exact) and
        its constants computed once, both emptied afterwards."""
        if cache_threshold is not None:
            self.refuse_threshold(inputs.request.acceleration)
        cache, constants = self.step_cache, self.constants
        with (
            cache.request(cache_threshold) if cache is not None else contextlib.nullcontext(),
            constants.request() if constants is not None else contextlib.nullcontext(),
        ):
            yield RequestModel(self, inputs)


class RequestModel:
    """One request's transformer: ``model(latents, t)`` → noise prediction; :meth:`stop` agrees on a
    stop across processes; :attr:`evaluations` counts the calls that ran every block."""

    def __init__(self, runtime: ModelRuntime, inputs: DenoiseInputs):
        self.runtime, self.calls = runtime, 0
        text, batch = inputs.text, inputs.noise.shape[0]
        guidance = None
        if runtime.guidance_embeds:
            scale = inputs.request.guidance_scale
            guidance = torch.full([batch], scale, device=inputs.noise.device, dtype=torch.float32)
        self.fixed = dict(
            guidance=guidance,
            pooled_projections=text.pooled,
            encoder_hidden_states=text.prompt_embeds,
            txt_ids=text.text_ids,
            img_ids=inputs.img_ids,
        )
        cp = runtime.context_parallel
        if cp is not None:  # both streams padded once (the padding masked or cut off in attention)
            self.fixed |= cp.fixed_inputs(text.prompt_embeds, text.text_ids, inputs.img_ids)

    def __call__(self, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        runtime, self.calls = self.runtime, self.calls + 1
        if runtime.dynamic_marks:
            mark_dynamic(latents, self.fixed["img_ids"])
        if runtime.compiled:  # a new step for CUDA graphs: the last step's outputs were consumed
            torch.compiler.cudagraph_mark_step_begin()
        timestep = t.expand(latents.shape[0]).to(latents.dtype) / 1000
        cp = runtime.context_parallel
        hidden = latents if cp is None else cp.pad_latents(latents)
        out = runtime.transformer(hidden_states=hidden, timestep=timestep, **self.fixed, return_dict=False)[0]
        return out if cp is None else out[:, : latents.shape[1]]  # the padding cut off the prediction

    def stop(self, asked: bool) -> bool:
        """Stop before this step? With context parallelism, rank 0's decision on every rank."""
        cp = self.runtime.context_parallel
        return cp.agree_stop(asked) if cp is not None else asked

    @property
    def evaluations(self) -> int:
        """Calls that ran every block (fewer than the calls when the first-block cache skipped some)."""
        cache = self.runtime.step_cache
        return cache.evaluations if cache is not None else self.calls
