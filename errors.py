"""The pack's one exception family.

Messages follow DESIGN.md §7: ``<Backend> <input as shown in the UI>: <what is wrong>
(got X, expected Y). <What to do>.``
"""
from __future__ import annotations


class GentorError(Exception):
    """Base class of every error the pack raises on purpose."""


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
