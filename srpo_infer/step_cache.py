"""First-block cache: the API's ``acceleration`` levels, by skipping most of the transformer on
steps where it would change little, through diffusers' own hooks (``FirstBlockCacheConfig``).

Each step runs the embedders and the first double block. When the first block's residual (its
output minus its input, image stream) differs from the one of the last fully computed step by less
than ``threshold`` (mean absolute difference over mean absolute value), the remaining 18 double and
38 single blocks are skipped and their cached residual from the last full step is added instead. This
is ParaAttention's First Block Cache (as in xDiT's FBCache); diffusers ships it as
``FirstBlockCacheConfig``, which a stock pipeline gets from :func:`srpo_infer.optimize` and our own
loop gets from :class:`~srpo_infer.first_block_cache.RequestCache`.

Thresholds: ``regular`` = 0.08, the default ParaAttention documents for FLUX models (diffusers'
ParaAttention guide); ``high`` = 0.12, the value ParaAttention's "Fastest FLUX inference" recipe
uses for FLUX.1-dev. Both are to be re-checked on SRPO's real weights with ``srpo-infer bench``:
random weights do not show how a trained model's residuals evolve.

The hooks are installed after the regional compile and wrap the compiled blocks, so the skip decision
(one host sync per step while a threshold is set) runs eagerly between compiled graphs: no graph
break, and a request that skips compiles nothing new.
"""

from __future__ import annotations

from .request import ACCELERATIONS, check_acceleration

# The levels are request.ACCELERATIONS (their one definition and rule); these are their thresholds.
ACCELERATION_THRESHOLDS: dict[str, float | None] = dict(zip(ACCELERATIONS, (None, 0.08, 0.12), strict=True))


def cache_threshold_for(acceleration: str, override: float | None = None) -> float | None:
    """The first-block cache threshold of an ``acceleration`` level (``None``: no cache), or ``override``.

    >>> cache_threshold_for("regular"), cache_threshold_for("none", 0.3)
    (0.08, 0.3)
    """
    return request_threshold(check_acceleration(acceleration), override)


def request_threshold(acceleration: str, override: float | None = None) -> float | None:
    """:func:`cache_threshold_for` of a level already checked (a built request's): the override alone
    is checked here."""
    if override is not None:
        if isinstance(override, bool) or not isinstance(override, (int, float)) or not override >= 0:
            raise ValueError(f"cache_threshold must be a number >= 0, got {override!r}")
        return float(override)
    return ACCELERATION_THRESHOLDS[acceleration]


STEP_CACHES = ("first-block", "taylorseer", "magcache")  # diffusers' cache hooks a stock pipeline can take


def stock_cache(
    acceleration: str | None = None,
    cache_threshold: float | None = None,
    cache: str | None = None,
    cache_steps: int = 28,
    compiled: bool = False,
    cuda_graphs: bool = False,
) -> tuple[object, str] | None:
    """The diffusers cache config a stock pipeline gets for every call, and its step label; ``None``
    when nothing asks for a cache.

    ``first-block``: ParaAttention's cache at the level's threshold. ``taylorseer``: TaylorSeer with
    diffusers' defaults (a full step every 5, the first 3 always; ``cache_threshold`` does not apply).
    ``magcache``: MagCache with diffusers' FLUX.1-dev magnitude ratios, interpolated to ``cache_steps``
    (the pipeline's ``num_inference_steps``), at ``cache_threshold`` or diffusers' default 0.06. The
    quality of the last two on SRPO is unmeasured. ``cache`` alone applies its engine at the
    ``regular`` level (those defaults; 0.08 for ``first-block``); an ``acceleration`` or a
    ``cache_threshold`` alone takes ``first-block``; ``acceleration="none"`` with a ``cache`` is refused,
    since it would cache nothing. ``compiled``: TaylorSeer is refused with the regional compile (its
    hooks sit on the attentions inside the compiled blocks). ``cuda_graphs``: every cache is refused
    (diffusers' hooks keep block outputs a replay overwrites; our own loop's cache copies what it keeps).

    >>> stock_cache("regular")[1], stock_cache(cache="taylorseer")[1], stock_cache()
    ('cache:first-block(0.08)', 'cache:taylorseer(interval 5)', None)
    """
    from diffusers.hooks import FirstBlockCacheConfig, MagCacheConfig, TaylorSeerCacheConfig

    if cache is not None and cache not in STEP_CACHES:
        raise ValueError(f"cache must be one of {list(STEP_CACHES)}, got {cache!r}")
    if compiled and cache == "taylorseer":
        raise ValueError(
            "cache='taylorseer' with compile=True: TaylorSeer hooks every attention inside the compiled blocks, so "
            "its per-step choice would break their graphs and compile new ones; use cache='first-block' or "
            "'magcache' (their hooks wrap whole blocks and run outside the graphs), or compile=False"
        )
    if cuda_graphs and (acceleration not in (None, "none") or cache is not None or cache_threshold is not None):
        raise ValueError(
            "a step cache with CUDA graphs on a diffusers pipeline: diffusers' cache hooks keep block outputs that "
            "a graph's next replay overwrites; pass cuda_graphs=False (or leave compile_mode at 'default'), or no cache"
        )
    if cache is not None and acceleration == "none":
        raise ValueError(
            f"cache={cache!r} with acceleration='none' caches nothing: leave acceleration out "
            "(the cache then runs at its defaults) or set it to 'regular' or 'high'"
        )
    if acceleration is None:
        acceleration = "regular" if cache is not None else "none"
    cache = cache or "first-block"
    threshold = cache_threshold_for(acceleration, cache_threshold)
    if threshold is None:
        return None
    if cache == "first-block":
        return FirstBlockCacheConfig(threshold=threshold), f"cache:first-block({threshold:g})"
    if cache == "taylorseer":
        if cache_threshold is not None:
            raise ValueError("cache_threshold does not apply to cache='taylorseer' (it refreshes every 5 steps)")
        config = TaylorSeerCacheConfig()
        return config, f"cache:taylorseer(interval {config.cache_interval})"
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    if isinstance(cache_steps, bool) or not isinstance(cache_steps, int) or cache_steps < 2:
        raise ValueError(f"cache_steps must be the calls' num_inference_steps (an integer >= 2), got {cache_steps!r}")
    config = MagCacheConfig(mag_ratios=FLUX_MAG_RATIOS, num_inference_steps=cache_steps)
    if cache_threshold is not None:
        config.threshold = threshold
    return config, f"cache:magcache({config.threshold:g}, {cache_steps} steps)"
