"""Every command the README documents with the tiny model, run as a user types it, in a fresh process,
from the clone's root (where the quick start leaves the user), and the README's first Python example.

A green suite once hid a broken ``serve --replicas 2`` for days, because its tests called an inner
function the command reaches with other arguments; and the root's ``kernels/`` folder once shadowed
Hugging Face's ``kernels`` package for everything that puts the current folder on ``sys.path``
(``python -``, ``python -m``, ``torchrun -m``, Ray's workers), which tests run from a temporary folder
could not see. These tests read the commands out of README.md, so a documented command that breaks, or
a new one nobody runs, fails here. ``generate`` must exit 0 and print the API JSON; ``serve`` must
answer ``/health`` with ok and make an image, then drain on SIGTERM and exit 0 (the port is swapped for
a free one, output folders for temporary ones). Ray Serve commands run with ``-m ray``, ``torchrun``
ones with ``-m slow`` (CI runs both steps).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BIN = Path(sys.executable).parent
START_S = 600  # a generous bound on a busy machine; an idle one starts the tiny server in ~20 s


def documented_commands() -> list[str]:
    """The README's shell commands (in ```bash blocks) that run the tiny model, each as typed."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S):
        for line in block.splitlines():
            line = line.split("  #", 1)[0].strip()  # a trailing comment is the README's, not the command's
            command = line.split(" && ")[-1]  # the quick start installs first, then runs the command
            if "tiny-random" in command and command.startswith(("srpo-infer ", "torchrun ", "python -m srpo_infer ")):
                commands.append(command)
    return commands


def _marks(command: str) -> list:
    if "--replicas" in command:
        return [pytest.mark.ray]
    if command.startswith("torchrun") or "--lora-dir" in command:
        return [pytest.mark.slow]
    return []


def write_lora_command() -> str:
    """The README's one-liner that writes a LoRA for the tiny model (run before ``serve --lora-dir``)."""
    return next(
        line.strip()
        for block in re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
        for line in block.splitlines()
        if "write_tiny_lora(" in line
    )


COMMANDS = documented_commands()


def test_the_readme_documents_tiny_commands_of_each_kind():
    kinds = {shlex.split(c)[1] if c.startswith("srpo-infer") else shlex.split(c)[0] for c in COMMANDS}
    assert {"generate", "serve", "torchrun", "python"} <= kinds, COMMANDS
    assert any("--replicas" in c for c in COMMANDS)


def _argv(command: str, tmp_path: Path) -> list[str]:
    """The command as typed, run by the venv's programs, its output folders moved under ``tmp_path``."""
    argv = shlex.split(command)
    argv[0] = str(BIN / argv[0])  # the venv's console scripts and python, as an activated venv finds them
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-o", "--output", "--output-dir", "--lora-dir"):
            argv[i + 1] = str(tmp_path / argv[i + 1])
    if "serve" in argv and "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "outputs")]
    if "generate" in argv and not {"-o", "--output"} & set(argv):
        argv += ["-o", str(tmp_path / "outputs")]
    return argv


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


@pytest.mark.parametrize("command", [pytest.param(c, marks=_marks(c), id=c[:80]) for c in COMMANDS])
def test_a_documented_command_works_as_typed(command, tmp_path):
    argv = _argv(command, tmp_path)
    if "serve" in argv:
        pytest.importorskip("fastapi", reason="the [server] extra")
        if "--lora-dir" in argv:  # the README writes the tiny model's LoRA first, into the folder served
            pytest.importorskip("peft", reason="the [lora] extra")
            written = subprocess.run(shlex.split(write_lora_command()), cwd=tmp_path, env=_env(), timeout=START_S)
            assert written.returncode == 0
        _check_serve(argv, tmp_path)
        return
    out = subprocess.run(argv, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=START_S)
    assert out.returncode == 0, out.stderr[-3000:]
    if "-q" not in argv and "--quiet" not in argv and not command.startswith("torchrun"):
        assert "denoising" in out.stderr  # the progress bar on stderr; stdout is the JSON alone
    response = json.loads(out.stdout)
    for image in response["images"]:
        assert Path(image["url"]).is_relative_to(tmp_path) and Path(image["url"]).exists()


def readme_python_example() -> str:
    """The README's first Python block: the example a newcomer pastes into ``python``."""
    return re.search(r"```python\n(.*?)```", README.read_text(), flags=re.S)[1]


def test_the_readme_python_example_runs_pasted_into_python_at_the_clone_root(tmp_path):
    """As ``python -`` at the root (what pasting into the REPL or a notebook there does to sys.path),
    on the tiny model: the real weights' names become ``tiny-random``, two steps, outputs in tmp_path."""
    code = readme_python_example()
    for name in ('"tencent/SRPO"', '"black-forest-labs/FLUX.1-dev"'):
        assert name in code, name
        code = code.replace(name, '"tiny-random"')
    assert "    seed=" in code and '"outputs/"' in code
    code = code.replace("    seed=", "    num_inference_steps=2,\n    seed=", 1)
    code = code.replace('"outputs/"', repr(f"{tmp_path}/"))
    out = subprocess.run(
        [sys.executable, "-"], input=code, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=START_S
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert list(tmp_path.glob("srpo_*.jpg")), out.stdout[-2000:]


def _check_serve(argv: list[str], tmp_path: Path) -> None:
    import httpx

    port = _free_port()
    if "--port" in argv:
        argv[argv.index("--port") + 1] = str(port)
    else:
        argv += ["--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + START_S
        status = None
        while status != 200 and proc.poll() is None and time.monotonic() < deadline:
            try:
                status = httpx.get(f"{url}/health", timeout=10).status_code
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        assert status == 200, (proc.poll(), (tmp_path / "serve.log").read_text()[-3000:])
        body = {"prompt": "a cat", "image_size": "square", "num_inference_steps": 2, "seed": 3}
        if "--lora-dir" in argv:
            body["loras"] = [{"path": "sketch.safetensors", "scale": 1.0}]
        r = httpx.post(f"{url}/v1/images/generations", json=body, timeout=START_S)
        assert r.status_code == 200, r.text
        assert httpx.get(r.json()["images"][0]["url"], timeout=60).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=START_S)
        log.close()
    assert code == 0, (tmp_path / "serve.log").read_text()[-3000:]
