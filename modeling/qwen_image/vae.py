"""diffusers' ``AutoencoderKLQwenImage`` for still images: one frame in, one frame out, no frame caches.

The Qwen-Image VAE is a causal video VAE. Its whole (untiled) encode and decode keep, at every causal conv, a
clone of the last input frames (``feat_cache``) so that the next chunk of a video can see them. A still image is
one frame, one chunk: those caches are written and never read (the first chunk's convs pad with zeros either way,
and the temporal up/down-sampling is skipped for it), yet they hold about as much memory as the activations
themselves. Here a one-frame encode or decode runs the same modules with ``feat_cache=None``: bit-identical output
(tests/test_qwen_image_vae.py), about half the decode's peak memory (counted with the released config:
benchmarks/bench_qwen_image_vae.py --simulate). Videos (more than one frame) and tiled decodes take diffusers' own
path unchanged.
"""
from __future__ import annotations

import torch
from diffusers import AutoencoderKLQwenImage
from diffusers.models.autoencoders.vae import DecoderOutput

FRAME_AXIS = 2  # latents and pixels are [B, C, T, H, W]


class StillImageQwenImageVAE(AutoencoderKLQwenImage):
    """``AutoencoderKLQwenImage`` whose one-frame encode/decode skips the frame caches (same output)."""

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[FRAME_AXIS] != 1 or self.use_tiling:
            return super()._encode(x)
        return self.quant_conv(self.encoder(x))

    def _decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        if z.shape[FRAME_AXIS] != 1 or self.use_tiling:
            return super()._decode(z, return_dict=return_dict)
        out = torch.clamp(self.decoder(self.post_quant_conv(z)), min=-1.0, max=1.0)
        return DecoderOutput(sample=out) if return_dict else (out,)
