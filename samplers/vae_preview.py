"""A preview made by the model's own VAE, for latents with no published linear RGB map (Qwen-Image 2.1's
64-channel latent: a linear map fitted on random tiny weights would say nothing about the real model).

The latent is shrunk to at most ``PREVIEW_LATENT_SIDE`` tokens a side first, so a preview costs a small
decode whatever the output size (512 px a side with a 16x VAE)."""
from __future__ import annotations

from typing import Any

import torch
from PIL import Image

PREVIEW_LATENT_SIDE = 32


def decode_preview(vae: Any, latent: torch.Tensor) -> Image.Image:
    """The first image of ``latent`` ([B,C,H,W] or [B,C,1,H,W], normalised as the pipeline samples it) as RGB.

    The VAE's ``latents_mean`` / ``latents_std`` (when its config has them) are undone as the pipeline does
    before its final decode; an alpha channel is dropped (the preview shows colour)."""
    lat = latent[:1].float()
    if lat.ndim == 5:
        lat = lat[:, :, 0]
    h, w = lat.shape[-2:]
    scale = min(1.0, PREVIEW_LATENT_SIDE / max(h, w))
    if scale < 1.0:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        lat = torch.nn.functional.interpolate(lat, size=size, mode="area")
    config = getattr(vae, "config", None)
    channels = lat.shape[1]
    mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
    if mean is not None and std is not None:
        lat = lat * torch.tensor(std).view(1, channels, 1, 1) + torch.tensor(mean).view(1, channels, 1, 1)
    device = next((p.device for p in vae.parameters()), lat.device)
    with torch.inference_mode():
        image = vae.decode(lat[:, :, None].to(device=device, dtype=getattr(vae, "dtype", lat.dtype)),
                           return_dict=False)[0]
    rgb = image[0, :3, 0] if image.ndim == 5 else image[0, :3]
    arr = ((rgb.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")
