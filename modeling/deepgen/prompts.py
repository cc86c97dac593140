"""DeepGen prompt templates and image preprocessing (official rules, backend_specs.md §2.4)."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

USER_TURN = "<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n"
GENERATION = "Generate an image: {input}"
IMAGE_START, IMAGE_PAD, IMAGE_END = "<|vision_start|>", "<|image_pad|>", "<|vision_end|>"
SIZE_UNIT = 32  # reference and output sides are multiples of 32 (VAE 8x * DiT patch 2 * ViT 28/32 rule)
VIT_SCALE = 28 / 32  # 512 -> 448: the "ViT 448" path
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FIX_PIXELS_SIDE = 512  # training resize: area 512^2 at the image's aspect
RESIZE_RULES = ("dynamic", "fix_pixels", "output_size")


def t2i_texts(prompts: Sequence[str]) -> list[str]:
    """Chat-wrapped text-to-image prompts ("Generate an image: ..."); negatives go through the same wrapper."""
    return [USER_TURN.format(input=GENERATION.format(input=p)) for p in prompts]


def edit_texts(prompts: Sequence[str], ref_lens: Sequence[int]) -> list[str]:
    """Edit prompts: one vision block per reference (``ref_lens`` image tokens each), a newline, the text."""
    blocks = "".join(IMAGE_START + IMAGE_PAD * n + IMAGE_END for n in ref_lens)
    return [USER_TURN.format(input=f"{blocks}\n{p}") for p in prompts]


def _ceil_unit(x: float) -> int:
    return max(SIZE_UNIT, math.ceil(x / SIZE_UNIT) * SIZE_UNIT)


def reference_size(width: int, height: int, rule: str, target: tuple[int, int]) -> tuple[int, int]:
    """Size a reference image is resized to.

    ``dynamic`` (official CLI): the long side is clamped to ``max(target)``, the other follows the aspect
    (rounded UP to 32); images already smaller are only rounded up to 32. ``fix_pixels`` (training): area
    512^2 at the image's aspect, each side rounded up to 32. ``output_size``: exactly the target size.
    """
    if rule == "output_size":
        return target
    if rule == "fix_pixels":
        ratio = FIX_PIXELS_SIDE / math.sqrt(width * height)
        return _ceil_unit(width * ratio), _ceil_unit(height * ratio)
    if rule != "dynamic":
        raise ValueError(f"unknown reference resize rule {rule!r}; known: {', '.join(RESIZE_RULES)}")
    limit = max(target)
    if width >= height and width >= limit:
        return limit, _ceil_unit(height * limit / width)
    if height >= width and height >= limit:
        return _ceil_unit(width * limit / height), limit
    return _ceil_unit(width), _ceil_unit(height)


def to_pixels(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """RGB PIL -> [3, H, W] float32 in [-1, 1] at ``size`` (PIL bicubic resize, as the official CLI)."""
    if image.size != size:
        image = image.resize(size, Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32).copy())
    return (arr / 255.0 * 2.0 - 1.0).permute(2, 0, 1).contiguous()


def vit_patches(pixels: torch.Tensor, patch: int, merge: int, temporal: int) -> tuple[torch.Tensor, list[int]]:
    """[3, H, W] in [-1, 1] -> (Qwen2.5-VL patch rows [N, 3*temporal*patch*patch], grid_thw).

    Resized by 28/32 (bilinear), CLIP-normalised, repeated over the temporal patch, and ordered in the
    vision tower's 2x2 merge windows (row features: channel, temporal, patch row, patch column).
    """
    x = F.interpolate(pixels[None].float(), scale_factor=VIT_SCALE, mode="bilinear")
    x = (x + 1.0) / 2.0
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype).view(1, 3, 1, 1)
    x = (x - mean) / std
    _, c, h, w = x.shape
    gh, gw = h // patch, w // patch
    if gh * patch != h or gw * patch != w or gh % merge or gw % merge:
        raise ValueError(f"reference of {w}x{h} ViT pixels does not tile into {patch * merge}-pixel merge windows")
    x = x[:, None].expand(1, temporal, c, h, w)
    x = x.reshape(1, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    # (t, tp, c, H/m, m, p, W/m, m', q) -> (H/m, W/m, m, m', c, tp, p, q)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gh * gw, c * temporal * patch * patch), [1, gh, gw]


def merged_tokens(grid_thw: Sequence[int], merge: int) -> int:
    """Image tokens one reference adds to the prompt after the 2x2 merge."""
    t, h, w = grid_thw
    return t * h * w // (merge * merge)
