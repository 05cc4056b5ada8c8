"""What every target backend provides, and the registry that names them.

A backend is one module with one class registered by ``@register_backend``. The
pipeline asks the registry, never branches on a target's name. Today a backend tells
whether its engine can run here; the build verbs (build, load, logits on windows,
timed prefill/decode, which kernels ran) join this interface with the build pipeline.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import ClassVar

from sparsedeploy.errors import BadInput


@dataclass(frozen=True)
class Availability:
    available: bool
    reason: str  # what runs it, or why it cannot run here and what would fix that


class Backend:
    name: ClassVar[str]  # the registry key, as `backend = "..."` in a target profile
    engine: ClassVar[str]  # the inference engine, as reported
    device: ClassVar[str]  # "cpu" or "cuda"

    def availability(self) -> Availability:
        raise NotImplementedError


_BACKENDS: dict[str, type[Backend]] = {}


def register_backend(cls: type[Backend]) -> type[Backend]:
    _BACKENDS[cls.name] = cls
    return cls


def backend_names() -> list[str]:
    _import_all()
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    _import_all()
    if name not in _BACKENDS:
        raise BadInput(f"unknown backend '{name}'; known backends: {', '.join(sorted(_BACKENDS))}")
    return _BACKENDS[name]()


def _import_all() -> None:
    # Importing a backend module registers it; engines themselves load lazily.
    from sparsedeploy.backends import BACKEND_MODULES

    for module in BACKEND_MODULES:
        importlib.import_module(f"sparsedeploy.backends.{module}")


def module_version(module_name: str) -> str | None:
    """The engine package's version if it imports, else None."""
    try:
        module = importlib.import_module(module_name)
    except Exception:  # a broken install is as unusable as a missing one
        return None
    return str(getattr(module, "__version__", "unknown"))


def cuda_gpu() -> tuple[bool, str]:
    """Whether PyTorch sees an NVIDIA GPU with 2:4 sparse tensor cores (Ampere or newer)."""
    import torch

    if not torch.cuda.is_available():
        return False, "no CUDA GPU on this machine"
    major, minor = torch.cuda.get_device_capability(0)
    name = torch.cuda.get_device_name(0)
    if major < 8:
        return False, f"{name} (sm_{major}{minor}) has no 2:4 sparse tensor cores; needs sm_80 or newer"
    return True, f"{name} (sm_{major}{minor})"
