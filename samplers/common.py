"""What every backend's sampler shares: requests/results, image conversion, size rounding, previews."""
from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import GenerationError, GentorError, InputError
from .prompt_text import check_text

SIZE_STEP = 16
WHITE = (255, 255, 255)


@dataclass(frozen=True)
class Settings:
    """A per-backend settings bundle (the GENTOR_SETTINGS socket)."""

    backend: str
    values: tuple[tuple[str, Any], ...]

    def get(self, name: str, default: Any = None) -> Any:
        return dict(self.values).get(name, default)


@dataclass
class Request:
    """One generation request, as the task nodes pass it (0 = backend default)."""

    prompt: str
    negative: str = ""
    seed: int = 0
    steps: int = 0
    cfg: float = 0.0
    width: int = 0
    height: int = 0
    batch_size: int = 1
    images: list[Image.Image] = field(default_factory=list)
    settings: Settings | None = None
    speed: Any = None  # samplers.speed.SpeedOptions from Gentor Speed Options; None = plain sampling


@dataclass
class Result:
    """What a sampler returns; text-only tasks (understanding, prompt enhancement) have no image."""

    image: torch.Tensor | None = None  # [B,H,W,3] float32 in 0..1 on the CPU
    text: str = ""
    mask: torch.Tensor | None = None  # [B,H,W] alpha where a model outputs RGBA (ComfyUI MASK convention)


def check_settings(settings: Settings | None, backend: str, display: str, node: str) -> None:
    if settings is not None and settings.backend != backend:
        raise InputError(f"{display} settings: settings of another backend (got {settings.backend} settings, "
                         f"expected {backend} settings or none). Connect {node}, or disconnect 'settings'.")


def round_size(value: int, name: str, notes: list[str], step: int = SIZE_STEP) -> int:
    """Round a size to the nearest multiple of ``step`` (at least one step); say so in ``notes``."""
    rounded = max(step, int(value / step + 0.5) * step)  # nearest, halves up
    if rounded != value:
        notes.append(f"{name} {value} is off the {step}-pixel grid: rounded to {rounded}")
    return rounded


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha composited on white, grayscale expanded, 16/32-bit scaled to 8-bit."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        img = Image.fromarray(np.clip(np.asarray(img) * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def tensor_to_pils(image: torch.Tensor, name: str, display: str) -> list[Image.Image]:
    """A ComfyUI IMAGE ([B,H,W,C] float 0..1, C = 1..4) -> RGB PIL images, one per batch item."""
    if image.ndim == 3:
        image = image.unsqueeze(0)
    if image.ndim != 4 or image.shape[-1] not in (1, 2, 3, 4):
        raise InputError(f"{display} {name}: not an image tensor (got shape {tuple(image.shape)}, expected "
                         "[batch, height, width, 1..4 channels]). Connect an IMAGE output such as Load Image.")
    arr = (image.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    modes = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}
    out = []
    for item in arr:
        channels = item.shape[-1]
        pil = Image.fromarray(item[..., 0] if channels == 1 else item, modes[channels])
        out.append(to_rgb(pil))
    return out


def pils_to_tensor(images: list[Image.Image]) -> torch.Tensor:
    arrays = [np.asarray(to_rgb(i), dtype=np.float32) / 255.0 for i in images]
    return torch.from_numpy(np.stack(arrays))


def chw_to_image(batch: torch.Tensor) -> torch.Tensor:
    """[B,3,H,W] in 0..1 -> ComfyUI IMAGE [B,H,W,3] float32 on the CPU."""
    return batch.detach().float().clamp(0, 1).permute(0, 2, 3, 1).contiguous().cpu()


def latent_preview(latent: torch.Tensor, factors: torch.Tensor, bias: torch.Tensor) -> Image.Image:
    """Cheap preview: a linear map from latent channels [C,H,W] to RGB (no VAE decode)."""
    rgb = torch.nn.functional.linear(latent.float().movedim(0, -1).cpu(), factors, bias)
    arr = ((rgb.clamp(-1, 1) + 1.0) * 127.5).to(torch.uint8).numpy()
    return Image.fromarray(arr, "RGB")


def format_notes(pairs: list[tuple[str, Any]], notes: list[str]) -> str:
    head = ", ".join(f"{k}={v}" for k, v in pairs)
    return head + ("".join(f"\n- {n}" for n in notes) if notes else "")


def check_finite(image: torch.Tensor, display: str, hint: str) -> None:
    """A result with NaN/inf (e.g. an fp16 overflow) fails the node instead of coming out black."""
    bad = (~torch.isfinite(image)).sum().item()
    if bad:
        raise GenerationError(f"{display} output: the model produced non-finite values (got {bad} NaN/inf values of "
                         f"{image.numel()}, expected finite pixels). Nothing was returned; {hint}.")


# ----------------------------------------------------------------------------- checks on node inputs
DEFAULT_MAX_ASPECT = 8.0  # widest ratio a backend is sized for unless its policy passes another
LIBRARY_MODULES = ("PIL", "tokenizers", "safetensors", "safetensors_rust", "huggingface_hub", "json", "yaml")


class LibraryError(GentorError):
    """A library (file system, PIL, tokenizers, safetensors) failed on a user's file or input."""


