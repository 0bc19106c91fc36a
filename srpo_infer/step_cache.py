"""First-block cache: the API's ``acceleration`` levels, by skipping most of the transformer on
steps where it would change little.

Each step runs the embedders and the first double block. When the first block's residual (its
output minus its input, image stream) differs from the one of the last fully computed step by less
than ``threshold`` (mean absolute difference over mean absolute value), the remaining 18 double and
38 single blocks are skipped and their cached residual from the last full step is added instead. This
is ParaAttention's First Block Cache (as in xDiT's FBCache and diffusers' FirstBlockCacheConfig).

Thresholds: ``regular`` = 0.08, the default ParaAttention documents for FLUX models (diffusers'
ParaAttention guide); ``high`` = 0.12, the value ParaAttention's "Fastest FLUX inference" recipe
uses for FLUX.1-dev. Both are to be re-checked on SRPO's real weights with ``srpo-infer bench``:
random weights do not show how a trained model's residuals evolve.

The transformer is split into three stages (``front``, ``rest``, ``head``) so each compiles as its own
``fullgraph`` graph; the skip decision is plain Python between them (one host sync per step).
"""

from __future__ import annotations

import torch

ACCELERATION_THRESHOLDS: dict[str, float | None] = {"none": None, "regular": 0.08, "high": 0.12}


def cache_threshold_for(acceleration: str, override: float | None = None) -> float | None:
    """The first-block cache threshold of an ``acceleration`` level (``None``: no cache), or ``override``.

    >>> cache_threshold_for("regular"), cache_threshold_for("none", 0.3)
    (0.08, 0.3)
    """
    if acceleration not in ACCELERATION_THRESHOLDS:
        raise ValueError(f"acceleration must be one of {list(ACCELERATION_THRESHOLDS)}, got {acceleration!r}")
    if override is not None:
        if isinstance(override, bool) or not isinstance(override, (int, float)) or not override >= 0:
            raise ValueError(f"cache_threshold must be a number >= 0, got {override!r}")
        return float(override)
    return ACCELERATION_THRESHOLDS[acceleration]


class FluxStages(torch.nn.Module):
    """Diffusers' ``FluxTransformer2DModel.forward`` cut after the first double block.

    ``front`` + ``rest`` + ``head`` computes exactly what ``transformer(...)`` computes (a test checks
    bit equality); controlnet and IP-adapter inputs are not supported here.
    """

    def __init__(self, transformer: torch.nn.Module):
        super().__init__()
        self.transformer = transformer

    def front(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, guidance, txt_ids, img_ids):
        """Embedders and the first double block. Returns the block's outputs, ``temb``, the rotary
        tables and the block's residual on the image stream."""
        t = self.transformer
        hidden_states = t.x_embedder(hidden_states)
        timestep = timestep.to(hidden_states.dtype) * 1000
        if guidance is not None:
            guidance = guidance.to(hidden_states.dtype) * 1000
            temb = t.time_text_embed(timestep, guidance, pooled_projections)
        else:
            temb = t.time_text_embed(timestep, pooled_projections)
        encoder_hidden_states = t.context_embedder(encoder_hidden_states)
        rope_cos, rope_sin = t.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        encoder_out, hidden_out = t.transformer_blocks[0](
            hidden_states=hidden_states,
            encoder_hidden_states=encoder_hidden_states,
            temb=temb,
            image_rotary_emb=(rope_cos, rope_sin),
        )
        return hidden_out, encoder_out, temb, rope_cos, rope_sin, hidden_out - hidden_states

    def rest(self, hidden_states, encoder_hidden_states, temb, rope_cos, rope_sin):
        """Double blocks 1… and all single blocks; returns the image-stream hidden states."""
        t = self.transformer
        rope = (rope_cos, rope_sin)
        for block in list(t.transformer_blocks)[1:]:
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                temb=temb,
                image_rotary_emb=rope,
            )
        for block in t.single_transformer_blocks:
            encoder_hidden_states, hidden_states = block(
                hidden_states=hidden_states,
                encoder_hidden_states=encoder_hidden_states,
                temb=temb,
                image_rotary_emb=rope,
            )
        return hidden_states

    def head(self, hidden_states, temb):
        """Final modulation and projection to the noise prediction."""
        t = self.transformer
        return t.proj_out(t.norm_out(hidden_states, temb))


def residual_change(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean |current − previous| / mean |previous| (ParaAttention's measure), as a Python float."""
    return ((current - previous).abs().mean() / previous.abs().mean().clamp_min(1e-12)).item()


class FirstBlockCache:
    """Per-generation state: the first-block residual and the remaining blocks' residual of the last
    fully computed step, and how many full evaluations ran."""

    def __init__(self, threshold: float):
        if threshold < 0:
            raise ValueError(f"cache threshold must be >= 0, got {threshold}")
        self.threshold = threshold
        self.first_residual: torch.Tensor | None = None
        self.rest_residual: torch.Tensor | None = None
        self.full_evaluations = 0
        self.cached_steps = 0

    def step(self, front, rest, head, mark=None, **inputs) -> torch.Tensor:
        """One transformer evaluation through the cache; ``front/rest/head`` may be compiled stages,
        and ``mark(hidden, *rope)`` then marks their inputs' size-varying dims dynamic."""
        hidden, encoder, temb, cos, sin, first_residual = front(**inputs)
        reuse = (
            self.first_residual is not None
            and self.first_residual.shape == first_residual.shape
            and residual_change(first_residual, self.first_residual) < self.threshold
        )
        if reuse:
            # The reference residual stays the last *computed* one, so slow drift still triggers a
            # full step instead of being compared step to step.
            hidden = hidden + self.rest_residual
            self.cached_steps += 1
        else:
            if mark is not None:
                mark(hidden, cos, sin)
            full = rest(hidden, encoder, temb, cos, sin)
            self.rest_residual = full - hidden
            self.first_residual = first_residual
            hidden = full
            self.full_evaluations += 1
        if mark is not None:
            mark(hidden)
        return head(hidden, temb)
