"""A cache context for every Flux pipeline: diffusers' cache hooks need one, and in diffusers 0.42 only
``FluxPipeline`` opens it (``transformer.cache_context("cond")`` around each call). img2img, inpaint,
fill, control, ControlNet and Kontext call the transformer bare, and every cached call of theirs
raised "No cache context is set". :func:`srpo_infer.optimize` registers :class:`CallContextHook` on
the transformer along with the cache, changing nothing in diffusers.
"""

from __future__ import annotations

import weakref

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

CALL_CONTEXT_HOOK = "srpo_call_context"  # the name of our hook in the transformer's diffusers HookRegistry


def provide_cache_context(transformer: torch.nn.Module) -> None:
    """Register :class:`CallContextHook` on ``transformer`` under :data:`CALL_CONTEXT_HOOK` (once), so
    diffusers' cache hooks run under every Flux pipeline, not only those that open a cache context."""
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    if registry.get_hook(CALL_CONTEXT_HOOK) is None:
        registry.register_hook(CallContextHook(), CALL_CONTEXT_HOOK)


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class CallContextHook(ModelHook):
    """A cache context for each denoising stream of a pipeline that opens none.

    A stream is one ``encoder_hidden_states`` tensor: a pipeline passes the same prompt embeddings at
    every step of a call, and different ones to its conditional and unconditional calls (true CFG), so
    each keeps its own cache state, as ``FluxPipeline``'s ``"cond"`` and ``"uncond"`` do. Streams are
    held by weak reference; when none of them is alive, the call is a new one and every cache hook on
    the transformer starts empty (diffusers also resets them at the end of each pipeline call that completes; a call
    interrupted midway leaves its state to the next call that passes the same tensor, as in FluxPipeline). The
    names are reused (``srpo-0``, ``srpo-1``) so compiled blocks that read them see the same strings.
    A call that already runs under a context (``FluxPipeline``, or research code that opens one) passes
    through untouched: diffusers sets that context on this hook's :class:`StateManager` too.
    """

    _is_stateful = True

    def __init__(self):
        super().__init__()
        self.state_manager = StateManager(_NoState)  # diffusers sets every open context on it
        self.streams: dict[str, weakref.ref] = {}

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        try:
            self.state_manager.context  # raises when no context is open  # noqa: B018
        except ValueError:
            text = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            with module.cache_context(self._stream(module, text)):
                return self.fn_ref.original_forward(*args, **kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)

    def _stream(self, module: torch.nn.Module, text) -> str:
        if not isinstance(text, torch.Tensor):
            return "srpo"
        self.streams = {name: ref for name, ref in self.streams.items() if ref() is not None}
        for name, ref in self.streams.items():
            if ref() is text:
                return name
        if not self.streams:  # a new call: nothing cached by an earlier one may be reused
            HookRegistry.check_if_exists_or_initialize(module).reset_stateful_hooks()
        name = next(f"srpo-{i}" for i in range(len(self.streams) + 1) if f"srpo-{i}" not in self.streams)
        self.streams[name] = weakref.ref(text)
        return name

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        self.streams = {}
        return module
