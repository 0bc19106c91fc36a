"""The srpo-infer command end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from srpo_infer.cli import main


def test_generate_writes_images_and_prints_api_json(tmp_path, capsys):
    code = main(
        [
            "generate",
            "a T-Rex relaxing on a beach",
            "--model",
            "tiny-random",
            "--width",
            "1024",
            "--height",
            "512",
            "--seed",
            "490733907",
            "--steps",
            "2",
            "--num-images",
            "2",
            "--output",
            str(tmp_path),
            "--format",
            "png",
            "--quiet",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["seed"] == 490733907 and out["seeds"] == [490733907, 490733908]
    assert [i["content_type"] for i in out["images"]] == ["image/png"] * 2
    for item in out["images"]:
        assert Image.open(item["url"]).size == (1024, 512)
        assert Path(item["url"]).parent == tmp_path
    assert out["timings"]["inference"] > 0 and out["data"] == out["images"]


def test_output_file_name_picks_the_format(tmp_path, capsys):
    assert (
        main(
            [
                "generate",
                "a cat",
                "--model",
                "tiny-random",
                "--image-size",
                "square",
                "--seed",
                "1",
                "--steps",
                "1",
                "-o",
                str(tmp_path / "cat.jpg"),
                "-q",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["images"][0]["url"] == str(tmp_path / "cat.jpg")
    assert out["images"][0]["content_type"] == "image/jpeg"
    assert Image.open(tmp_path / "cat.jpg").format == "JPEG"


@pytest.mark.parametrize(
    "args, words",
    [
        (["--width", "1000"], ["--width must be", "1000", "multiple of 32"]),
        (["--steps", "0"], ["--steps must be in [1, 50], got 0"]),
        (["--steps", "60"], ["--steps must be", "60", "[1, 50]"]),
        (["--guidance", "30"], ["--guidance must be", "30"]),
        (["--num-images", "9"], ["--num-images must be", "9"]),
        (["--model", "/no/such/file.safetensors"], ["does not exist"]),
        (["--base", "/no/such/folder"], ["--base '/no/such/folder' does not exist"]),
        (["--model", "tiny-randon"], ["--model 'tiny-randon' does not exist", "did you mean 'tiny-random'?"]),
        (["-o", "out.gif"], ["-o 'out.gif' must end in .jpg, .jpeg or .png"]),
        (["-o", "out.png", "--format", "jpeg"], ["-o 'out.png' and --format 'jpeg' disagree"]),
        # The library's own sentence, in the flags the user typed (not compile=False, quantize=...):
        (["--memory", "offload-model", "--compile", "on"], ["--memory offload-model runs eager", "--compile off"]),
    ],
)
def test_errors_are_one_line_naming_the_flag_with_exit_code_2(args, words, capsys, tmp_path):
    code = main(["generate", "a cat", "--model", "tiny-random", "-o", str(tmp_path), "-q", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("srpo-infer: error:") and "Traceback" not in err
    assert err.count("\n") == 1, err  # one line: no unrelated warnings around it
    for w in words:
        assert w in err
    for field in ("num_inference_steps", "guidance_scale", "num_images"):
        assert field not in err


def test_help_shows_each_default_once(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default:" not in text and "default: None" not in text  # one style: [default: …]
    assert "--steps STEPS denoising steps, 1–50 [default: 28]" in text
    assert "[default: 1024]" in text and text.count("default: 1024") == 1
    assert "or None" not in text


@pytest.mark.parametrize("command", ["generate", "warmup", "serve"])
def test_every_load_option_of_the_library_is_a_flag_on_every_loading_command(command, capsys):
    """The flags come from PipelineConfig's own field definitions: a new field appears everywhere at once."""
    from dataclasses import fields

    from srpo_infer.config import PipelineConfig

    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = capsys.readouterr().out
    for flag in (
        "--compile",
        "--quantize",
        "--attention",
        "--memory",
        "--lora",
        "--lora-scale",
        "--dtype",
        "--device",
        "--compile-scope",
        "--quantize-text-encoder",
    ):
        assert f"{flag} " in text or f"{flag}," in text or f"{flag}\n" in text, flag
    for f in fields(PipelineConfig):
        if f.metadata.get("cli"):
            assert "--" + f.name.replace("_", "-") in text, f.name


