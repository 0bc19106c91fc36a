"""One image split over several processes (diffusers' context parallelism), on the CPU with gloo:
the split run gives the latents of one process, for Ulysses, ring, and sizes the degree does not
divide; the padding mask is exact; combinations that cannot run fail in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import free_port, wait_healthy

from srpo_infer import load_pipeline
from srpo_infer.config import PipelineConfig
from srpo_infer.context_parallel import MASK_CHANNELS, attention_with_lse, pad_keys, plan_degrees

WORKER = Path(__file__).parent / "context_parallel_worker.py"


def torchrun(processes: int, *args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node N ARGS``, as a user launches it (a free port each time)."""
    env = {
        **{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"},
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def split_runs(tmp_path: Path, processes: int, *cases: str) -> dict:
    out = tmp_path / "latents.pt"
    torchrun(processes, str(WORKER), "pipeline", str(out), *cases)
    return torch.load(out)


@pytest.mark.slow  # two processes, ~35 s: CI's slow step
def test_two_processes_give_one_process_latents_with_ulysses_and_ring(tmp_path):
    results = split_runs(tmp_path, 2, "1440x512:1", "1440x512:2", "1440x512:1:triton")
    for case, how in (
        ("1440x512:1", "context_parallel:ulysses 2"),
        ("1440x512:2", "context_parallel:ring 2"),
        ("1440x512:1:triton", "context_parallel:ulysses 2"),
    ):
        r = results[case]
        assert r["how"] == how
        assert r["split"].shape == r["whole"].shape == (1, 90 * 32, 16)
        diff = (r["split"] - r["whole"]).abs().max().item()
        if "ring" in how:  # each query's softmax merged from two key shards: float32 rounding
            assert 0 < diff <= 1e-5, diff
        else:  # Ulysses attends over the whole sequence in its own order: what one process computes
            assert diff == 0, (case, diff)
        assert "acceleration 'regular' (first-block caching) does not run with context_parallel=2" in r["refusal"]


@pytest.mark.slow  # two and three processes, 25 s and more: CI's slow step
@pytest.mark.parametrize("processes", [2, 3])
def test_ulysses_runs_our_kernels_over_the_whole_sequence(tmp_path, processes):
    # 7 text and 13 image tokens (padded to a multiple of the processes), 6 heads, both block layouts,
    # every backend under the Triton interpreter: equal to one process's output bit for bit.
    out = tmp_path / "attention.pt"
    torchrun(
        processes,
        str(WORKER),
        "attention",
        str(out),
        "sdpa",
        "triton",
        "triton-int8",
        "triton-int8-fp8",
        env={"TRITON_INTERPRET": "1"},
    )
    diffs = torch.load(out)
    assert len(diffs) == 4 * 2 * processes
    assert all(d == 0 for d in diffs.values()), diffs


@pytest.mark.slow
def test_three_processes_pad_sizes_the_degree_does_not_divide(tmp_path):
    # 544x544: 1156 image and 512 text tokens, neither divisible by 3; the tiny model's 2 heads make it ring.
    r = split_runs(tmp_path, 3, "544x544:auto")["544x544:auto"]
    assert r["how"] == "context_parallel:ring 3"
    assert (r["split"] - r["whole"]).abs().max().item() <= 1e-5


@pytest.mark.slow
def test_regional_compile_splits_and_pads_too(tmp_path):
    r = split_runs(tmp_path, 3, "544x544:auto:compile")["544x544:auto:compile"]  # 1156 + 512 tokens: padded
    assert r["how"] == "compile:inductor:regional:default"
    assert (r["split"] - r["whole"]).abs().max().item() <= 1e-5  # against one compiled process


# ----------------------------------------------------------------------------- the padding mask


def _attention(q, k, v, scale):
    return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), scale=scale).transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_padding_keys_get_exactly_zero_weight(dtype):
    g = torch.Generator().manual_seed(3)
    real, pad, heads, dim = 37, 3, 2, 16
    q, k, v = (torch.randn(1, real + pad, heads, dim, generator=g, dtype=dtype) * 4 for _ in range(3))
    flags = torch.arange(real + pad) >= real
    scale = dim**-0.5
    expected = _attention(q, k[:, :real], v[:, :real], scale)
    qp, kp, vp = pad_keys(q, k, v, flags)
    assert qp.shape[-1] == dim + MASK_CHANNELS
    masked = _attention(qp, kp, vp, scale)[..., :dim]
    # float32: the padded sequence rounds its sums differently (seen: 1.9e-6 on outputs of ~10, rel. 2e-7).
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(masked, expected, **tol)
    unmasked = _attention(q, k, v, scale)  # what the padding does without the mask: the test can fail
    assert (unmasked - expected).abs().max() > 1e-3


