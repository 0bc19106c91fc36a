"""srpo-infer bench: the CPU smoke run writes complete JSON, Markdown and a PNG chart; FLOP counts
match the cost model."""

from __future__ import annotations

import json
import time

import pytest
import torch

from srpo_infer.bench.flops import transformer_flops
from srpo_infer.cli import main

# Not the table's order (diffusers, ours-eager, +fp8-weight, +compile, +cache-high). +compile has a test of
# its own below: its trace is most of a run's time, and one test held it all past 30 s.
ORDER = ["diffusers", "+cache-high", "ours-eager", "+fp8-weight"]


@pytest.mark.slow  # ~8 s: four configurations at two sizes; CI's slow step
def test_bench_smoke_on_the_tiny_model(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "--model",
            "tiny-random",
            "--device",
            "cpu",
            "--sizes",
            "512x512",
            "640x512",
            "--steps",
            "2",
            "--no-official",
            "--repeats",
            "1",
            "--compile-backend",
            "eager",
            "--out",
            str(out),
            "--configs",
            *ORDER,
        ]
    )
    assert code == 0

    def strict(constant):  # what JSON.parse and other strict parsers refuse
        raise ValueError(f"bench.json holds {constant}, which is not JSON")

    result = json.loads((out / "bench.json").read_text(), parse_constant=strict)
    assert result["versions"]["torch"] == torch.__version__ and result["note"]
    assert list(dict.fromkeys(r["config"] for r in result["rows"])) == ORDER
    printed = capsys.readouterr().out
    assert printed.index("| 512x512@2 | +cache-high |") < printed.index("| 512x512@2 | ours-eager |")
    assert printed.count("| 512x512@2 | +cache-high |") == 1  # each row once, as it lands
    assert "is listed:" not in printed and "reason (the guard that failed):" not in printed  # no recompiles here
    rows = {(r["config"], r["setting"]): r for r in result["rows"]}
    assert set(rows) == {(c, s) for c in ORDER for s in ("512x512@2", "640x512@2")}
    for (config, _), r in rows.items():
        assert "error" not in r, r
        for key in (
            "seconds_per_image",
            "ms_per_step",
            "transformer_tflops",
            "first_call_seconds",
            "speedup_vs_baseline",
            "latent_rel_err_vs_baseline",
            "psnr_vs_baseline_db",
        ):
            if key == "psnr_vs_baseline_db" and r["latent_rel_err_vs_baseline"] == 0:
                assert r[key] is None  # identical images: an infinite PSNR, null in strict JSON
                continue
            assert r[key] is not None and r[key] == r[key], (config, key)
        assert r["seconds_per_image"] > 0 and r["ms_per_step"] > 0
    # Our eager loop is the baseline's math; fp8-weight is not.
    assert rows[("ours-eager", "512x512@2")]["latent_rel_err_vs_baseline"] < 1e-5
    assert 1e-4 < rows[("+fp8-weight", "512x512@2")]["latent_rel_err_vs_baseline"] < 0.2
    assert rows[("ours-eager", "512x512@2")]["transformer_evaluations"] == 2
    assert "| setting | config |" in (out / "bench.md").read_text()
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # a compile trace of its own (~25 s); the compiled path itself is test_fast_path's
def test_the_compiled_row_is_the_baselines_math_and_compiles_nothing_at_the_second_size():
    """+compile (backend eager: the same graphs as Inductor's, without a C++ build) against the stock
    baseline at two sizes: the same latents, and no graph built for the second size."""
    from srpo_infer import bench

    args = bench.BenchArgs(
        model="tiny-random",
        device="cpu",
        settings=[bench.Setting(512, 512, 2), bench.Setting(640, 512, 2)],
        repeats=1,
        configs=["diffusers", "+compile"],
        compile_backend="eager",
    )
    rows = {(r["config"], r["setting"]): r for r in bench.run_benchmark(args)["rows"]}
    assert set(rows) == {(c, s) for c in ("diffusers", "+compile") for s in ("512x512@2", "640x512@2")}
    for setting in ("512x512@2", "640x512@2"):
        compiled = rows[("+compile", setting)]
        assert "error" not in compiled, compiled
        assert compiled["latent_rel_err_vs_baseline"] < 1e-5 and compiled["seconds_per_image"] > 0
    assert rows[("+compile", "640x512@2")]["recompiles_after_first_size"] == 0