def test_generate_flags_reach_load_pipeline(monkeypatch, tmp_path, capsys):
    import srpo_infer.loading

    seen = {}

    def fake_load(**options):
        seen.update(options)
        raise ValueError("stop here")

    monkeypatch.setattr(srpo_infer.loading, "load_pipeline", fake_load)
    code = main(
        [
            "generate",
            "a cat",
            "--model",
            "tiny-random",
            "--compile",
            "on",
            "--quantize",
            "none",
            "--attention",
            "triton-int8",
            "--memory",
            "gpu",
            "--lora",
            "x.safetensors",
            "--lora-scale",
            "0.5",
            "--no-lora-fuse",
            "--dtype",
            "float32",
            "-o",
            str(tmp_path),
        ]
    )
    assert code == 2 and "stop here" in capsys.readouterr().err
    assert seen["compile"] is True and seen["quantize"] is None and seen["attention"] == "triton-int8"
    assert seen["memory"] == "gpu" and seen["lora"] == "x.safetensors" and seen["lora_scale"] == 0.5
    assert seen["lora_fuse"] is False and seen["dtype"] == "float32" and seen["model"] == "tiny-random"


def test_version(capsys):
    import srpo_infer

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"srpo-infer {srpo_infer.__version__}"


@pytest.mark.parametrize(
    "args, words",
    [
        (["--steps", "two"], "argument --steps: invalid int value: 'two'"),
        (["--format", "gif"], "argument --format: invalid choice: 'gif'"),
        (["--acceleration", "fast"], "argument --acceleration: invalid choice: 'fast'"),
        (["--stpes", "3"], "unknown option '--stpes': did you mean '--steps'?"),
        (["--compile", "yes"], "argument --compile: invalid choice: 'yes'"),
        (["--attention", "triton-fp8"], "--attention triton-fp8 was replaced by triton-int8-fp8"),
    ],
)
def test_argparse_mistakes_are_one_line_too(args, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "a cat", "--model", "tiny-random", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith("srpo-infer: error: ") and words in err, err
    assert err.count("\n") == 1 and "usage:" not in err, err


def test_replicas_without_ray_is_one_line_naming_the_extra():
    pytest.importorskip("fastapi", reason="the [server] extra")
    code = (
        "import sys; sys.modules['ray'] = None; sys.modules['ray.serve'] = None\n"
        "from srpo_infer.cli import main; sys.exit(main(['serve', '--model', 'tiny-random', '--replicas', '2']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "srpo-infer: error: several replicas run on Ray Serve: pip install 'srpo-infer[ray]'"
    ]


def test_a_missing_model_is_named_before_the_heavy_imports():
    """A typo costs a second or two, not the 15-30 s of importing diffusers and transformers first."""
    code = (
        "import sys\nfrom srpo_infer.cli import main\n"
        "code = main(['generate', 'a cat', '--model', '/no/such/srpo.safetensors'])\n"
        "print(sorted(m for m in ('diffusers', 'transformers') if m in sys.modules)); sys.exit(code)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert out.stdout.strip() == "[]"


def test_the_help_epilogs_first_command_is_a_quick_one(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    command = next(line.strip() for line in text.splitlines() if line.strip().startswith("srpo-infer generate"))
    assert "--model tiny-random" in command and "--steps 4" in command and "--image-size square" in command


def test_serve_help_says_what_it_defaults_to(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "the address serve listens on" in text and "relative" not in text  # --public-url: absolute links
    assert "auto-serve: on with a CUDA GPU" in text and "--no-compile same as --compile off" in text
    for flag in ("--max-connections", "--header-timeout", "--body-timeout"):
        assert flag in text


def test_serve_compiles_by_default_on_a_gpu_only(monkeypatch):
    pytest.importorskip("fastapi", reason="the [server] extra")
    import srpo_infer.server as server

    seen = {}

    def fake_serve(model, **options):
        seen.update(options, model=model)
        return 0

    monkeypatch.setattr(server, "serve", fake_serve, raising=False)
    assert main(["serve", "--model", "tiny-random", "--device", "cpu"]) == 0
    assert seen["compile"] is False and seen["limits"].header_timeout == 10.0
    monkeypatch.setattr("srpo_infer.config.resolve_device", lambda _d: __import__("torch").device("cuda"))
    assert main(["serve", "--model", "tiny-random"]) == 0
    assert seen["compile"] is True
    assert main(["serve", "--model", "tiny-random", "--no-compile"]) == 0
    assert seen["compile"] is False


BIN = Path(sys.executable).parent


def test_serve_without_its_extra_names_it_once():
    code = (
        "import sys; sys.modules['fastapi'] = None; sys.modules['uvicorn'] = None\n"
        "from srpo_infer.cli import main; sys.exit(main(['serve', '--model', 'tiny-random']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("srpo-infer: error: the server needs its extra: pip install"), lines
    assert lines[0].count("srpo-infer[server]") == 1, lines


def test_serve_on_a_busy_port_is_one_line_naming_it_and_the_flag(tmp_path):
    """Bound before anything loads or logs: no uvicorn banner, no "startup complete" before the error."""
    pytest.importorskip("fastapi", reason="the [server] extra")
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        argv = [str(BIN / "srpo-infer"), "serve", "--model", "tiny-random", "--port", str(port)]
        out = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"srpo-infer: error: cannot listen on 127.0.0.1:{port} (Address already in use): another process is "
        "listening there: stop it or choose another with --port"
    ]


def test_ctrl_c_during_generate_is_one_line_exit_130_and_no_file(tmp_path):
    """SIGINT once the progress bar shows: one line, the shell's code for SIGINT, nothing written."""
    import os
    import signal

    out_dir = tmp_path / "out"
    argv = [str(BIN / "srpo-infer"), "generate", "a cat", "--model", "tiny-random", "--image-size", "square"]
    proc = subprocess.Popen(
        [*argv, "--steps", "50", "-o", str(out_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
        # A shell without job control starts background jobs with SIGINT ignored, and Python keeps an
        # ignored SIGINT ignored: give the command the default a terminal would, however CI was started.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    err = b""
    try:
        while b"denoising" not in err:  # the bar ends its lines with \r: read what is there, not lines
            chunk = os.read(proc.stderr.fileno(), 4096)
            assert chunk, (proc.wait(timeout=60), err.decode()[-3000:])
            err += chunk
        proc.send_signal(signal.SIGINT)
        stdout, rest = proc.communicate(timeout=300)
    finally:
        proc.kill()
    err = (err + rest).decode()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "srpo-infer: generate interrupted", err[-3000:]
    assert stdout == b""  # no JSON: nothing was made
    assert not out_dir.exists() or not any(out_dir.iterdir())


def test_an_interrupted_save_leaves_no_file(tmp_path, monkeypatch):
    """The image is written whole or not at all: no truncated file, no temporary one."""
    import os

    from PIL import Image as PILImage

    import srpo_infer.result as result_module
    from srpo_infer.request import validate_request
    from srpo_infer.result import GenerationResult

    req = validate_request("a cat", width=512, height=512, seed=3)
    result = GenerationResult(request=req, images=[PILImage.new("RGB", (512, 512))], timings={})

    replace = os.replace

    def interrupted(src, dst, **kw):  # Ctrl-C between writing and renaming; os is shared, so only ours
        if Path(dst).is_relative_to(tmp_path):
            raise KeyboardInterrupt
        return replace(src, dst, **kw)

    monkeypatch.setattr(result_module.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        result.save(tmp_path / "out")
    monkeypatch.setattr(result_module.os, "replace", replace)
    assert list((tmp_path / "out").iterdir()) == []
    assert [p.name for p in result.save(tmp_path / "out")] == ["srpo_3.jpg"]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["srpo_3.jpg"]


def test_a_folder_with_a_dot_in_its_name_is_a_folder(tmp_path):
    """An existing folder (``mktemp -d`` makes ``tmp.XXXX``) or a name ending in a slash takes the images
    inside; only a name that is neither is a file name whose extension must be an image's."""
    from PIL import Image as PILImage

    from srpo_infer.request import validate_request
    from srpo_infer.result import GenerationResult

    result = GenerationResult(
        request=validate_request("a cat", width=512, height=512, seed=3),
        images=[PILImage.new("RGB", (512, 512))],
        timings={},
    )
    (tmp_path / "run.v2").mkdir()
    assert result.save(tmp_path / "run.v2") == [tmp_path / "run.v2" / "srpo_3.jpg"]
    assert result.save(f"{tmp_path}/new.v3/", "png") == [tmp_path / "new.v3" / "srpo_3.png"]
    with pytest.raises(ValueError, match=r"must end in \.jpg, \.jpeg or \.png"):
        result.save(tmp_path / "not-there.v4")
