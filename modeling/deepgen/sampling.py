"""DeepGen's flow-matching loop (the SD3 pipeline's, with reference latents), noise and VAE helpers.

Randomness (documented, so a seed reproduces an image): ONE CPU ``torch.Generator`` seeded with the
node's seed draws, in this order, the initial noise ``torch.randn([B, 16, H/8, W/8])`` (float32), then
the VAE posterior sample of every reference image in input order (diffusers' ``latent_dist.sample``).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from .encode import compute_dtype

LATENT_CHANNELS = 16
VAE_FACTOR = 8


def generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(int(seed))


def initial_noise(gen: torch.Generator, batch: int, height: int, width: int) -> torch.Tensor:
    """[B, 16, H/8, W/8] float32 standard normal noise from the CPU generator."""
    return torch.randn([batch, LATENT_CHANNELS, height // VAE_FACTOR, width // VAE_FACTOR], generator=gen,
                       dtype=torch.float32)


def _vae_dtype(vae: Any) -> torch.dtype:
    return next(vae.parameters()).dtype


def encode_references(vae: Any, references: Sequence[torch.Tensor], gen: torch.Generator,
                      device: torch.device) -> list[torch.Tensor]:
    """[-1, 1] pixels [3, H, W] -> scaled latents [16, H/8, W/8] (posterior SAMPLE, as the official code)."""
    shift, scale = vae.config.shift_factor or 0.0, vae.config.scaling_factor
    out = []
    for pixels in references:
        dist = vae.encode(pixels[None].to(device=device, dtype=_vae_dtype(vae))).latent_dist
        # diffusers draws with randn_tensor on the generator's device (the CPU) and moves the result
        z = dist.sample(generator=gen)
        out.append(((z - shift) * scale)[0])
    return out


def decode(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents [B, 16, h, w] -> images [B, 3, H, W] in 0..1."""
    shift, scale = vae.config.shift_factor or 0.0, vae.config.scaling_factor
    z = latents / scale + shift
    x = vae.decode(z.to(_vae_dtype(vae)), return_dict=False)[0]
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def timesteps(scheduler: Any, steps: int, latent_hw: tuple[int, int], patch: int, device: torch.device) -> torch.Tensor:
    """``set_timesteps`` as diffusers' SD3 pipeline calls it (``mu`` only for dynamic-shifting configs)."""
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", False):
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift  # noqa: PLC0415

        seq = (latent_hw[0] // patch) * (latent_hw[1] // patch)
        cfg = scheduler.config
        kwargs["mu"] = calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                       cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
    scheduler.set_timesteps(steps, device=device, **kwargs)
    return scheduler.timesteps


def denoise(transformer: Any, scheduler: Any, latents: torch.Tensor, prompt: tuple[torch.Tensor, torch.Tensor],
            negative: tuple[torch.Tensor, torch.Tensor], references: Sequence[torch.Tensor], steps: int,
            guidance: float, on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run the sampling loop from ``latents`` (float32); returns the final latents (float32).

    ``prompt`` / ``negative`` are (sequence, pooled) for the B samples. With ``guidance > 1`` each step
    runs the DiT once on [negative, prompt] (diffusers' SD3 CFG batch order) and mixes
    ``uncond + g * (cond - uncond)``; every sample sees all ``references``.
    """
    device = latents.device
    dtype = compute_dtype(transformer)
    cfg = guidance > 1.0  # as diffusers' SD3 pipeline (do_classifier_free_guidance)
    seq, pooled = prompt
    if cfg:
        seq, pooled = torch.cat([negative[0], seq]), torch.cat([negative[1], pooled])
    seq, pooled = seq.to(device=device, dtype=dtype), pooled.to(device=device, dtype=dtype)
    batch = seq.shape[0]
    refs = [r.to(device=device, dtype=dtype) for r in references]
    cond = [refs] * batch if refs else None
    ts = timesteps(scheduler, steps, tuple(latents.shape[-2:]), transformer.config.patch_size, device)
    for i, t in enumerate(ts):
        x = torch.cat([latents, latents]) if cfg else latents
        # the timestep stays float32, as in the official pipeline (bf16 would round 997 to 996)
        v = transformer(x.to(dtype), seq, pooled, t.expand(batch), cond)[0].float()
        if cfg:
            uncond, text = v.chunk(2)
            v = uncond + guidance * (text - uncond)
        latents = scheduler.step(v, t, latents, return_dict=False)[0]
        if on_step is not None:
            on_step(i + 1, latents)
    return latents
