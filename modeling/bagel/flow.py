"""Flow-matching schedule and BAGEL's three-way classifier-free guidance with renormalisation.

Velocity v = noise - x0; x_t = (1 - t) x0 + t noise; Euler steps from t = 1 to 0 on the shifted grid.
"""
from __future__ import annotations

import torch

RENORM_TYPES = ("global", "channel", "text_channel")
RENORM_EPS = 1e-8


def timesteps(num: int, shift: float) -> torch.Tensor:
    """``num`` grid points linspace(1, 0) mapped by t' = s t / (1 + (s - 1) t); the sampler takes num - 1
    Euler steps between consecutive points."""
    t = torch.linspace(1.0, 0.0, num)
    return shift * t / (1.0 + (shift - 1.0) * t)


def guidance_active(t: float, interval: tuple[float, float]) -> bool:
    """CFG applies when interval[0] < t <= interval[1]; outside both scales count as 1."""
    return interval[0] < t <= interval[1]


def branches(cfg_text: float, cfg_img: float, t: float, interval: tuple[float, float]) -> tuple[bool, bool]:
    """(text-CFG pass needed, image-CFG pass needed) at ``t``. Image CFG only exists inside text CFG:
    with cfg_text <= 1 the reference applies no guidance at all."""
    if not guidance_active(t, interval) or cfg_text <= 1.0:
        return False, False
    return True, cfg_img > 1.0


def _ratio(ref: torch.Tensor, guided: torch.Tensor, per_token: bool, lo: float) -> torch.Tensor:
    if per_token:
        a, b = ref.norm(dim=-1, keepdim=True), guided.norm(dim=-1, keepdim=True)
    else:
        a, b = ref.norm(), guided.norm()
    return (a / (b + RENORM_EPS)).clamp(min=lo, max=1.0)


def combine(v: torch.Tensor, v_text: torch.Tensor | None, v_img: torch.Tensor | None, cfg_text: float,
            cfg_img: float, renorm: str, renorm_min: float) -> torch.Tensor:
    """Guided velocity from the full (v), text-dropped (v_text) and image-dropped (v_img) predictions.

    global / channel: v' = v_img + s_i (v_text + s_t (v - v_text) - v_img), rescaled by ||v|| / ||v'|| over
    everything (global) or per token (channel), ratio clamped to [renorm_min, 1].
    text_channel: the per-token rescale applies to the text-guided part only, then image CFG without it.
    """
    if v_text is None:
        return v
    vt = v_text + cfg_text * (v - v_text)
    if renorm == "text_channel":
        vt = vt * _ratio(v, vt, True, renorm_min)
        return vt if v_img is None else v_img + cfg_img * (vt - v_img)
    guided = vt if v_img is None else v_img + cfg_img * (vt - v_img)
    if renorm not in ("global", "channel"):
        raise ValueError(f"unknown renorm type {renorm!r}; known: {', '.join(RENORM_TYPES)}")
    return guided * _ratio(v, guided, renorm == "channel", renorm_min)
