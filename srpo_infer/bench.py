"""``srpo-infer bench``: diffusers' FluxPipeline against our pipeline with each optimization added one
at a time, in one process, on the same weights, seeds and prompt.

Per configuration and setting (size, steps): median seconds per image, ms per transformer step,
speed-up against the baseline, achieved TFLOP/s (FLOPs counted with hooks on one forward), peak GPU
memory, first-call (compile) seconds, graphs compiled after the first size (recompiles), and the
deviation from the baseline output (latent relative error, PSNR of the decoded image).
Output: JSON, a Markdown table and a PNG chart.
"""

from __future__ import annotations

import datetime
import gc
import json
import logging
import math
import platform
import signal
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .compile import guard_failures, new_guard_failures
from .config import PipelineConfig
from .deviation import psnr, relative_error
from .request import GenerationRequest

log = logging.getLogger(__name__)

PROMPT = "A T-Rex relaxing on a beach, lying on a sun lounger and wearing sunglasses."
SEED = 490733907


@dataclass(frozen=True)
class BenchConfig:
    """One column of the ablation: our pipeline with these switches (``baseline`` = stock diffusers)."""

    name: str
    baseline: bool = False
    compile: bool = False
    quantize: str | None = None
    attention: str = "sdpa"
    acceleration: str = "none"
    compile_scope: str = "regional"
    compile_mode: str = "default"
    memory: str = "gpu"


# Each adds one optimization on top of compile, then everything together. "+compile" is regional;
# "+compile-full" (whole model) and "+compile-max" (max-autotune, CUDA graphs) compare compile styles.
ABLATION = (
    BenchConfig("diffusers", baseline=True),
    BenchConfig("ours-eager"),
    BenchConfig("+compile", compile=True),
    BenchConfig("+compile-full", compile=True, compile_scope="full"),
    BenchConfig("+compile-max", compile=True, compile_mode="max-autotune"),
    BenchConfig("+compile+fp8", compile=True, quantize="fp8"),
    BenchConfig("+compile+triton", compile=True, attention="triton"),
    BenchConfig("+compile+triton-int8", compile=True, attention="triton-int8"),
    BenchConfig("+compile+triton-int8-fp8", compile=True, attention="triton-int8-fp8"),
    BenchConfig("+compile+cache-regular", compile=True, acceleration="regular"),
    BenchConfig("+compile+cache-high", compile=True, acceleration="high"),
    BenchConfig("all", compile=True, quantize="fp8", attention="triton-int8-fp8"),
    BenchConfig("all+cache-high", compile=True, quantize="fp8", attention="triton-int8-fp8", acceleration="high"),
    # Memory modes, eager: what fitting a smaller card costs (peak GPU memory, seconds per image).
    BenchConfig("mem:offload-model", memory="offload-model"),
    BenchConfig("mem:offload-group", memory="offload-group"),
)
CPU_SMOKE = (
    BenchConfig("diffusers", baseline=True),
    BenchConfig("ours-eager"),
    BenchConfig("+fp8-weight", quantize="fp8-weight"),
    BenchConfig("+compile", compile=True),
    BenchConfig("+cache-high", acceleration="high"),
)
CPU_EXTRA = (BenchConfig("+compile-full", compile=True, compile_scope="full"),)  # by name: a second C++ build


@dataclass(frozen=True)
class Defaults:
    """What ``srpo-infer bench`` runs when not told: the real settings on a GPU; on a CPU a set that
    shows every mechanism and finishes in about a minute (measured: ``CPU_DEFAULTS_SECONDS``)."""

    sizes: tuple[str, ...]
    steps: int
    official: bool  # also 1024x1024 at 50 steps, SRPO's own setting
    repeats: int


GPU_DEFAULTS = Defaults(("1024x768", "1440x512", "1024x1024"), 28, True, 3)
CPU_DEFAULTS = Defaults(("512x512", "768x512"), 4, False, 2)
CPU_DEFAULTS_SECONDS = 59  # `srpo-infer bench --model tiny-random`, idle 2-core machine, empty compile cache


