"""Small BAGEL parts: timestep embedder, 2-D sin-cos position tables, ViT->LLM connector, patchify."""
from __future__ import annotations

import math

import torch
from torch import nn

from .activations import activation

MAX_PERIOD = 10000.0


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, dim]: sin half then cos half, frequencies 1 / 10000^(i / (dim/2)) (MAE/DiT)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / MAX_PERIOD**omega
    out = pos.to(torch.float64).reshape(-1, 1) * omega.reshape(1, -1)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d_table(dim: int, side: int) -> torch.Tensor:
    """[side*side, dim] table, row-major (row * side + col). First half encodes the column, second the row,
    as in the DiT/MAE formula (its meshgrid puts the width coordinate first)."""
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, cols.flatten()), sincos_1d(dim // 2, rows.flatten())], dim=1).float()


class PositionEmbedding(nn.Module):
    """A fixed 2-D sin-cos table looked up by flattened position id (stored in the checkpoint anyway)."""

    def __init__(self, side: int, hidden: int):
        super().__init__()
        self.side = side
        self.pos_embed = nn.Parameter(torch.zeros(side * side, hidden), requires_grad=False)

    def reset_table(self) -> None:
        """Fill the table from the formula (used only when building a fresh model, e.g. the tiny kit)."""
        with torch.no_grad():
            self.pos_embed.copy_(sincos_2d_table(self.pos_embed.shape[1], self.side))

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        return self.pos_embed[position_ids]


class TimestepEmbedder(nn.Module):
    """DiT timestep embedder on the fractional t in [0, 1] (no x1000): cos half first, then sin."""

    def __init__(self, hidden: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def frequencies(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(MAX_PERIOD) * torch.arange(half, dtype=torch.float32) / half).to(t.device)
        args = t.reshape(-1, 1).float() * freqs.reshape(1, -1)
        return torch.cat([args.cos(), args.sin()], dim=-1)

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # dtype = the model's compute dtype (the Linear weights may rest in FP8 and be cast by a hook).
        return self.mlp(self.frequencies(t).to(dtype))


class Connector(nn.Module):
    """ViT features -> LLM width: Linear, GELU(tanh), Linear."""

    def __init__(self, in_dim: int, out_dim: int, act: str = "gelu_pytorch_tanh"):
        super().__init__()
        self.act = activation(act)
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def patchify(image: torch.Tensor, p: int) -> torch.Tensor:
    """[C, H, W] -> [(H/p)*(W/p), p*p*C], each patch flattened as (row-in-patch, col-in-patch, channel)."""
    c, h, w = image.shape
    x = image.reshape(c, h // p, p, w // p, p).permute(1, 3, 2, 4, 0)
    return x.reshape((h // p) * (w // p), p * p * c)


def unpatchify_latent(tokens: torch.Tensor, h: int, w: int, p: int, channels: int) -> torch.Tensor:
    """[h*w, p*p*C] -> [C, h*p, w*p] (inverse of ``patchify`` on a latent)."""
    x = tokens.reshape(h, w, p, p, channels).permute(4, 0, 2, 1, 3)
    return x.reshape(channels, h * p, w * p)


def flattened_position_ids(height: int, width: int, patch: int, side: int) -> torch.Tensor:
    """Row-major ids ``row * side + col`` of the patches of an image (extrapolation: never rescaled)."""
    rows = torch.arange(height // patch)
    cols = torch.arange(width // patch)
    return (rows.reshape(-1, 1) * side + cols.reshape(1, -1)).flatten()
