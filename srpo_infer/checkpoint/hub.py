"""Finding a transformer's file(s): a model name checked at once, a local file or folder, or a Hugging
Face repo id turned into a cached (or downloaded) snapshot."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

from .errors import CheckpointError

CHECKPOINT_SUFFIXES = (".safetensors", ".gguf")


def is_repo_id(name: str) -> bool:
    """True when ``name`` can only be a Hugging Face repo id (``owner/name``), not a local path.

    >>> is_repo_id("tencent/SRPO"), is_repo_id("/data/SRPO"), is_repo_id("./SRPO"), is_repo_id("srpo.safetensors")
    (True, False, False, False)
    """
    return (
        bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name))
        and not name.startswith((".", "/", "~"))
        and not name.endswith(CHECKPOINT_SUFFIXES)
    )


RANDOM_MODELS = ("tiny-random", "full-random")  # built in code (srpo_infer.tiny, srpo_infer.full_random)


def check_model_name(model: str, what: str = "model") -> None:
    """Refuse at once (before any heavy import or download) a ``model`` that is none of: a random
    model's name, an existing file or folder, a Hugging Face repo id; a near miss names the intended one.

    >>> check_model_name("tiny-randon")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    srpo_infer.checkpoint.CheckpointError: model 'tiny-randon' does not exist (...): did you mean 'tiny-random'?
    """
    if model in RANDOM_MODELS or is_repo_id(model) or Path(model).expanduser().exists():
        return
    import difflib

    near = difflib.get_close_matches(model, RANDOM_MODELS, n=1, cutoff=0.75)
    hint = (
        f"did you mean {near[0]!r}?" if near else f"give an existing path, owner/name or one of {list(RANDOM_MODELS)}"
    )
    raise CheckpointError(f"{what} {model!r} does not exist (not a file or folder, nor a Hugging Face repo id): {hint}")


def find_checkpoint_files(model: str, *, download: Callable[[str], str] | None = None) -> list[Path]:
    """The ``.safetensors`` file(s), or the ``.gguf`` file, holding the transformer named by ``model``.

    ``model`` is a ``.safetensors`` file, a folder (a plain one, or a diffusers pipeline folder with a
    ``transformer/`` subfolder), or a Hugging Face repo id, which ``download`` (default: a snapshot
    download of the safetensors and JSON files, honouring ``HF_HUB_OFFLINE`` and ``HF_TOKEN``) turns
    into a folder.
    """
    path = Path(model).expanduser()
    if path.is_file():
        return [path]
    if not path.exists():
        check_model_name(model)
        path = Path((download or _snapshot_download)(model))
    folder = path / "transformer" if (path / "transformer").is_dir() else path
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.gguf"))
    if not files:
        raise CheckpointError(f"no .safetensors or .gguf file in {str(folder)!r}")
    if len(files) > 1 and files[0].suffix == ".gguf":
        raise CheckpointError(f"{str(folder)!r} holds {len(files)} GGUF files; pass the one to load: {files}")
    return files


def _snapshot_download(repo_id: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    # Pipeline repos keep the transformer in a subfolder; SRPO ships a single top-level file.
    patterns = ["*.safetensors", "*.json", "transformer/*.safetensors", "transformer/*.json"]
    cached = cached_snapshot(repo_id, patterns, "model")
    if cached is not None:
        return cached
    try:
        return snapshot_download(repo_id, allow_patterns=patterns, token=os.environ.get("HF_TOKEN") or None)
    except LocalEntryNotFoundError as exc:
        raise CheckpointError(
            f"model {repo_id!r} is not in the local Hugging Face cache and could not be downloaded; "
            "pass a local file or folder instead"
        ) from exc
    except HfHubHTTPError as exc:
        raise CheckpointError(f"could not download model {repo_id!r}: {exc}") from exc


def cached_snapshot(repo_id: str, patterns: list[str], what: str) -> str | None:
    """The cached snapshot folder of ``repo_id``, or ``None`` when a download is needed and can happen.

    When it cannot (``HF_HUB_OFFLINE`` is set, or the Hub does not answer within a few seconds) this
    says so at once, in one line: the Hub client would otherwise retry for ~20 s and then blame the
    repo (gated, missing) for what is a missing network.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    if constants.HF_HUB_OFFLINE:
        raise CheckpointError(
            f"{what} {repo_id!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
            "set: download it once with network (unset HF_HUB_OFFLINE), or pass a local folder"
        )
    host = hub_unreachable(constants.ENDPOINT)
    if host:
        raise CheckpointError(
            f"{what} {repo_id!r} is not in the local Hugging Face cache and {host} cannot be "
            "reached (no network?): connect, or pass a local folder; set HF_HUB_OFFLINE=1 to "
            "use only the cache"
        )
    return None


def hub_unreachable(endpoint: str, timeout: float = 3.0) -> str | None:
    """``endpoint``'s host when no TCP connection to it opens within ``timeout`` seconds, else ``None``."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return None
    except OSError:
        return url.netloc
