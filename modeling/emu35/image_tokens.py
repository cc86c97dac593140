"""Images <-> Emu3.5 token strings, the resize rule, output parsing.

An image is written as ``<|image start|>{h}*{w}<|image token|>`` + rows of ``<|visual token NNNNNN|>``
separated by ``<|extra_200|>`` (none after the last row) + ``<|image end|>``; h and w count 16-pixel
tokens (backend_specs.md §3.4).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from . import tokens as T
from .logits import parse_header
from .tokenizer import visual_token


def smart_resize(image: Image.Image, area: int, factor: int = T.DOWNSAMPLE) -> Image.Image:
    """The reference rule: keep the aspect at about ``area`` pixels, each side rounded to ``factor``."""
    width, height = image.size
    aspect = width / height
    new_h = int((area / aspect) ** 0.5)
    new_w = int(new_h * aspect)
    new_h = max(factor, (new_h + factor // 2) // factor * factor)
    new_w = max(factor, (new_w + factor // 2) // factor * factor)
    return image.resize((new_w, new_h), Image.BICUBIC)


def grid_for_aspect(aspect: str, area: int) -> tuple[int, int]:
    """Token grid (h, w) of a T2I aspect preset; the official grids at the official area, else the resize rule."""
    if aspect not in T.ASPECT_PRESETS:
        raise KeyError(aspect)
    h, w = T.ASPECT_PRESETS[aspect]
    if area == T.IMAGE_AREA:
        return h, w
    ratio = w / h
    rows = int((area / ratio) ** 0.5)
    cols = int(rows * ratio)
    return max(1, round(rows / T.DOWNSAMPLE)), max(1, round(cols / T.DOWNSAMPLE))


def to_pixels(image: Image.Image) -> torch.Tensor:
    """RGB PIL -> [1, 3, H, W] float32 in -1..1 (x / 127.5 - 1)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float64) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).float()


def to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """Decoder output in -1..1 -> 0..1, quantised to 8 bits as the reference saves images."""
    return (((pixels.float() + 1.0) * 127.5).clamp(0, 255).floor() / 255.0)


def image_string(codes: torch.Tensor) -> str:
    """codes [h, w] -> the image string of the prompt."""
    h, w = codes.shape
    rows = ["".join(visual_token(int(c)) for c in row) for row in codes.tolist()]
    return f"<|image start|>{h}*{w}<|image token|>" + "<|extra_200|>".join(rows) + "<|image end|>"


def grid_in_prompt(ids: list[int]) -> tuple[int, int] | None:
    """(h, w) of the LAST image header in ``ids`` (X2I output size), or None without an image."""
    try:
        img = len(ids) - 1 - ids[::-1].index(T.IMG)
        boi = len(ids) - 1 - ids[::-1].index(T.BOI)
    except ValueError:
        return None
    return parse_header(ids[boi + 1:img])


@dataclass
class Parsed:
    """Generated ids split into what a user sees."""

    text: str
    images: list[torch.Tensor] = field(default_factory=list)  # complete code grids [h, w]
    partial: torch.Tensor | None = None  # rows of an unfinished image
    grid: tuple[int, int] | None = None


def rows_of(ids: list[int]) -> list[list[int]]:
    """Visual codes of an image body (after IMG), split at EOL; an unfinished last row is dropped later."""
    rows, row = [], []
    for i in ids:
        if i == T.EOL:
            rows.append(row)
            row = []
        elif i >= T.BOV:
            row.append(i - T.BOV)
    if row:
        rows.append(row)
    return rows


def parse_output(ids: list[int], decode_text) -> Parsed:
    """Split generated ids into text (specials dropped) and images; incomplete images become ``partial``."""
    text_ids: list[int] = []
    out = Parsed("")
    i = 0
    while i < len(ids):
        if ids[i] != T.BOI:
            text_ids.append(ids[i])
            i += 1
            continue
        end = ids.index(T.EOI, i) if T.EOI in ids[i:] else len(ids)
        body = ids[i + 1:end]
        if T.IMG in body:
            cut = body.index(T.IMG)
            h, w = parse_header(body[:cut])
            rows = rows_of(body[cut + 1:])
            out.grid = (h, w)
            full = [r for r in rows if len(r) == w]
            if end < len(ids) and len(full) == h and len(rows) == h:
                out.images.append(torch.tensor(full, dtype=torch.long))
            elif full:
                out.partial = torch.tensor(full, dtype=torch.long)
        i = end + 1
    out.text = decode_text(text_ids).strip()
    return out


def tokens_needed(grid: tuple[int, int], boi_in_prompt: bool = False) -> int:
    """Tokens one image costs from BOI to EOI: BOI + header + IMG + h*(w+1) (last row ends with EOI)."""
    h, w = grid
    return (0 if boi_in_prompt else 1) + len(f"{h}*{w}") + 1 + h * (w + 1)


def area_of(grid: tuple[int, int]) -> int:
    return grid[0] * grid[1] * T.DOWNSAMPLE ** 2
