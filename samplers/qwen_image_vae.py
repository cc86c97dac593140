"""Qwen-Image VAE decode: tiled / sliced or whole, chosen from the memory estimate (or forced).

diffusers' Qwen-Image VAEs (``AutoencoderKLQwenImage``, ``AutoencoderKLQwenImage21``) implement tiling (the
latent is decoded in overlapping tiles blended linearly at the seams) and slicing (a batch decoded one image
at a time). Tiling bounds the decode's activations by the tile size instead of the image size; the output
differs from a whole decode only near the seams (tests/test_qwen_lora.py measures it).
"""
from __future__ import annotations

import torch

VAE_TILING_MODES = ("auto", "on", "off")
DEFAULT_VAE_TILING = "auto"
# diffusers' default tile of these VAEs: 256 px tiles, 192 px stride (64 px blended overlap).
TILE_PX = 256
# Rough bytes per pixel per VAE base channel held during a decode (upsampling stages, causal caches).
VAE_DECODE_FACTOR = 12
OUTPUT_CHANNELS = 4  # RGB(A) float output kept whole while tiles are blended


def decode_bytes(width: int, height: int, batch: int, base_dim: int, itemsize: int, tiled: bool) -> int:
    """Activation bytes of the VAE decode, whole or tiled + sliced."""
    if not tiled:
        return width * height * base_dim * itemsize * VAE_DECODE_FACTOR * batch
    tile = min(width, TILE_PX) * min(height, TILE_PX) * base_dim * itemsize * VAE_DECODE_FACTOR
    # the blended output image stays whole; slicing decodes one batch item at a time
    return tile + width * height * OUTPUT_CHANNELS * itemsize * 2 * batch


def choose(mode: str, untiled_fits: bool) -> tuple[bool, str]:
    """(tiled?, note). ``auto`` tiles only when the whole decode would not fit the free memory."""
    if mode == "on":
        return True, "VAE decode tiled + sliced (vae_tiling = on)"
    if mode == "off":
        return False, ""
    if untiled_fits:
        return False, ""
    return True, "VAE decode tiled + sliced automatically: a whole decode would not fit the free memory"


def apply(vae: torch.nn.Module, tiled: bool) -> None:
    """Switch the cached VAE's tiling/slicing for this run (the flags live on the shared module)."""
    if tiled:
        vae.enable_tiling()
        vae.enable_slicing()
    else:
        vae.disable_tiling()
        vae.disable_slicing()