@pytest.mark.slow  # ~4 s: CI's slow step
def test_a_configuration_past_its_time_box_becomes_an_error_row_and_the_next_runs(monkeypatch):
    """Event-driven, not a race with the clock: the stuck call records that the box interrupted it, and
    the next configuration's generation is a canned one, so a slow machine cannot push it past its box."""
    from PIL import Image

    from srpo_infer import bench
    from srpo_infer.bench import run
    from srpo_infer.bench.timebox import ConfigTimeout

    interrupted = []

    def stuck(*_args, **_kwargs):
        try:
            time.sleep(3600)
        except ConfigTimeout:
            interrupted.append(True)
            raise

    def canned(self, setting):
        latents = torch.zeros(1, (setting.width // 16) * (setting.height // 16), 64)
        return latents, Image.new("RGB", (setting.width, setting.height)), 0.5, 0.4

    monkeypatch.setattr(run, "time_ours", stuck)
    monkeypatch.setattr(run.Baseline, "run", canned)
    monkeypatch.setattr(run, "count_flops", lambda *_: 1)
    seen = []
    args = bench.BenchArgs(
        model="tiny-random",
        device="cpu",
        settings=[bench.Setting(512, 512, 1)],
        repeats=1,
        configs=["ours-eager", "diffusers"],
        config_timeout=3,
    )
    result = bench.run_benchmark(args, on_row=lambda row, record: seen.append(len(record["rows"])))
    assert interrupted == [True]  # the hour-long call was cut by the box, not waited for
    stuck_row, baseline_row = result["rows"]
    assert stuck_row == {"config": "ours-eager", "setting": "512x512@1", "error": "timed out after 3 s"}
    assert baseline_row["config"] == "diffusers" and baseline_row["seconds_per_image"] == 0.5
    assert seen == [1, 2]  # each row reported as it landed


def test_unknown_configuration_names_are_refused():
    from srpo_infer.bench.configs import select_configs

    with pytest.raises(ValueError, match=r"unknown configuration\(s\) \['\+compile\+fp9'\]"):
        select_configs(["diffusers", "+compile+fp9"], torch.device("cpu"))


def test_flop_count_matches_the_design_cost_model():
    """FLUX.1-dev at 1024² (4096 image + 512 text tokens): 59.5 TFLOP linear + 14.9 TFLOP attention."""
    from diffusers import FluxTransformer2DModel

    from srpo_infer.full_random import FLUX_DEV_TRANSFORMER

    with torch.device("meta"):
        model = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
        inputs = dict(
            hidden_states=torch.empty(1, 4096, 64),
            encoder_hidden_states=torch.empty(1, 512, 4096),
            pooled_projections=torch.empty(1, 768),
            timestep=torch.empty(1),
            guidance=torch.empty(1),
            img_ids=torch.empty(4096, 3),
            txt_ids=torch.empty(512, 3),
            return_dict=False,
        )
        flops = transformer_flops(model, inputs)
    assert flops["linear"] / 1e12 == pytest.approx(59.5, rel=0.01)
    assert flops["attention"] == 57 * 4 * 4608**2 * 3072  # 14.9 TFLOP
    assert flops["total"] == flops["linear"] + flops["attention"]


def test_full_random_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    import srpo_infer

    with pytest.raises(ValueError, match="needs CUDA"):
        srpo_infer.load_pipeline("full-random", device="cpu")


def test_the_default_table_leaves_out_what_cannot_run_here_and_says_why(monkeypatch, capsys, tmp_path):
    """The quick-start install has no optimum-quanto: the default CPU table then runs without +fp8-weight
    and says so in one line, instead of error rows."""
    import srpo_infer.bench as bench
    from srpo_infer.bench.configs import select_configs
    from srpo_infer.quantize import require_extra

    def missing(module, extra):
        if module == "optimum.quanto":
            raise ValueError("quantize='fp8-weight' needs optimum-quanto: pip install 'srpo-infer[fp8-weight]'")
        return require_extra(module, extra)

    monkeypatch.setattr("srpo_infer.quantize.require_extra", missing)
    cpu = torch.device("cpu")
    assert "+fp8-weight" not in [c.name for c in select_configs(None, cpu)]
    assert bench.skipped_configs(None, cpu) == {
        "+fp8-weight": "quantize='fp8-weight' needs optimum-quanto: pip install 'srpo-infer[fp8-weight]'"
    }
    assert bench.skipped_configs(["+fp8-weight"], cpu) == {}  # asked for by name: it runs, or errors saying why
    monkeypatch.setattr(bench, "run_benchmark", lambda args, on_row: {"rows": [], "skipped": {}, "model": "m"})
    monkeypatch.setattr(bench, "write_reports", lambda result, out: {})
    assert main(["bench", "--device", "cpu", "--out", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "skipping +fp8-weight: quantize='fp8-weight' needs optimum-quanto" in err