def test_the_ring_attention_op_returns_the_log_sum_exp():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, n, 3, 24, generator=g) for n in (11, 13, 13))
    out, lse = attention_with_lse(None, q, k, v, scale=0.2, return_lse=True)
    scores = torch.einsum("bshd,bthd->bhst", q, k) * 0.2
    torch.testing.assert_close(out, _attention(q, k, v, 0.2))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1).transpose(1, 2))


def test_degrees_follow_the_heads():
    assert plan_degrees(2, "auto", 24).describe() == "ulysses 2"
    assert plan_degrees(3, "auto", 2).describe() == "ring 3"
    assert plan_degrees(4, 2, 24).describe() == "ulysses 2 × ring 2"
    with pytest.raises(ValueError, match="Ulysses degree of 3, which does not divide the model's 2 attention heads"):
        plan_degrees(3, 1, 2)


# ----------------------------------------------------------------------------- clear errors


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(context_parallel=0), "context_parallel must be a whole number of processes >= 1, got 0"),
        (dict(context_parallel=2, ring_degree=3), "ring_degree must be 'auto' or a divisor of context_parallel=2"),
        (
            dict(context_parallel=2, ring_degree=2, attention="triton"),
            "attention='triton' splits an image with Ulysses only",
        ),
        (dict(context_parallel=2, memory="offload-group"), "memory='offload-group' cannot split an image"),
        (dict(context_parallel=2, compile=True, compile_scope="full"), "compile_scope='full' does not run with"),
    ],
)
def test_combinations_that_cannot_run_are_named(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        PipelineConfig(model="tiny-random", device="cpu", **options).resolved()


def test_a_degree_without_its_processes_is_one_line(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ValueError, match="launch it with torchrun --nproc-per-node 2"):
        load_pipeline("tiny-random", device="cpu", context_parallel=2)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="context_parallel=2 but torchrun started 3 processes"):
        load_pipeline("tiny-random", device="cpu", context_parallel=2)


# ----------------------------------------------------------------------------- the server


def _split_serve_args(port: int, output_dir) -> list[str]:
    """``-m srpo_infer serve`` on the tiny model, split over 2 processes."""
    args = "-m srpo_infer serve --model tiny-random --device cpu --context-parallel 2".split()
    return [*args, "--port", str(port), "--output-dir", str(output_dir)]


