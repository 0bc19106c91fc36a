"""The run: each configuration in its own time box, over a freshly loaded transformer, one row per
setting as it lands."""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..compile import guard_failures, new_guard_failures
from ..config import PipelineConfig
from .configs import BenchArgs, BenchConfig, Setting, select_configs
from .deviation import psnr, relative_error
from .flops import count_flops
from .record import record
from .timebox import ConfigTimeout, TimeBox
from .timing import Baseline, free_memory, time_ours

log = logging.getLogger("srpo_infer.bench")


@dataclass
class Shared:
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
        from ..components import load_components

        self.components.pop("transformer", None)  # the first load's spare would sit on the device too
        return load_components(self.plain)

    def take_transformer(self) -> torch.nn.Module:
        from ..components import load_model_transformer

        spare = self.components.pop("transformer", None)
        return spare if spare is not None else load_model_transformer(self.plain)

    @property
    def device(self) -> torch.device:
        return self.plain.device

    @property
    def dtype(self) -> torch.dtype:
        return self.plain.dtype


def run_benchmark(args: BenchArgs, on_row=None) -> dict:
    """Run the configurations in the order given and return the result record (see the package docstring).

    Each configuration runs inside its own time box (``args.config_timeout``); a failure or a timeout
    becomes an error row and the next configuration runs. ``on_row(row, record)`` is called after every
    row with the record so far, so reports survive whatever stops the run later.
    """
    from ..components import load_components
    from ..config import resolve_device

    device = resolve_device(args.device)
    if args.context_parallel > 1:  # every rank runs every configuration in step; rank 0 reports
        from ..context_parallel import init_process_group

        device = init_process_group(args.context_parallel, device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    configs = select_configs(args.configs, device)
    t0 = time.perf_counter()
    plain = _plain_config(args, device, dtype)
    shared = Shared(load_components(plain), plain)
    load_s = time.perf_counter() - t0
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        if on_row is not None:
            on_row(row, record(args, device, dtype, load_s, rows))

    for bench in configs:
        log.info("benchmarking %s", bench.name)
        _run_boxed(bench, args, shared, add)
        torch._dynamo.reset()  # a configuration's compiled graphs never serve the next one
        free_memory(device)
        if bench.memory != "gpu":
            shared.on_device()
    return record(args, device, dtype, load_s, rows)


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


def _run_boxed(bench: BenchConfig, args: BenchArgs, shared: Shared, add) -> None:
    """One configuration's rows inside its time box; whatever stops it, every setting it did not reach
    becomes an error row that says why."""
    done: set[str] = set()
    with TimeBox(args.config_timeout) as box:
        try:
            for row in _run_config(bench, args, shared, box):
                done.add(row.get("setting"))
                add(row)
        except Exception as exc:  # any failure becomes this configuration's error rows
            error = str(exc) if box.expired else _error(exc)
            for setting in args.settings:
                if setting.label not in done:
                    add(dict(config=bench.name, setting=setting.label, error=error))


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"


def _run_config(bench: BenchConfig, args: BenchArgs, shared: Shared, box: TimeBox):
    """Yield one row per setting for one configuration (its own pipeline over fresh copies)."""
    pipe = _pipeline(bench, args, shared)
    runner = Baseline(pipe) if bench.baseline else None
    graphs = _Graphs(pipe)
    for setting in args.settings:
        if shared.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(shared.device)
        row = dict(
            config=bench.name, setting=setting.label, width=setting.width, height=setting.height, steps=setting.steps
        )
        if pipe.context_parallel is not None:
            row["context_parallel"] = pipe.context_parallel.degrees.describe()
        try:
            timed = _time_setting(pipe, runner, bench, setting, args.repeats, graphs)
        except Exception as exc:  # one setting's failure is that row's error
            if box.expired or isinstance(exc, ConfigTimeout):
                raise
            row["error"] = _error(exc)
            free_memory(shared.device)
            yield row
            continue
        row.update(_measures(pipe, setting, timed, shared, graphs))
        if bench.baseline:
            shared.reference[setting.label] = (timed.latents.float().cpu(), timed.image)
        if setting.label in shared.reference:
            ref_latents, ref_image = shared.reference[setting.label]
            row["latent_rel_err_vs_baseline"] = relative_error(timed.latents.float().cpu(), ref_latents)
            row["psnr_vs_baseline_db"] = psnr(timed.image, ref_image)
        yield row


def _pipeline(bench: BenchConfig, args: BenchArgs, shared: Shared):
    """The configuration's pipeline: the shared components around a fresh transformer, or (offloading
    moves and hooks the components) a set of its own, the shared one moved off the device."""
    from ..loading import assemble_pipeline

    if bench.memory == "gpu":
        # Compile wraps vae.decode without changing the VAE, so it is shared as it is.
        parts = {**shared.components, "transformer": shared.take_transformer()}
    else:
        shared.off_device()
        parts = shared.fresh_components()
    config = PipelineConfig(
        model=args.model,
        base=args.base,
        device=shared.device,
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
    return assemble_pipeline(parts, config)


class _Graphs:
    """Graphs torch.compile built: since the configuration's pipeline was made, and since its first call
    (the first setting's warm-up), with the guards that had failed by then."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.start = pipe.compiled_graphs()
        self.after_first: int | None = None
        self.failures_after_first: dict[str, list[str]] = {}

    def first_call_done(self) -> None:
        if self.after_first is None:
            self.after_first = self.pipe.compiled_graphs()
            self.failures_after_first = guard_failures()

    def counts(self) -> dict:
        now = self.pipe.compiled_graphs()
        counts = dict(
            graphs_compiled=now - self.start, recompiles_after_first_size=now - (self.after_first or self.start)
        )
        if counts["recompiles_after_first_size"]:  # what compiled, and why (torch.compile's failed guards)
            counts["recompile_reasons"] = new_guard_failures(self.failures_after_first) or [
                "a new graph (no guard failed)"
            ]
        return counts


@dataclass
class _Timed:
    """One setting's calls: the warm-up's seconds, the timed calls' seconds and denoising seconds, and
    the last call's outputs."""

    first: float
    seconds: list[float]
    denoise: list[float]
    latents: torch.Tensor
    image: object
    evaluations: int


def _time_setting(pipe, runner: Baseline | None, bench: BenchConfig, setting: Setting, repeats: int, graphs) -> _Timed:
    timed = _Timed(0.0, [], [], None, None, 0)
    for i in range(repeats + 1):  # call 0 is the warm-up (and the compile)
        if runner is not None:
            timed.latents, timed.image, seconds, denoise = runner.run(setting)
            timed.evaluations = setting.steps
        else:
            timed.latents, timed.image, seconds, denoise, timed.evaluations = time_ours(
                pipe, setting, bench.acceleration
            )
        if i == 0:
            timed.first = seconds
            graphs.first_call_done()
        else:
            timed.seconds.append(seconds)
            timed.denoise.append(denoise)
    return timed


def _measures(pipe, setting: Setting, timed: _Timed, shared: Shared, graphs: _Graphs) -> dict:
    """The row's speed, FLOP rate, memory and compile numbers."""
    median = statistics.median(timed.seconds)
    compiled = graphs.counts()  # before the FLOP count, whatever it costs
    if setting.label not in shared.flops:
        shared.flops[setting.label] = count_flops(pipe, setting)
    device = shared.device
    return dict(
        seconds_per_image=median,
        first_call_seconds=timed.first,
        ms_per_step=statistics.median(timed.denoise) / setting.steps * 1e3,
        transformer_evaluations=timed.evaluations,
        transformer_tflops=shared.flops[setting.label] * setting.steps / median / 1e12,
        peak_memory_gb=torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        **compiled,
    )
