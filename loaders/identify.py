"""Which backend and variant a folder holds, from its files (never its name).

Each backend's loader answers for its own layout (``loaders.<id>.identify(path) -> variant | None``); this
module asks them in turn through the registry, so a loader can name another backend's folder in its
errors without importing it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .. import registry
from ..errors import ModelFolderError

# Asked before the others, in this order (the order identification has always used; a folder that
# matched two layouts would get the first).
FIRST = ("qwen_image", "vlm", "bagel", "emu35")


@dataclass(frozen=True)
class Identity:
    backend: str
    backend_display: str
    variant: str


def identify(path: Path) -> Identity | None:
    """Backend + variant of a folder from its layout and configs, or None when it is none of ours."""
    path = Path(path)
    ordered = sorted(registry.BACKENDS, key=lambda s: FIRST.index(s.id) if s.id in FIRST else len(FIRST))
    for spec in ordered:
        try:
            module = importlib.import_module(f"{__package__}.{spec.id}")
        except ImportError:
            continue  # an optional backend whose dependencies are missing
        variant = module.identify(path) if hasattr(module, "identify") else None
        if variant:
            return Identity(spec.id, spec.display_name, variant)
    return None


def variant_of(path: Path, looks_like: Callable[[Path], bool], variant: Callable[[Path], str],
               incomplete: str) -> str | None:
    """A loader's ``identify``: None unless ``looks_like`` (its cheap dropdown filter) accepts the folder; then the
    detected variant, or ``incomplete`` when the folder fails its full check."""
    if not (path.is_dir() and looks_like(path)):
        return None
    try:
        return variant(path)
    except ModelFolderError:
        return incomplete