def select_configs(names: list[str] | None, device: torch.device) -> list[BenchConfig]:
    """The configurations to run, in the order given (default: those of the device's whole table that
    can run here: see :func:`cannot_run`)."""
    if names is None:
        return [c for c in (ABLATION if device.type == "cuda" else CPU_SMOKE) if cannot_run(c, device) is None]
    known = {c.name: c for c in (*CPU_SMOKE, *CPU_EXTRA, *ABLATION)}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--configs: unknown configuration(s) {unknown}; known: {list(known)}")
    return [known[n] for n in dict.fromkeys(names)]


def cannot_run(bench: BenchConfig, device: torch.device) -> str | None:
    """Why ``bench`` cannot run on this machine (a package or a GPU feature missing), else None."""
    from .config import PipelineConfig

    if bench.baseline:
        return None
    try:
        from .optimize import check_available

        plain = PipelineConfig(
            model="tiny-random",
            device=str(device),
            attention=bench.attention,
            quantize=bench.quantize,
            memory=bench.memory,
            compile=False,
        ).resolved()
        check_available(plain)
    except ValueError as exc:
        return str(exc)
    return None


def skipped_configs(names: list[str] | None, device: torch.device) -> dict[str, str]:
    """The default table's configurations left out because they cannot run here, with the reason (named
    configurations are never left out: they become error rows that say why)."""
    if names is not None:
        return {}
    table = ABLATION if device.type == "cuda" else CPU_SMOKE
    return {c.name: why for c in table if (why := cannot_run(c, device)) is not None}


@dataclass
class Setting:
    width: int
    height: int
    steps: int

    @property
    def label(self) -> str:
        return f"{self.width}x{self.height}@{self.steps}"


@dataclass
class BenchArgs:
    model: str = "full-random"
    base: str | None = None
    device: str | None = None
    settings: list[Setting] = field(default_factory=list)
    configs: list[str] | None = None
    repeats: int = 3
    compile_backend: str = "inductor"
    config_timeout: float | None = None  # seconds per configuration (all its settings); None: no limit
    context_parallel: int = 1  # processes per image (under torchrun) for every configuration but the baseline


# ----------------------------------------------------------------------------- FLOP counting


