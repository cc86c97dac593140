"""The one list of backends. Adding a backend = one file in loaders/, samplers/, nodes/ + one entry here."""
from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from types import ModuleType

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BackendSpec:
    id: str  # same in every layer and file name
    display_name: str
    folder_keys: tuple[str, ...]  # model folders it reads (the first is its own)
    optional_deps: tuple[tuple[str, str], ...]  # (import name, pip package)


BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec("qwen_image", "Qwen-Image", ("qwen_image", "diffusers"),
                (("diffusers", "diffusers>=0.42"), ("transformers", "transformers"), ("accelerate", "accelerate"))),
)


def get(backend_id: str) -> BackendSpec:
    for spec in BACKENDS:
        if spec.id == backend_id:
            return spec
    raise KeyError(f"unknown backend {backend_id!r}; known: {', '.join(b.id for b in BACKENDS)}")


def missing_deps(spec: BackendSpec) -> list[str]:
    """pip packages of a backend that are not importable here."""
    return [pip for module, pip in spec.optional_deps if importlib.util.find_spec(module) is None]


def available() -> list[BackendSpec]:
    """Backends whose dependencies are installed; one log line for each skipped one."""
    out = []
    for spec in BACKENDS:
        missing = missing_deps(spec)
        if missing:
            log.warning("Gentor: %s nodes disabled: missing %s (pip install %s)", spec.display_name,
                        ", ".join(missing), " ".join(missing))
        else:
            out.append(spec)
    return out


def sampler(backend_id: str) -> ModuleType:
    """The backend's samplers module (each has ``run(handle, task, request, listener)``)."""
    return importlib.import_module(f"{__package__}.samplers.{get(backend_id).id}")
