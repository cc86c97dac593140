"""Image preprocessing of the reference (``data/transforms.py`` rules, restated).

Resize so the long side <= max and the short side >= min, both multiples of ``stride`` (nearest, at least
one stride); scale down again if the pixel count exceeds ``max_pixels``; re-clamp the long side. Bicubic
resampling (PIL), then [0,1] -> [-1,1].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

MAX_PIXELS = 14 * 14 * 9 * 1024  # 1,806,336


@dataclass(frozen=True)
class ResizeRule:
    max_size: int
    min_size: int
    stride: int
    max_pixels: int = MAX_PIXELS

    def _divisible(self, value: float) -> int:
        # Python's round (half to even) on purpose: the reference uses it.
        return max(self.stride, int(round(value / self.stride) * self.stride))

    def _scaled(self, width: int, height: int, scale: float) -> tuple[int, int]:
        return self._divisible(round(width * scale)), self._divisible(round(height * scale))

    def size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) an input of this size is resized to."""
        scale = min(self.max_size / max(width, height), 1.0)
        scale = max(scale, self.min_size / min(width, height))
        w, h = self._scaled(width, height, scale)
        if w * h > self.max_pixels:
            w, h = self._scaled(w, h, self.max_pixels / (w * h))
        if max(w, h) > self.max_size:
            w, h = self._scaled(w, h, self.max_size / max(w, h))
        return w, h

    def resize(self, image: Image.Image) -> Image.Image:
        w, h = self.size(*image.size)
        return image if (w, h) == image.size else image.resize((w, h), Image.BICUBIC)


# The released model's rules (app.py / inference notebook).
VAE_RULE = ResizeRule(1024, 512, 16)
VIT_RULE = ResizeRule(980, 224, 14)


def to_model_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL -> [3, H, W] float32 in [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return (torch.from_numpy(arr).permute(2, 0, 1) - 0.5) / 0.5
