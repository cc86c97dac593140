"""The pack's one exception family.

Messages follow DESIGN.md §7: ``<Backend> <input as shown in the UI>: <what is wrong>
(got X, expected Y). <What to do>.``
"""
from __future__ import annotations


# ComfyUI imports the pack under its folder PATH (e.g. "/.../custom_nodes/comfyui-gentor"), so a class's
# __module__ would show as that path in /history's exception_type and in REST errors. Our errors carry the
# stable name "gentor.<module>" instead, whatever the folder is called.
PACK_MODULE = __name__.rpartition(".")[0]
SHOWN_PACK_NAME = "gentor"


def _plain_module(cls: type) -> None:
    if PACK_MODULE and cls.__module__.startswith(PACK_MODULE + "."):
        cls.__module__ = SHOWN_PACK_NAME + cls.__module__[len(PACK_MODULE):]


class GentorError(Exception):
    """Base class of every error the pack raises on purpose."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        _plain_module(cls)


_plain_module(GentorError)


class ModelFolderError(GentorError):
    """A model folder or file is missing, incomplete, corrupt or of another kind."""


class InputError(GentorError):
    """A node input (prompt, image, size, settings, model name) is not usable."""


class MemoryEstimateError(GentorError):
    """A run would need more memory than the device has; refused before allocating."""


class MissingDependencyError(GentorError):
    """An optional backend dependency is not installed."""


class GentorInterrupted(GentorError):
    """Raised outside ComfyUI when a run is cancelled (inside ComfyUI its own exception is used)."""


def fmt(backend: str, input_name: str, problem: str, got: object, expected: object, todo: str) -> str:
    """Build a message in the pack's single error format."""
    return f"{backend} {input_name}: {problem} (got {got}, expected {expected}). {todo}"


class GenerationError(GentorError):
    """A run finished without a usable result (non-finite output, no image within the token limit)."""