def check_number(value: float, name: str, display: str, minimum: float | None = None,
                 maximum: float | None = None) -> float:
    """A number a node accepts: finite and within [minimum, maximum] (API clients can send NaN/inf)."""
    bound = f"a finite number in [{minimum if minimum is not None else '-inf'}, " \
            f"{maximum if maximum is not None else 'inf'}]"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{display} {name}: not a number (got {value!r}, expected {bound}). Send a number.")
    if not math.isfinite(value):
        # NaN passes ComfyUI's min/max validation (every comparison with NaN is false).
        raise InputError(f"{display} {name}: not a finite number (got {value!r}, expected {bound}). "
                         "Send a finite number.")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise InputError(f"{display} {name}: out of range (got {value!r}, expected {bound}). "
                         "Use a value inside the range the node shows.")
    return value


@dataclass(frozen=True)
class InputField:
    """One node input as the shared validator sees it (nodes/common.py reads it from the node's schema).

    ``kind``: ``float`` / ``int`` (finite, within [minimum, maximum]), ``text`` (a string every tokenizer
    accepts) or ``socket`` (an instance of ``expected``; ``connect`` says what to wire there)."""

    name: str
    kind: str
    minimum: float | None = None
    maximum: float | None = None
    expected: type | tuple[type, ...] | None = None
    connect: str = ""


def check_inputs(display: str, fields: list[InputField], values: dict[str, Any]) -> None:
    """Check every value a node received against its schema, before the node does any work.

    ComfyUI checks the UI's values, but an API prompt can send NaN (it passes min/max: every comparison with
    NaN is false), a string where a Gentor socket is, or text with a NUL; each is refused naming the input."""
    for item in fields:
        value = values.get(item.name)
        if value is None:
            continue  # an optional input left unconnected
        if item.kind in ("float", "int"):
            check_number(value, item.name, display, item.minimum, item.maximum)
        elif item.kind == "text":
            check_text(value, item.name, display)
        elif item.kind == "socket" and item.expected is not None and not isinstance(value, item.expected):
            raise InputError(f"{display} {item.name}: not the kind of value this socket takes (got "
                             f"{type(value).__name__} {_short(value)}, expected {item.connect}). Connect "
                             f"{item.connect} to '{item.name}'.")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def check_aspect(width: int, height: int, display: str, name: str, max_ratio: float = DEFAULT_MAX_ASPECT,
                 min_side: int = SIZE_STEP) -> None:
    """Refuse sizes the backend cannot make: a side under ``min_side`` or an aspect beyond ``max_ratio``.

    ``name`` is the UI input the size came from (``width/height`` or ``image_2``)."""
    if width < min_side or height < min_side:
        raise InputError(f"{display} {name}: a side is too small (got {width}x{height}, expected both sides "
                         f">= {min_side} px). Use a larger image or size.")
    ratio = max(width, height) / min(width, height)
    if ratio > max_ratio:
        raise InputError(f"{display} {name}: aspect ratio too extreme (got {width}x{height}, ratio "
                         f"{ratio:.1f}:1, expected at most {max_ratio:g}:1, the widest the backend is sized "
                         "for). Crop or pad the image, or choose a less elongated size.")


def collect_references(inputs: list[tuple[str, torch.Tensor | None]], display: str,
                       limit: int) -> list[Image.Image]:
    """Reference images from ``image_1`` ... ``image_N``: one image per input, at most ``limit`` in all.

    A batch on one input would silently become several references (or be cut); it is refused instead."""
    images: list[Image.Image] = []
    for name, tensor in inputs:
        if tensor is None:
            continue
        pils = tensor_to_pils(tensor, name, display)
        if len(pils) != 1:
            raise InputError(f"{display} {name}: a batch of {len(pils)} images on one reference input (got "
                             f"{len(pils)} images, expected 1 per input). Connect each reference to its own "
                             "image_k input (pick one image of a batch with Image From Batch).")
        images.extend(pils)
    if len(images) > limit:
        raise InputError(f"{display} image_1..image_{len(inputs)}: too many reference images for this model "
                         f"(got {len(images)}, expected at most {limit}). Disconnect "
                         f"{len(images) - limit} of them.")
    return images


@contextmanager
def library_errors(display: str, name: str, expected: str, todo: str) -> Iterator[None]:
    """Re-raise a library's bare error (file system, PIL, tokenizers, …) in the pack's format.

    Our own errors, Cancel and out-of-memory pass through unchanged (ComfyUI treats the last two
    specially); programming errors (TypeError, KeyError, …) are not libraries' and also pass."""
    try:
        yield
    except GentorError:
        raise
    except Exception as exc:  # noqa: BLE001 - filtered just below, re-raised otherwise
        if not _is_library_error(exc):
            raise
        what = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:500]
        raise LibraryError(f"{display} {name}: a library failed on it (got {what}, expected {expected}). "
                           f"{todo}") from exc


def _is_library_error(exc: Exception) -> bool:
    from .. import glue  # noqa: PLC0415 - the glue module imports torch; keep it out of module import

    if glue.is_interrupt(exc) or isinstance(exc, torch.OutOfMemoryError):
        return False
    module = type(exc).__module__.split(".")[0]
    # tokenizers raises plain Exception for a corrupt tokenizer.json; file systems raise OSError.
    return (isinstance(exc, (OSError, UnicodeError, EOFError)) or type(exc) is Exception
            or module in LIBRARY_MODULES)
