"""What every backend's sampler shares: requests/results, image conversion, size rounding, previews."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import GenerationError, InputError

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
