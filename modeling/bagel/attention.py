"""Packed attention through PyTorch SDPA, rotary embedding and the packed KV cache.

Inference runs one sample at a time; every LLM call appends ONE query segment after the cached context.
The official masks (flash-attn varlen, bottom-right aligned causal):
- text segment (``causal=True``): query i sees every cached token and query tokens 0..i;
- image segment (ViT patches, VAE latents, noisy latents with their two marker tokens): sees every cached
  token and the whole segment (bidirectional).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2's 1-D RoPE tables for ``position_ids`` ([L] -> two [L, head_dim]), computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device)
                                / head_dim))
    freqs = position_ids.float().reshape(-1, 1) * inv_freq.reshape(1, -1)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [L, heads, D]; cos/sin [L, D]."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


def segment_mask(past: int, length: int, causal: bool, device: torch.device) -> torch.Tensor | None:
    """Boolean [length, past + length] mask (True = attend) of one query segment after ``past`` cached
    tokens; None when every key is visible (full attention, or a single causal token)."""
    if not causal or length == 1:
        return None
    q = torch.arange(length, device=device).reshape(-1, 1)
    k = torch.arange(past + length, device=device).reshape(1, -1)
    return k <= q + past  # bottom-right aligned


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """q [Lq, H, D] against k/v [Lk, KVH, D] (cache + segment, Lk >= Lq) -> [Lq, H*D].

    ``mask`` (bool [Lq, Lk]) overrides the segment rule (used to check a whole packed sequence at once).
    """
    lq, heads, dim = q.shape
    if mask is None:
        mask = segment_mask(k.shape[0] - lq, lq, causal, q.device)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0),
        attn_mask=mask, enable_gqa=k.shape[1] != heads)
    return out.squeeze(0).transpose(0, 1).reshape(lq, heads * dim)


@dataclass(frozen=True)
class KVCache:
    """Rotated keys and values of a context, per layer [length, kv_heads, head_dim], plus the next RoPE
    position. Immutable: ``extend`` returns a new cache sharing the old tensors, so a context snapshot
    (the CFG contexts) costs nothing."""

    keys: tuple[torch.Tensor | None, ...]
    values: tuple[torch.Tensor | None, ...]
    length: int = 0
    next_position: int = 0

    @classmethod
    def empty(cls, num_layers: int) -> "KVCache":
        return cls((None,) * num_layers, (None,) * num_layers)

    def layer(self, i: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.keys[i], self.values[i]

    def extend(self, keys: list[torch.Tensor], values: list[torch.Tensor], positions: int) -> "KVCache":
        """A cache holding ``keys``/``values`` (old + new tokens) with the position counter advanced."""
        return KVCache(tuple(keys), tuple(values), keys[0].shape[0], self.next_position + positions)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)
