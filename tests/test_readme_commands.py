"""Every command the README and the documentation (docs/) show with the tiny model, run as a user types
it, in a fresh process, from the clone's root (where the quick start leaves the user), and every Python
block of those pages, from the root and from elsewhere (``doc_snippets.py`` says how blocks are found,
marked and run).

A green suite once hid a broken ``serve --replicas 2`` for days, because its tests called an inner
function the command reaches with other arguments; and the root's ``kernels/`` folder once shadowed
Hugging Face's ``kernels`` package for everything that puts the current folder on ``sys.path``
(``python -``, ``python -m``, ``torchrun -m``, Ray's workers), which tests run from a temporary folder
could not see. These tests read the commands out of the pages, so a documented command that breaks, or
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
import subprocess
import sys
from pathlib import Path

import doc_snippets
import pytest
from helpers import free_port, wait_healthy

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
START_S = 600  # a generous bound on a busy machine; an idle one starts the tiny server in ~20 s


def documented_commands() -> list[str]:
    """The shell commands of README and docs that run the tiny model (or ask for help), each once, as typed."""
    return doc_snippets.commands_to_run()


def _marks(command: str) -> list:
    if "--replicas" in command:
        return [pytest.mark.ray]
    if command.startswith("torchrun") or "--lora-dir" in command:
        return [pytest.mark.slow]
    return []


def write_lora_command() -> str:
    """The documented one-liner that writes a LoRA for the tiny model (run before ``serve --lora-dir``)."""
    return next(c for c in documented_commands() if "write_tiny_lora(" in c)


COMMANDS = [c for c in documented_commands() if "write_tiny_lora(" not in c]  # run by the --lora-dir test


def test_the_readme_documents_tiny_commands_of_each_kind():
    kinds = {shlex.split(c)[1] if c.startswith("srpo-infer") else shlex.split(c)[0] for c in COMMANDS}
    assert {"generate", "serve", "torchrun", "python"} <= kinds, COMMANDS
    assert any("--replicas" in c for c in COMMANDS)


def _argv(command: str, tmp_path: Path) -> list[str]:
    """The command as typed, run by the venv's programs, its output folders moved under ``tmp_path``."""
    argv = shlex.split(command)
    argv[0] = str(BIN / argv[0])  # the venv's console scripts and python, as an activated venv finds them
    if argv[-1] in ("--help", "--version"):
        return argv  # writes nothing
    for i, arg in enumerate(argv[:-1]):
        if arg in ("-o", "--output", "--output-dir", "--lora-dir"):
            argv[i + 1] = str(tmp_path / argv[i + 1])
    if "serve" in argv and "--output-dir" not in argv:
        argv += ["--output-dir", str(tmp_path / "outputs")]
    if "generate" in argv and not {"-o", "--output"} & set(argv):
        argv += ["-o", str(tmp_path / "outputs")]
    return argv


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
    if argv[-1] in ("--help", "--version"):
        assert out.stdout.strip() and not out.stderr.strip(), out.stderr[-3000:]
        return
    if "-q" not in argv and "--quiet" not in argv and not command.startswith("torchrun"):
        assert "denoising" in out.stderr  # the progress bar on stderr; stdout is the JSON alone
    response = json.loads(out.stdout)
    for image in response["images"]:
        assert Path(image["url"]).is_relative_to(tmp_path) and Path(image["url"]).exists()


