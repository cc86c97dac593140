"""diffusers' Qwen-Image VAEs for still images: one frame in, one frame out, no frame caches.

The Qwen-Image VAEs (``AutoencoderKLQwenImage``, and 2.1's ``AutoencoderKLQwenImage21``) are causal video VAEs.
Their whole (untiled) encode and decode keep, at every causal conv, a clone of the last input frames
(``feat_cache``) so that the next chunk of a video can see them. A still image is one frame, one chunk: those
caches are written and never read (the first chunk's convs pad with zeros either way, and the temporal up/down-
sampling is skipped for it), yet they hold about as much memory as the activations themselves. Here a one-frame
encode or decode runs the same modules with ``feat_cache=None``: bit-identical output (tests/test_qwen_image_vae.py),
0.39x the decode's allocations (counted with the released config: benchmarks/bench_qwen_image_vae.py --simulate).
Videos (more than one frame), tiled decodes and patchified VAEs take diffusers' own path unchanged.
"""
from __future__ import annotations

import functools

import torch
from diffusers import AutoencoderKLQwenImage
from diffusers.models.autoencoders.vae import DecoderOutput

FRAME_AXIS = 2  # latents and pixels are [B, C, T, H, W]


class StillImageMixin:
    """One-frame ``_encode`` / ``_decode`` without the frame caches, for diffusers' Qwen-Image VAE classes."""

    # Extra decoder arguments of the first chunk (2.1's decoder treats its first frame specially).
    FIRST_CHUNK: dict = {}

    def _still(self, x: torch.Tensor) -> bool:
        return (x.shape[FRAME_AXIS] == 1 and not self.use_tiling
                and getattr(self.config, "patch_size", None) is None)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if not self._still(x):
            return super()._encode(x)
        return self.quant_conv(self.encoder(x))

    def _decode(self, z: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        if not self._still(z):
            return super()._decode(z, return_dict=return_dict)
        out = torch.clamp(self.decoder(self.post_quant_conv(z), **self.FIRST_CHUNK), min=-1.0, max=1.0)
        return DecoderOutput(sample=out) if return_dict else (out,)


class StillImageQwenImageVAE(StillImageMixin, AutoencoderKLQwenImage):
    """``AutoencoderKLQwenImage`` whose one-frame encode/decode skips the frame caches (same output)."""


@functools.lru_cache(maxsize=1)
def still_image_vae21() -> type:
    """The same for Qwen-Image 2.1's ``AutoencoderKLQwenImage21`` (looked up when asked: older diffusers lack it)."""
    import diffusers  # noqa: PLC0415

    return type("StillImageQwenImage21VAE", (StillImageMixin, diffusers.AutoencoderKLQwenImage21),
                {"FIRST_CHUNK": {"first_chunk": True}, "__module__": __name__,
                 "__doc__": "``AutoencoderKLQwenImage21`` whose one-frame encode/decode skips the frame caches."})
