"""``serve --lora-dir DIR``: the LoRA adapters a request may name, and nothing else.

A request's ``loras: [{"path": NAME, "scale": s}]`` names files of DIR (``style.safetensors``, or
``style``); URLs, absolute paths, ``..``, subfolders and names not in DIR are refused with a 422 that
names the rule. ``GET /v1/loras`` lists them with their rank and target model. At start-up every file
is read and converted once, if it is a regular file (a symlink to one inside DIR counts as that file): a
FIFO, a device, a folder, or a symlink that leads out of DIR is refused unopened (the log names each with
its reason; listings leave it out), as the image store trusts only regular files it wrote. A FIFO would
block start-up in ``open()``; a link out would serve (and size) a file the operator never put in DIR.
:meth:`LoraLibrary.install` checks each against the loaded transformer
(a file that is not a LoRA, or one for another model, is listed with the loader's sentence and refused
with it) and gives a compiled pipeline the hotswap slot over the union of the layers they target.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import stat
from pathlib import Path

from ..lora import MAX_REQUEST_RANK, LoraError, check_fits, max_rank, read_lora, to_diffusers
from ..request import MAX_LORA_SCALE, MAX_LORAS, GenerationRequest

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Adapter:
    name: str
    path: Path
    rank: int | None
    target: str | None  # "flux" (a Flux transformer LoRA), or None with the loader's sentence in problem
    bytes: int
    problem: str | None = None


class LoraLibrary:
    """The adapters in ``folder`` (top level, ``*.safetensors``), read once."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser().resolve()
        if not self.folder.is_dir():
            raise ValueError(f"--lora-dir {str(folder)!r} is not a folder")
        self.adapters: dict[str, Adapter] = {}
        self.states: dict[str, dict] = {}
        self.refused: dict[str, str] = {}  # name: why it is not served (never opened)
        for path in sorted(self.folder.glob("*.safetensors")):
            reason = refusal(path, self.folder)
            if reason is not None:
                self.refused[path.name] = reason
                log.warning("LoRA folder: not serving %s: %s", path.name, reason)
                continue
            self.adapters[path.name] = self._read(path)
        log.info(
            "LoRA folder %s: %d adapters (%s), %d refused",
            self.folder,
            len(self.adapters),
            ", ".join(self.adapters) or "none",
            len(self.refused),
        )

    def _read(self, path: Path) -> Adapter:
        size = path.stat().st_size
        try:
            state = read_lora(path)
            rank = max_rank(state)
            self.states[path.name] = to_diffusers(state)
        except LoraError as exc:  # the loader's sentence, with the file's name, not the server's folder
            return Adapter(path.name, path, None, None, size, str(exc).replace(str(path), path.name))
        return Adapter(path.name, path, rank, "flux", size)

    def slot_layers(self) -> tuple[str, ...]:
        """Every layer the folder's adapters target: the pipeline's ``lora_slot`` (it leaves out a layer
        its transformer lacks; :meth:`install` then refuses that adapter)."""
        layers = []
        for state in self.states.values():
            layers += [key.removesuffix(".lora_A.weight") for key in state if key.endswith(".lora_A.weight")]
        return tuple(dict.fromkeys(layers))

    def install(self, pipe) -> None:
        """Check every adapter against ``pipe``'s transformer and keep the fitting ones in its host cache;
        one that does not fit is listed with the loader's sentence and refused in requests."""
        for name, state in self.states.items():
            adapter = self.adapters[name]
            try:
                check_fits(pipe.transformer, state)
            except LoraError as exc:
                adapter.target, adapter.problem = None, str(exc)
                continue
            pipe.lora_cache.put(adapter.path, state)

    def listing(self) -> dict:
        data = [
            {
                "name": a.name,
                "rank": a.rank,
                "target_model": "FLUX.1 transformer" if a.target else None,
                "bytes": a.bytes,
                **({"problem": a.problem} if a.problem else {}),
            }
            for a in self.adapters.values()
        ]
        return {
            "object": "list",
            "data": data,
            "max_loras": MAX_LORAS,
            "max_scale": MAX_LORA_SCALE,
            "max_rank": MAX_REQUEST_RANK,
        }

    def resolve(self, name: str) -> Adapter:
        """The adapter a request names, or a ValueError naming the rule it breaks."""
        shown = repr(name[:100])
        if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", name):
            raise ValueError(
                f"loras path {shown} is a URL: name an adapter in this server's LoRA folder (GET /v1/loras)"
            )
        if name.startswith(("/", "\\", "~")) or re.match(r"^[A-Za-z]:", name):
            raise ValueError(f"loras path {shown} is an absolute path: name an adapter in this server's LoRA folder")
        if ".." in re.split(r"[/\\]", name):
            raise ValueError(f"loras path {shown} climbs out of the LoRA folder (..): name an adapter in it")
        if "/" in name or "\\" in name or "\0" in name:
            raise ValueError(f"loras path {shown} names a subfolder: only the LoRA folder's own files are served")
        adapter = self.adapters.get(name) or self.adapters.get(f"{name}.safetensors")
        refused = self.refused.get(name) or self.refused.get(f"{name}.safetensors")
        if adapter is None and refused is not None:
            raise ValueError(f"loras path {shown} is not served: {refused}")
        if adapter is None:
            raise ValueError(f"loras path {shown} is not in this server's LoRA folder: GET /v1/loras lists them")
        if adapter.problem:
            raise ValueError(f"loras path {shown}: {adapter.problem}")
        return adapter

    def resolve_request(self, req: GenerationRequest) -> GenerationRequest:
        """The request with each adapter's name replaced by its file's path; the summed rank checked."""
        adapters = [(self.resolve(name), scale) for name, scale in req.loras]
        rank = sum(a.rank for a, _ in adapters)
        if rank > MAX_REQUEST_RANK:
            raise ValueError(
                f"loras rank {rank} (summed over the request's adapters) is over this server's maximum, "
                f"{MAX_REQUEST_RANK}: use fewer or smaller adapters"
            )
        return req.with_fields(loras=tuple((str(a.path), scale) for a, scale in adapters))


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


def refusal(path: Path, folder: Path) -> str | None:
    """Why ``path`` (an entry of ``folder``) is not served, or None for a regular file, or a symlink to one
    inside ``folder``. Decided from ``lstat``/``stat`` alone: nothing is opened, so a FIFO or a device
    cannot block or be read."""
    try:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            target = path.resolve(strict=True)
            if not target.is_relative_to(folder):
                return "a symlink that leads out of the LoRA folder"
            info = os.stat(target)
    except (OSError, RuntimeError) as exc:  # a dangling link, a loop (RuntimeError before Python 3.13)
        return f"cannot be read: {getattr(exc, 'strerror', None) or exc}"
    if stat.S_ISREG(info.st_mode):
        return None
    kind = next((name for test, name in _KINDS if test(info.st_mode)), "a device or other special file")
    return f"not a regular file ({kind})"
