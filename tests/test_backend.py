"""The server's backends share one typed protocol (server/backend.Backend): the in-process GPU worker and
the Ray Serve backend implement every member with the protocol's signature, and the app asks nothing else
of them (issue 41)."""

from __future__ import annotations

import inspect

import pytest

from srpo_infer.server.backend import Backend, Capabilities
from srpo_infer.server.worker import Worker


def _members(protocol) -> dict[str, object]:
    names = {n for n in vars(protocol) if not n.startswith("_")} | set(protocol.__annotations__)
    return {n: inspect.getattr_static(protocol, n, None) for n in sorted(names)}


def _implements(cls: type) -> None:
    for name, member in _members(Backend).items():
        own = inspect.getattr_static(cls, name, None)
        assert own is not None, f"{cls.__name__} lacks {name}"
        if name == "capabilities":
            assert isinstance(own, Capabilities), name
        elif isinstance(member, property):
            assert isinstance(own, property), f"{cls.__name__}.{name} is not a property"
        else:
            want = list(inspect.signature(member).parameters)
            assert list(inspect.signature(own).parameters) == want, f"{cls.__name__}.{name}{inspect.signature(own)}"


def test_the_gpu_worker_implements_the_backend_protocol():
    _implements(Worker)
    worker = Worker(max_queue=1)
    assert isinstance(worker, Backend) and worker.capabilities == Capabilities(streams=True, adapters=True)
    assert worker.stop(1) == 0


def test_the_ray_backend_implements_the_backend_protocol():
    from srpo_infer.server.ray_serve import RayBackend  # imports no ray until it is built

    _implements(RayBackend)
    assert RayBackend.capabilities == Capabilities(streams=False, adapters=False)


def test_the_app_refuses_a_lora_folder_on_a_backend_without_per_request_loras(tmp_path):
    from srpo_infer.server import create_app
    from srpo_infer.server.loras import LoraLibrary
    from srpo_infer.server.ray_serve import RayBackend

    backend = object.__new__(RayBackend)  # not started: create_app reads its capabilities first
    with pytest.raises(ValueError, match="RayBackend takes no per-request LoRAs"):
        create_app(backend=backend, output_dir=tmp_path, loras=LoraLibrary(tmp_path))