def transformer_flops(transformer: torch.nn.Module, inputs: dict) -> dict[str, int]:
    """FLOPs of one transformer forward: 2·in·out per row for every linear layer, plus 4·S²·D per
    head for every attention, counted with forward hooks on one call (a meta-device model works).

    Returns ``{"linear", "attention", "total"}``. FLUX.1-dev at 1024² (4096 + 512 tokens): 59.5 and
    14.9 TFLOP, as in the design notes' cost model (README, "Fast path"; a test checks it).
    """
    from diffusers.models.transformers.transformer_flux import FluxAttention

    total = {"linear": 0, "attention": 0}

    def on_linear(module, args, _out):
        x = args[0]
        total["linear"] += 2 * x.numel() // x.shape[-1] * module.in_features * module.out_features

    def on_attention(module, args, kwargs, _out):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        extra = kwargs.get("encoder_hidden_states")
        tokens = hidden.shape[1] + (extra.shape[1] if extra is not None else 0)
        total["attention"] += 4 * hidden.shape[0] * tokens * tokens * module.heads * module.head_dim

    hooks = [m.register_forward_hook(on_linear) for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    hooks += [
        m.register_forward_hook(on_attention, with_kwargs=True)
        for m in transformer.modules()
        if isinstance(m, FluxAttention)
    ]
    try:
        with torch.inference_mode():
            transformer(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return {**total, "total": total["linear"] + total["attention"]}


# ----------------------------------------------------------------------------- running


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class _Baseline:
    """Stock diffusers ``FluxPipeline`` over the same components, with diffusers' own processors."""

    def __init__(self, ours):
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        self.ours = ours  # for identical noise and latent shapes
        self.flux = ours.flux
        self.flux.transformer.set_attn_processor(FluxAttnProcessor())

    def run(self, setting: Setting) -> tuple[torch.Tensor, object, float, float]:
        """Latents, decoded image, total seconds, and seconds spent in transformer calls."""
        noise = self.ours.prepare_noise([SEED], setting.width, setting.height)
        device = self.ours.device
        spent = [0.0, 0.0]

        def before(*_):
            _sync(device)
            spent[1] = time.perf_counter()

        def after(*_):
            _sync(device)
            spent[0] += time.perf_counter() - spent[1]

        hooks = [
            self.flux.transformer.register_forward_pre_hook(before),
            self.flux.transformer.register_forward_hook(after),
        ]
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            latents = self.flux(
                PROMPT,
                height=setting.height,
                width=setting.width,
                num_inference_steps=setting.steps,
                guidance_scale=4.5,
                latents=noise,
                output_type="latent",
                max_sequence_length=512,
            ).images
            image = self.ours.decode(latents, setting.width, setting.height)[0]
        _sync(device)
        for h in hooks:
            h.remove()
        return latents, image, time.perf_counter() - t0, spent[0]


def _ours_run(pipe, setting: Setting, acceleration: str) -> tuple[torch.Tensor, object, float, float, int]:
    from .step_cache import cache_threshold_for

    req = GenerationRequest(PROMPT, setting.width, setting.height, seed=SEED, num_inference_steps=setting.steps)
    _sync(pipe.device)
    t0 = time.perf_counter()
    run = pipe.run(req, cache_threshold=cache_threshold_for(acceleration))
    with torch.inference_mode():
        image = pipe.decode(run.latents, setting.width, setting.height)[0]
    _sync(pipe.device)
    return run.latents, image, time.perf_counter() - t0, run.timings["denoise"], run.transformer_evaluations


def _plain_config(args: BenchArgs, device: torch.device, dtype: torch.dtype) -> PipelineConfig:
    return PipelineConfig(
        model=args.model,
        base=args.base,
        device=device,
        dtype=dtype,
        attention="sdpa",
        quantize=None,
        compile=False,
        progress=False,
    ).resolved()


class ConfigTimeout(Exception):
    """A configuration ran past its time box."""


class TimeBox:
    """Raise :class:`ConfigTimeout` in the main thread once ``seconds`` have passed (SIGALRM).

    A timed-out compile may surface wrapped in another exception, so callers check ``expired`` too.
    Elsewhere than the main thread of a POSIX process it only records, never interrupts.
    """

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.expired = False
        self._armed = bool(seconds) and hasattr(signal, "setitimer")
        self._armed = self._armed and threading.current_thread() is threading.main_thread()

    def _on_alarm(self, _signum, _frame):
        self.expired = True
        raise ConfigTimeout(f"timed out after {self.seconds:g} s")

    def __enter__(self) -> TimeBox:
        if self._armed:
            self._previous = signal.signal(signal.SIGALRM, self._on_alarm)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        return self

    def __exit__(self, *_exc) -> bool:
        if self._armed:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous)
        return False


@dataclass
class _Shared:
    """What configurations share: the components no optimization changes (VAE, encoders, tokenizers,
    scheduler), FLOP counts and the baseline's outputs. Optimizations change the transformer in place
    (fused QKV, quantized weights, compiled blocks), so each configuration takes a freshly loaded one:
    the first load's, then a new load (random models are seeded: the same weights every time)."""

    components: dict
    plain: PipelineConfig
    flops: dict = field(default_factory=dict)
    reference: dict = field(default_factory=dict)

    def off_device(self) -> None:
        """Move the shared components to the host, so a memory mode's peak counts only its own."""
        for name in ("text_encoder", "text_encoder_2", "vae"):
            self.components[name].to("cpu")

    def on_device(self) -> None:
        for name in ("text_encoder", "text_encoder_2", "vae"):
            self.components[name].to(self.device)

    def fresh_components(self) -> dict:
        from .components import load_components

        self.components.pop("transformer", None)  # the first load's spare would sit on the device too
        return load_components(self.plain)

    def take_transformer(self) -> torch.nn.Module:
        from .components import load_model_transformer

        spare = self.components.pop("transformer", None)
        return spare if spare is not None else load_model_transformer(self.plain)

    @property
    def device(self) -> torch.device:
        return self.plain.device

    @property
    def dtype(self) -> torch.dtype:
        return self.plain.dtype


def run_benchmark(args: BenchArgs, on_row=None) -> dict:
    """Run the configurations in the order given and return the result record (see module docstring).

    Each configuration runs inside its own time box (``args.config_timeout``); a failure or a timeout
    becomes an error row and the next configuration runs. ``on_row(row, record)`` is called after every
    row with the record so far, so reports survive whatever stops the run later.
    """
    from .config import resolve_device

    device = resolve_device(args.device)
    if args.context_parallel > 1:  # every rank runs every configuration in step; rank 0 reports
        from .context_parallel import init_process_group

        device = init_process_group(args.context_parallel, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    configs = select_configs(args.configs, device)
    from .components import load_components

    t0 = time.perf_counter()
    plain = _plain_config(args, device, dtype)
    shared = _Shared(load_components(plain), plain)
    load_s = time.perf_counter() - t0
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row, _record(args, device, dtype, load_s, rows))

    for bench in configs:
        log.info("benchmarking %s", bench.name)
        done: set[str] = set()
        with TimeBox(args.config_timeout) as box:
            try:
                for row in _run_config(bench, args, shared, box):
                    done.add(row.get("setting"))
                    add(row)
            except Exception as exc:  # any failure becomes this configuration's error rows
                error = str(exc) if box.expired else f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                for setting in args.settings:
                    if setting.label not in done:
                        add(dict(config=bench.name, setting=setting.label, error=error))
        torch._dynamo.reset()  # a configuration's compiled graphs never serve the next one
        _free(device)
        if bench.memory != "gpu":
            shared.on_device()
    return _record(args, device, dtype, load_s, rows)


def _run_config(bench: BenchConfig, args: BenchArgs, shared: _Shared, box: TimeBox):
    """Yield one row per setting for one configuration (its own pipeline over fresh copies)."""
    from .pipeline import SRPOPipeline

    device = shared.device
    if bench.memory == "gpu":
        # Compile wraps vae.decode without changing the VAE, so it is shared as it is.
        parts = {**shared.components, "transformer": shared.take_transformer()}
    else:  # offloading moves and hooks the components: a set of its own, the shared one off the device
        shared.off_device()
        parts = shared.fresh_components()
    config = PipelineConfig(
        model=args.model,
        base=args.base,
        device=device,
        dtype=shared.dtype,
        attention=bench.attention,
        quantize=bench.quantize,
        compile=bench.compile,
        compile_scope=bench.compile_scope,
        compile_mode=bench.compile_mode,
        compile_backend=args.compile_backend,
        cache_dir=None,
        progress=False,
        memory=bench.memory,
        context_parallel=1 if bench.baseline else args.context_parallel,
    ).resolved()
    pipe = SRPOPipeline(parts, config)
    runner = _Baseline(pipe) if bench.baseline else None
    graphs_start = pipe.compiled_graphs()
    graphs_after_first = None
    failures_after_first: dict[str, list[str]] = {}
    for setting in args.settings:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        row = dict(
            config=bench.name, setting=setting.label, width=setting.width, height=setting.height, steps=setting.steps
        )
        if pipe.optimized.context_parallel is not None:
            row["context_parallel"] = pipe.optimized.context_parallel.degrees.describe()
        try:
            first, times, denoise = None, [], []
            for i in range(args.repeats + 1):  # call 0 is the warm-up (and the compile)
                if runner is not None:
                    latents, image, seconds, den = runner.run(setting)
                    evaluations = setting.steps
                else:
                    latents, image, seconds, den, evaluations = _ours_run(pipe, setting, bench.acceleration)
                if i == 0:
                    first = seconds
                    if graphs_after_first is None:
                        graphs_after_first = pipe.compiled_graphs()
                        failures_after_first = guard_failures()
                else:
                    times.append(seconds)
                    denoise.append(den)
        except Exception as exc:  # one setting's failure is that row's error
            if box.expired or isinstance(exc, ConfigTimeout):
                raise
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            _free(device)
            yield row
            continue
        median = statistics.median(times)
        if setting.label not in shared.flops:
            shared.flops[setting.label] = _count_flops(pipe, setting)
        row.update(
            seconds_per_image=median,
            first_call_seconds=first,
            ms_per_step=statistics.median(denoise) / setting.steps * 1e3,
            transformer_evaluations=evaluations,
            transformer_tflops=shared.flops[setting.label] * setting.steps / median / 1e12,
            peak_memory_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
            graphs_compiled=pipe.compiled_graphs() - graphs_start,
            recompiles_after_first_size=pipe.compiled_graphs() - (graphs_after_first or graphs_start),
        )
        if row["recompiles_after_first_size"]:  # what compiled, and why (torch.compile's failed guards)
            row["recompile_reasons"] = new_guard_failures(failures_after_first) or ["a new graph (no guard failed)"]
        if bench.baseline:
            shared.reference[setting.label] = (latents.float().cpu(), image)
        if setting.label in shared.reference:
            ref_latents, ref_image = shared.reference[setting.label]
            row["latent_rel_err_vs_baseline"] = relative_error(latents.float().cpu(), ref_latents)
            row["psnr_vs_baseline_db"] = psnr(image, ref_image)
        yield row


def _record(args: BenchArgs, device: torch.device, dtype: torch.dtype, load_s: float, rows: list[dict]) -> dict:
    base_times = {
        r["setting"]: r["seconds_per_image"] for r in rows if r.get("config") == "diffusers" and "error" not in r
    }
    for r in rows:
        if r.get("setting") in base_times and "seconds_per_image" in r:
            r["speedup_vs_baseline"] = base_times[r["setting"]] / r["seconds_per_image"]
    return dict(
        benchmark="pipeline",
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        model=args.model,
        device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        dtype=str(dtype).replace("torch.", ""),
        versions=_versions(),
        repeats=args.repeats,
        context_parallel=args.context_parallel,  # processes per image (GPUs), the baseline excepted
        load_seconds=load_s,
        prompt=PROMPT,
        seed=SEED,
        note="random weights: speeds are real; deviations, images and how often the step cache skips are "
        "not representative of SRPO (a trained model's residuals evolve differently)"
        if args.model in ("tiny-random", "full-random")
        else "",
        skipped=skipped_configs(args.configs, device),
        rows=rows,
    )


def _count_flops(pipe, setting: Setting) -> int:
    req = GenerationRequest(PROMPT, setting.width, setting.height, seed=SEED, num_inference_steps=1)
    with torch.inference_mode():
        embeds, pooled, text_ids, _ = pipe.encode_prompt(req.prompt)
        noise = pipe.prepare_noise([SEED], setting.width, setting.height)
        img_ids = pipe.latent_image_ids(1, setting.width, setting.height)
    inputs = dict(
        hidden_states=noise,
        timestep=torch.full((1,), 0.5, device=pipe.device, dtype=pipe.dtype),
        guidance=torch.full((1,), 4.5, device=pipe.device),
        pooled_projections=pooled,
        encoder_hidden_states=embeds,
        txt_ids=text_ids,
        img_ids=img_ids,
        return_dict=False,
    )
    cp = pipe.optimized.context_parallel
    if cp is None:
        return transformer_flops(pipe.transformer, inputs)["total"]  # the module itself, never the compiled fn
    # Split: this rank's share (its tokens' linears, its heads' or queries' attention) times the ranks.
    return transformer_flops(pipe.transformer, cp.pad(inputs))["total"] * cp.degree


def _versions() -> dict:
    import diffusers
    import transformers

    versions = dict(
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
    )
    for name in ("triton", "torchao", "optimum.quanto"):
        try:
            module = __import__(name, fromlist=["__version__"])
            versions[name] = getattr(module, "__version__", "?")
        except ImportError:
            versions[name] = None
    if torch.cuda.is_available():
        versions["cuda"] = torch.version.cuda
    return versions


# ----------------------------------------------------------------------------- reports


def markdown_header() -> str:
    """The table's column header (two lines)."""
    return (
        "| setting | config | s/image | ms/step | full evals | × baseline | TFLOP/s | peak GB | first call s | "
        "recompiles | latent rel. err | PSNR dB |\n" + "|" + "---|" * 12
    )


def markdown_row(r: dict) -> str:
    """One row of the table (an error row says what failed)."""

    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    if "error" in r:
        return f"| {r.get('setting', '–')} | {r['config']} | error: {r['error'][:80]} |" + " |" * 9
    config = f"{r['config']} ({r['context_parallel']})" if r.get("context_parallel") else r["config"]
    return (
        f"| {r['setting']} | {config} | {f(r['seconds_per_image'], '.3f')} | {f(r['ms_per_step'], '.1f')} | "
        f"{r['transformer_evaluations']}/{r['steps']} | "
        f"{f(r.get('speedup_vs_baseline'), '.2f')} | {f(r['transformer_tflops'], '.3g')} | "
        f"{f(r['peak_memory_gb'], '.1f')} | {f(r['first_call_seconds'], '.1f')} | "
        f"{r['recompiles_after_first_size']} | {f(r.get('latent_rel_err_vs_baseline'), '.2e')} | "
        f"{f(r.get('psnr_vs_baseline_db'), '.1f')} |"
    )


def markdown_table(result: dict) -> str:
    """The rows as a Markdown table."""
    head = (
        f"Pipeline benchmark: {result['model']} on {result['device']} ({result['dtype']}), {result['date']}, "
        f"median of {result['repeats']}"
    )
    lines = [head, "", markdown_header(), *(markdown_row(r) for r in result["rows"]), "", *markdown_notes(result)]
    return "\n".join(lines)


def markdown_notes(result: dict) -> list[str]:
    """What follows the table: what recompiles means, each recompile's reason (when there are any),
    the configurations skipped and the note on random weights."""
    reasons = [
        f"- {r['config']} at {r['setting']}: {reason}"
        for r in result["rows"]
        for reason in r.get("recompile_reasons", [])
    ]
    lines = [RECOMPILES_EXPLAINED + (" Each recompile's reason (the guard that failed):" if reasons else ""), *reasons]
    if result.get("skipped"):
        lines += ["", "Skipped (cannot run here): " + "; ".join(f"{n}: {why}" for n, why in result["skipped"].items())]
    if result.get("note"):
        lines += ["", f"Note: {result['note']}."]
    return lines


RECOMPILES_EXPLAINED = (
    "recompiles: graphs torch.compile built at this setting after the configuration's first setting. The "
    "bench calls no warmup() (it times the first call instead), so a whole-model compile may build its VAE "
    "decoder's large-size graph here: convolution guards split the decoder into a small and a large graph, "
    "which warmup() builds ahead of any request."
)


def chart(result: dict, path: Path) -> None:
    """Seconds per image per configuration, one group of bars per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "seconds_per_image" in r]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(settings) * max(1, len(configs)) / 3), 4.5))
    width = 0.8 / max(1, len(configs))
    for i, name in enumerate(configs):
        mine = {r["setting"]: r for r in rows if r["config"] == name}
        points = [
            (j + i * width, mine[s]["seconds_per_image"], mine[s].get("speedup_vs_baseline"))
            for j, s in enumerate(settings)
            if s in mine
        ]
        ax.bar([p[0] for p in points], [p[1] for p in points], width, label=name)
        for x, y, speed in points:
            if speed:
                ax.annotate(f"{speed:.1f}×", (x, y), ha="center", va="bottom", fontsize=7)
    ax.set_xticks([j + width * (len(configs) - 1) / 2 for j in range(len(settings))], settings)
    ax.set_ylabel("seconds per image (median)")
    ax.set_title(f"{result['model']} on {result['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_reports(result: dict, out_dir: Path) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.md`` and ``bench.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "md": out_dir / "bench.md", "png": out_dir / "bench.png"}
    # Strict JSON (no bare Infinity or NaN, which JSON.parse refuses): an infinite PSNR (identical
    # images) and any other non-finite number become null.
    paths["json"].write_text(json.dumps(_finite(result), indent=2, default=str, allow_nan=False) + "\n")
    paths["md"].write_text(markdown_table(result) + "\n")
    try:
        chart(result, paths["png"])
    except ImportError:  # the chart is a convenience; the numbers are in the JSON and the table
        if not _said["no matplotlib"]:  # reports are rewritten after every row: say it once
            log.warning("no chart: matplotlib is missing (pip install 'srpo-infer[bench]')")
            _said["no matplotlib"] = True
        del paths["png"]
    return paths


_said = {"no matplotlib": False}


def _finite(value):
    """``value`` with every non-finite float replaced by None, for strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