@pytest.mark.slow
def test_a_two_process_server_returns_the_one_process_image(tmp_path, tiny_pipe):
    import base64
    import io
    import signal

    import httpx
    import numpy as np
    from live_server import LiveServer
    from PIL import Image

    from srpo_infer.server import create_app

    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        *_split_serve_args(port, tmp_path / "split"),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    body = {
        "prompt": "a lighthouse",
        "image_size": {"width": 1440, "height": 512},
        "seed": 9,
        "num_inference_steps": 4,
        "response_format": "b64_json",
        "output_format": "png",
    }

    def image(base: str) -> np.ndarray:
        r = httpx.post(f"{base}/v1/images/generations", json=body, timeout=600)
        assert r.status_code == 200, r.text
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"]))), dtype=int)

    try:
        wait_healthy(url, [proc])
        split = image(url)
        refused = httpx.post(f"{url}/v1/images/generations", json={"prompt": "x", "acceleration": "high"}, timeout=60)
        with LiveServer(create_app(tiny_pipe, output_dir=tmp_path / "whole")) as one:
            whole = image(one.url)
    finally:
        proc.send_signal(signal.SIGTERM)  # torchrun passes it on: rank 0 drains, then tells rank 1 to stop
        out, _ = proc.communicate(timeout=300)
    assert split.shape == whole.shape == (512, 1440, 3)
    assert np.array_equal(split, whole)  # Ulysses: the same latents bit for bit, so the same pixels
    assert refused.status_code == 422 and refused.json()["error"]["field"] == "acceleration"
    assert "rank 1 follows rank 0's requests" in out and "draining" in out


@pytest.mark.slow
def test_a_lost_rank_answers_503_and_fails_health(tmp_path):
    import signal

    import httpx

    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": "2",
    }
    env.pop("TRITON_INTERPRET", None)
    cmd = [
        sys.executable,
        *_split_serve_args(port, tmp_path),
    ]

    def rank(r: int) -> subprocess.Popen:
        env_r = {**env, "RANK": str(r), "LOCAL_RANK": str(r)}
        return subprocess.Popen(cmd, env=env_r, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    ranks = [rank(0), rank(1)]
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, ranks)
        ranks[1].kill()
        ranks[1].wait()
        body = {"prompt": "a cat", "image_size": "square", "num_inference_steps": 2}
        first = httpx.post(f"{url}/v1/images/generations", json=body, timeout=300)
        health = httpx.get(f"{url}/health", timeout=30)
        second = httpx.post(f"{url}/v1/images/generations", json=body, timeout=300)
    finally:
        ranks[0].send_signal(signal.SIGTERM)
        out, _ = ranks[0].communicate(timeout=300)
        ranks[1].kill()
    assert first.status_code == 503 and "context-parallel group failed or is gone" in first.json()["error"]["message"]
    assert health.status_code == 500 and health.json()["status"] == "failed"
    assert "restart the server" in health.json()["reason"]
    assert second.status_code == 503
    assert ranks[0].returncode == 1, out[-2000:]  # it served 503s: a supervisor should restart the group


@pytest.mark.slow
def test_bench_splits_every_configuration_but_the_baseline(tmp_path):
    import json

    configs = ["--configs", "diffusers", "ours-eager", "+cache-high"]
    torchrun(
        2,
        "-m",
        "srpo_infer",
        "bench",
        "--context-parallel",
        "2",
        "--sizes",
        "512x512",
        "--steps",
        "2",
        "--repeats",
        "1",
        *configs,
        "--out",
        str(tmp_path),
    )
    rows = {r["config"]: r for r in json.loads((tmp_path / "bench.json").read_text())["rows"]}
    assert "context_parallel" not in rows["diffusers"]
    assert rows["ours-eager"]["context_parallel"] == "ulysses 2"
    assert rows["ours-eager"]["latent_rel_err_vs_baseline"] < 1e-5
    assert "does not run with context_parallel=2" in rows["+cache-high"]["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md", "bench.png"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["generate", "a cat", "--model", "tiny-random", "--context-parallel", "2"], "launch it with torchrun"),
        (
            ["serve", "--model", "tiny-random", "--context-parallel", "2", "--replicas", "2"],
            "--context-parallel does not run on Ray Serve replicas yet",
        ),
        (
            ["serve", "--model", "tiny-random", "--context-parallel", "2", "--default-acceleration", "regular"],
            "--default-acceleration regular (first-block caching) does not run with context parallelism",
        ),
    ],
)
def test_the_command_line_says_what_cannot_run_in_one_line(monkeypatch, capsys, argv, message):
    from srpo_infer.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
