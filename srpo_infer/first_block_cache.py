"""Our loop's first-block cache (the API's ``acceleration`` levels, :mod:`srpo_infer.step_cache`):
two named diffusers hooks on the transformer's blocks, their state in one :class:`RequestCache`, the
threshold set per request.

Kept apart from :mod:`~srpo_infer.step_cache` so that importing the package (and a CLI typo) does not
import diffusers' hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers.hooks import ModelHook

HEAD_HOOK, SKIP_HOOK = "srpo_first_block_head", "srpo_first_block_skip"  # names in diffusers' HookRegistry


class RequestCache:
    """The first-block cache for our loop, with the threshold chosen per request: two named diffusers
    hooks (``ModelHook`` subclasses registered as :data:`HEAD_HOOK` on the first block and
    :data:`SKIP_HOOK` on the others) holding their state here.

    The same cache as diffusers' ``FirstBlockCacheConfig`` (ParaAttention's rule, the same skips and
    the same image, bit for bit), with three differences that matter for speed:

    - With ``None`` (``acceleration="none"``, and outside a request) the hooks only call the block:
      no residual, no decision, no host sync.
    - Installed after the regional compile, the hooks wrap the compiled blocks' forwards and run
      eagerly around them: the compiled graphs are the plain blocks (no graph break), and a request
      that skips runs those same graphs (nothing new to compile).
    - What the cache keeps across blocks it owns (a copy of the first block's output), so a compiled
      block whose outputs live in a CUDA graph's memory pool may be replayed under it.

    Flux's forward reads only the image stream after the last block, so a skipped step carries the
    text stream of the first block unchanged (diffusers adds a text residual no one reads).

    >>> cache = RequestCache(transformer)                          # doctest: +SKIP
    >>> with cache.request(0.08):                                  # doctest: +SKIP
    ...     for step in steps:
    ...         noise_pred = transformer(...)
    >>> cache.evaluations                                          # doctest: +SKIP
    """

    def __init__(self, transformer: torch.nn.Module):
        from diffusers.hooks import HookRegistry

        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        if len(blocks) < 2:
            raise ValueError(f"the first-block cache needs at least 2 transformer blocks, this one has {len(blocks)}")
        self.threshold: float | None = None
        self.evaluations = 0
        self._clear(None)
        HookRegistry.check_if_exists_or_initialize(blocks[0]).register_hook(_HeadHook(self), HEAD_HOOK)
        for block in blocks[1:]:
            hook = _SkipHook(self, tail=block is blocks[-1])
            HookRegistry.check_if_exists_or_initialize(block).register_hook(hook, SKIP_HOOK)

    def _clear(self, threshold: float | None) -> None:
        self.threshold = threshold
        self.should_compute = True
        self.head_residual: torch.Tensor | None = None  # first block's residual at the last full step
        self.head_output: torch.Tensor | None = None  # first block's image output, this full step
        self.tail_residual: torch.Tensor | None = None  # the other blocks' residual at the last full step

    @contextlib.contextmanager
    def request(self, threshold: float | None) -> Iterator[RequestCache]:
        """One request's loop: its threshold (``None``: no caching), an empty cache before and after;
        :attr:`evaluations` counts its transformer calls that ran every block."""
        self._clear(threshold)
        self.evaluations = 0
        try:
            yield self
        finally:
            self._clear(None)

    def decide(self, residual: torch.Tensor) -> bool:
        """Run the remaining blocks? ParaAttention's rule, as diffusers computes it (one host sync)."""
        if self.head_residual is None:
            return True
        previous = self.head_residual
        change = ((residual - previous).abs().mean() / previous.abs().mean()).item()
        return change > self.threshold


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


class _HeadHook(ModelHook):
    """On the first block: after it runs, decide the step, and on a skipped step add the cached residual."""

    def __init__(self, cache: RequestCache):
        super().__init__()
        self.cache = cache

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        cache = self.cache
        output = self.fn_ref.original_forward(*args, **kwargs)
        if cache.threshold is None:
            cache.evaluations += 1
            return output
        encoder_hidden_states, hidden_states = output  # Flux blocks return (text, image)
        residual = hidden_states - _hidden_states(args, kwargs)
        cache.should_compute = cache.decide(residual)
        if not cache.should_compute:
            return encoder_hidden_states, hidden_states + cache.tail_residual
        cache.evaluations += 1
        cache.head_residual = residual
        cache.head_output = hidden_states.clone()  # a CUDA graph's replay may reuse the block's output
        return output


class _SkipHook(ModelHook):
    """On every other block: run it on a computed step (the last one records the step's residual),
    pass the streams through on a skipped one."""

    def __init__(self, cache: RequestCache, tail: bool):
        super().__init__()
        self.cache, self.tail = cache, tail

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        cache = self.cache
        if cache.threshold is not None and not cache.should_compute:
            return kwargs["encoder_hidden_states"], _hidden_states(args, kwargs)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if self.tail and cache.threshold is not None:
            cache.tail_residual = output[1] - cache.head_output
            cache.head_output = None
        return output
