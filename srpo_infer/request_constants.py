"""What a transformer call recomputes at every step though it cannot change within a request: the
rotary embedding of the request's token positions, the text stream's projection, the guidance and
pooled-text embeddings. Computed at the first step of a request, reused at the others.

Each is a named diffusers hook (``srpo_request_constant``) on its module, so the transformer's own
forward runs unchanged and the values are the ones it would compute (bit for bit: the same module on
the same inputs). The hooks only reuse inside :meth:`RequestConstants.request`, which our loop opens
around one request, whose prompt, guidance, size and batch are fixed; outside it (direct calls,
research code) they compute every time. At FLUX.1 depth that removes ~70 of a step's eager aten
ops (``benchmarks/host_ops.py``); under the regional compile, where a block is one graph, it is a
larger share of the launches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers.hooks import HookRegistry, ModelHook

HOOK = "srpo_request_constant"
# Modules of FluxTransformer2DModel whose inputs are fixed for a request (guidance_embedder gets the
# sinusoidal projection of the guidance scale, text_embedder the pooled CLIP embedding).
CONSTANT_MODULES = (
    "pos_embed",
    "context_embedder",
    "time_text_embed.guidance_embedder",
    "time_text_embed.text_embedder",
)


class RequestConstants:
    """Reuse, within a request, what the transformer's per-request modules computed at its first step.

    >>> constants = RequestConstants(transformer)   # doctest: +SKIP
    >>> with constants.request():                   # doctest: +SKIP
    ...     for t in timesteps:
    ...         transformer(...)                    # pos_embed & co. run at the first step only
    """

    def __init__(self, transformer: torch.nn.Module):
        self.active = False  # inside a request: reuse what its first call computed
        self.hooks = []
        for name in CONSTANT_MODULES:
            try:
                module = transformer.get_submodule(name)
            except AttributeError:  # a Flux transformer without guidance embedding
                continue
            hook = _Reuse(self)
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK)
            self.hooks.append(hook)

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """One request: its first call computes, later calls reuse; nothing kept after it."""
        self.active = True
        try:
            yield
        finally:
            self.active = False
            for hook in self.hooks:
                hook.drop()


def _signature(args: tuple, kwargs: dict) -> tuple:
    """Shapes, dtypes and devices of the tensor inputs: a request whose loop changed one recomputes."""
    tensors = [*args, *kwargs.values()]
    return tuple((t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) else t for t in tensors)


class _Reuse(ModelHook):
    def __init__(self, constants: RequestConstants):
        super().__init__()
        self.constants = constants
        self.drop()

    def drop(self) -> None:
        self.signature, self.output = None, None

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        if not self.constants.active:
            return self.fn_ref.original_forward(*args, **kwargs)
        signature = _signature(args, kwargs)
        if self.output is None or self.signature != signature:
            self.output, self.signature = self.fn_ref.original_forward(*args, **kwargs), signature
        return self.output
