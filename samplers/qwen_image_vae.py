"""Qwen-Image VAE decode: tiled / sliced or whole, chosen from the memory estimate (or forced).

diffusers' Qwen-Image VAEs (``AutoencoderKLQwenImage``, ``AutoencoderKLQwenImage21``) implement tiling (the
latent is decoded in overlapping tiles blended linearly at the seams) and slicing (a batch decoded one image
at a time). Tiling bounds the decode's activations by the tile size instead of the image size; the output
differs from a whole decode only near the seams (tests/test_qwen_image_vae.py states the tolerance).
Measured peaks (CPU RSS and counted allocations, 1024..2048 px): benchmarks/bench_qwen_image_vae.py and the README.
"""
from __future__ import annotations

import torch

VAE_TILING_MODES = ("auto", "on", "off")
DEFAULT_VAE_TILING = "auto"
# diffusers' default tile of these VAEs: 256 px tiles, 192 px stride (64 px blended overlap).
TILE_PX = 256
# Bytes per output pixel per VAE (decoder) base channel, x itemsize, that diffusers' own decode (with its video
# frame caches: how tiles are decoded) holds at its peak. Counted on the real-size VAEs
# (benchmarks/bench_qwen_image_vae.py --simulate; 256..2048 px, the same at every size):
# Qwen-Image 18 (its full-resolution stage keeps each causal conv's input frames cached next to the activations),
# Qwen-Image 2.1 21.3 (diffusers' default config: decoder_base_dim 144; counted at 512 / 1024 px). A CPU decode's
# RSS adds ~3 (measured on Qwen-Image, 256..1024 px: oneDNN holds one more reordered copy of the widest conv
# input). 24 covers both VAEs; the old 12 was 35-45% low (2048 px fp32 whole: 29 GB allocated, 12 said 19 GB).
VAE_DECODE_FACTOR = 24
# The Qwen-Image engine's VAE (modeling/qwen_image/vae.py) decodes a still image whole without those frame caches:
# counted 7.0 (256..2048 px, the same at every size: 2048 px fp32 11.3 GB instead of 29.0 GB); CPU RSS 7.8 per
# pixel (256 -> 512 px: 0.46 -> 1.04 GB) + the scratch below. Tiled decodes keep diffusers' path and
# VAE_DECODE_FACTOR.
STILL_IMAGE_DECODE_FACTOR = 9
# The same for Qwen-Image 2.1's VAE: counted 11.0 (512 px; 21.3 with the caches), + ~3 on a CPU.
STILL_IMAGE21_DECODE_FACTOR = 14
# CPU scratch per decode whatever the size (oneDNN weight reorders; the RSS intercept, measured 0.2-0.26 GB). Added
# once per estimate, whole or tiled.
DECODE_SCRATCH_BYTES = 300 * 10**6
# Floats per pixel held besides the current tile: diffusers keeps every decoded tile until it blends them; the tiles
# overlap, so they cover up to ~1.8x the image in RGB (counted: 5.1 floats/px at 1024 px); 8 also covers RGBA.
TILED_HELD_FLOATS = 8


def decode_bytes(width: int, height: int, batch: int, base_dim: int, itemsize: int, tiled: bool,
                 whole_factor: int = VAE_DECODE_FACTOR) -> int:
    """Activation bytes of the VAE decode, whole (``whole_factor`` bytes per pixel, channel and itemsize) or
    tiled + sliced."""
    if not tiled:
        return width * height * base_dim * itemsize * whole_factor * batch + DECODE_SCRATCH_BYTES
    tile = min(width, TILE_PX) * min(height, TILE_PX) * base_dim * itemsize * VAE_DECODE_FACTOR
    # the decoded tiles and the blended output stay whole; slicing decodes one batch item at a time
    return tile + width * height * TILED_HELD_FLOATS * itemsize * batch + DECODE_SCRATCH_BYTES


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
