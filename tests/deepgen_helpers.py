"""Shared pieces of the DeepGen tests: the tiny folders and independent reference computations.

The reference functions below recompute the official algorithm from raw tensors with plain torch
formulas (no pack module), so the tests compare the pack against something it did not produce.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from tests import tiny_deepgen


_WRITTEN: dict[int, Path] = {}


def deepgen_models(tmp_path_factory) -> Path:
    """The tiny DeepGen folders, written once per test session (the factory is session-wide)."""
    key = id(tmp_path_factory)
    if key not in _WRITTEN:
        out = Path(os.environ.get("GENTOR_TINY_DIR") or tmp_path_factory.mktemp("deepgen_models"))
        tiny_deepgen.write(out)
        _WRITTEN[key] = out
    return _WRITTEN[key]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def naive_connector(state: dict[str, torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """Pre-norm encoder layers written out as formulas (LayerNorm, softmax attention, tanh-GELU MLP)."""
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("connector.layers.")})

    def lin(t: torch.Tensor, name: str) -> torch.Tensor:
        return t @ state[name + ".weight"].T + state[name + ".bias"]

    def ln(t: torch.Tensor, name: str) -> torch.Tensor:
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        return (t - mu) / torch.sqrt(var + 1e-6) * state[name + ".weight"] + state[name + ".bias"]

    for i in layers:
        p = f"connector.layers.{i}."
        h = ln(x, p + "layer_norm1")
        b, n, c = h.shape
        d = c // heads
        q, k, v = (lin(h, p + f"self_attn.{m}").view(b, n, heads, d).transpose(1, 2) for m in ("q_proj", "k_proj", "v_proj"))
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        a = (w @ v).transpose(1, 2).reshape(b, n, c)
        x = x + lin(a, p + "self_attn.out_proj")
        h = ln(x, p + "layer_norm2")
        u = lin(h, p + "mlp.fc1")
        u = 0.5 * u * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u**3)))
        x = x + lin(u, p + "mlp.fc2")
    return x


def naive_bridge(state: dict[str, torch.Tensor], stacked: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """projector_1 -> connector -> (projector_2 of the mean, projector_3), in float64."""
    state = {k: v.double() for k, v in state.items()}
    stacked = stacked.double()
    x = stacked @ state["projector_1.weight"].T + state["projector_1.bias"]
    x = naive_connector(state, x, heads)
    pooled = x.mean(1) @ state["projector_2.weight"].T + state["projector_2.bias"]
    seq = x @ state["projector_3.weight"].T + state["projector_3.bias"]
    return pooled, seq


def official_sigmas(steps: int, shift: float, train_steps: int = 1000) -> list[float]:
    """SD3 static-shift schedule (backend_specs §2.5): s = linspace(1, shifted(1/1000), n), shifted again."""
    def shifted(s: float) -> float:
        return shift * s / (1 + (shift - 1) * s)

    s_min = shifted(1.0 / train_steps)
    lin = [1.0 + (s_min - 1.0) * i / (steps - 1) for i in range(steps)] if steps > 1 else [1.0]
    return [shifted(s) for s in lin] + [0.0]


def patchify_reference(pixels: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """Official ViT input (28/32 bilinear, CLIP norm, temporal copy, merge-window order) with explicit loops."""
    mean = torch.tensor((0.48145466, 0.4578275, 0.40821073)).view(3, 1, 1)
    std = torch.tensor((0.26862954, 0.26130258, 0.27577711)).view(3, 1, 1)
    x = F.interpolate(pixels[None], scale_factor=28 / 32, mode="bilinear")[0]
    x = ((x + 1) / 2 - mean) / std
    _, h, w = x.shape
    rows = []
    for bh in range(h // patch // merge):
        for bw in range(w // patch // merge):
            for mh in range(merge):
                for mw in range(merge):
                    r, c = (bh * merge + mh) * patch, (bw * merge + mw) * patch
                    tile = x[:, r:r + patch, c:c + patch]  # [c, p, q]
                    rows.append(torch.stack([tile] * temporal, dim=1).reshape(-1))  # (c, tp, p, q)
    return torch.stack(rows)