def _run_python(pages: dict[str, list[doc_snippets.Block]], cwd: Path, at_root: bool, port: int | None = None):
    """Run the pages' python blocks in one fresh interpreter (``doc_snippets.HARNESS``); fail naming each
    block that raised, with its traceback."""
    code = {
        page: [[b.where, b.code.replace("8000", str(port)) if port else b.code] for b in blocks]
        for page, blocks in pages.items()
    }
    out = subprocess.run(
        [sys.executable, "-c", doc_snippets.HARNESS, str(ROOT) if at_root else ""],
        input=json.dumps(code),
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=START_S,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    failed = "\n".join(f"--- {where}\n{trace}" for where, trace in report["failed"])
    assert not report["failed"], f"documented python blocks failed:\n{failed}"
    return report


def test_the_python_blocks_of_readme_and_docs_run_pasted_into_python_at_the_clone_root(tmp_path):
    """As pasting into ``python`` at the root does (the root first on sys.path, where ``kernels/`` sits),
    every unmarked python block, on the tiny model, its files written under tmp_path."""
    pages = doc_snippets.python_pages()
    assert "README.md" in pages and len(pages) >= 5, sorted(pages)
    report = _run_python(pages, tmp_path, at_root=True)
    if report["skipped"]:
        pytest.skip(f"blocks that need an extra not installed here: {report['skipped']}")


@pytest.mark.slow
def test_the_python_blocks_of_readme_and_docs_run_from_elsewhere(tmp_path):
    """The same blocks from a folder outside the clone (the root not on sys.path): the installed package."""
    report = _run_python(doc_snippets.python_pages(), tmp_path, at_root=False)
    if report["skipped"]:
        pytest.skip(f"blocks that need an extra not installed here: {report['skipped']}")


def test_every_code_block_runs_or_says_what_it_needs():
    """Each block has a language; python and bash blocks run unless marked; a mark names known needs and
    is earned (its block holds what it needs; a marked bash block has a line no test can run); an
    unmarked bash block has only lines a test runs or the suite runs anyway; json parses."""
    blocks = doc_snippets.blocks()
    for path in doc_snippets.PAGES:
        found = [b for b in blocks if b.page == path.relative_to(ROOT).as_posix()]
        assert doc_snippets.fence_count(path) == 2 * len(found), f"{path.name}: a fence the parser cannot read"
    problems = []
    for b in blocks:
        if b.language not in doc_snippets.LANGUAGES:
            problems.append(f"{b.where}: fence language {b.language!r} (one of {sorted(doc_snippets.LANGUAGES)})")
            continue
        if b.needs - doc_snippets.NEEDS:
            problems.append(f"{b.where}: unknown needs {sorted(b.needs - doc_snippets.NEEDS)}")
        if b.needs and b.language not in ("python", "bash"):
            problems.append(f"{b.where}: a {b.language} block runs nothing and needs no mark")
        for need in sorted(b.needs & doc_snippets.NEEDS):
            if not doc_snippets.earns(need, b):
                problems.append(f"{b.where}: marked needs {need}, but holds nothing that needs it")
        if b.language == "bash":
            kinds = [doc_snippets.shell_kind(c) for c in doc_snippets.shell_lines(b.code)]
            if b.needs and None not in kinds:
                problems.append(f"{b.where}: marked {sorted(b.needs)}, but a test runs every line of it")
            if not b.needs and None in kinds:
                line = doc_snippets.shell_lines(b.code)[kinds.index(None)]
                problems.append(f"{b.where}: {line!r} runs in no test: mark the block with what it needs")
        if b.language == "json":
            try:
                json.loads(b.code)
            except ValueError as exc:
                problems.append(f"{b.where}: json does not parse: {exc}")
    assert not problems, "\n".join(problems)


def test_the_readme_shows_each_way_in_and_stays_one_screen():
    """The README is the front page (issue 40): at most 250 lines, a runnable example for the library,
    the CLI, the server (the hosted API's body and OpenAI's SDK) and optimize(pipe), and links to the rest."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    python = [b.code for b in doc_snippets.blocks() if b.page == "README.md" and b.language == "python"]
    assert any("load_pipeline(" in c for c in python) and any("optimize(" in c for c in python)
    assert any('"model": "flux/srpo"' in c for c in python) and any("OpenAI(" in c for c in python)
    assert any(c.startswith("srpo-infer generate") for c in documented_commands())
    for link in re.findall(r"\]\((docs/[^)#]+)", text):
        assert (ROOT / link).exists(), link


def _check_serve(argv: list[str], tmp_path: Path) -> None:
    import httpx

    port = free_port()
    if "--port" in argv:
        argv[argv.index("--port") + 1] = str(port)
    else:
        argv += ["--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(argv, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_healthy(proc, url, tmp_path)
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


@pytest.mark.slow
def test_the_client_blocks_run_against_the_tiny_server(tmp_path):
    """The blocks marked ``needs: server`` (the hosted API's body, OpenAI's SDK, streaming) against
    ``srpo-infer serve --model tiny-random``, their port swapped for the test server's."""
    pytest.importorskip("fastapi", reason="the [server] extra")
    pages = doc_snippets.python_pages(include_server=True)
    assert pages, "no block is marked needs: server"
    port = free_port()
    argv = _argv(f"srpo-infer serve --model tiny-random --port {port}", tmp_path)
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(argv, cwd=tmp_path, env=_env(), stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}", tmp_path)
        report = _run_python(pages, tmp_path, at_root=False, port=port)
        assert not report["skipped"], report["skipped"]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=START_S)
        log.close()


def _wait_healthy(proc: subprocess.Popen, url: str, tmp_path: Path) -> None:
    """helpers.wait_healthy, with the server's log in the failure (its output goes to serve.log)."""
    try:
        wait_healthy(url, [proc], timeout=START_S)
    except AssertionError:
        raise AssertionError((proc.poll(), (tmp_path / "serve.log").read_text()[-3000:])) from None
