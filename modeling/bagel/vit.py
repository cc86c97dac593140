"""NaViT-packed SigLIP vision tower (``vit_model.vision_model.*`` keys of ema.safetensors).

The patch embedding is a Linear over patches flattened as (row-in-patch, col-in-patch, channel) — the
released weights store it that way ([hidden, 14*14*3]). Learned position embeddings are looked up by the
flattened id ``row * 70 + col``. Attention is bidirectional within each image of the packed batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .activations import activation
from .config import ViTConfig


class SiglipAttention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, h)
        self.k_proj = nn.Linear(h, h)
        self.v_proj = nn.Linear(h, h)
        self.out_proj = nn.Linear(h, h)

    def forward(self, x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        n, heads, dim = x.shape[0], self.cfg.num_heads, self.cfg.head_dim

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(n, heads, dim).transpose(0, 1)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        outs, start = [], 0
        for length in seqlens:  # one image at a time: no attention across images
            sl = slice(start, start + length)
            outs.append(F.scaled_dot_product_attention(q[:, sl], k[:, sl], v[:, sl]))
            start += length
        out = torch.cat(outs, dim=1).transpose(0, 1).reshape(n, heads * dim)
        return self.out_proj(out)


class SiglipMLP(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.act = activation(cfg.hidden_act)
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = SiglipAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = SiglipMLP(cfg)

    def forward(self, x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), seqlens)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(cfg) for _ in range(cfg.num_layers))

    def forward(self, x: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, seqlens)
        return x


class SiglipEmbeddings(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.patch_embedding = nn.Linear(cfg.num_channels * cfg.patch_size**2, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.patches_per_side**2, cfg.hidden_size)


class SiglipVisionTransformer(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.embeddings = SiglipEmbeddings(cfg)
        self.encoder = SiglipEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        x = self.embeddings.patch_embedding(patches) + self.embeddings.position_embedding(position_ids)
        return self.post_layernorm(self.encoder(x, seqlens))


class SiglipNavit(nn.Module):
    """``vit_model``: packed patches [N, p*p*C] + flattened position ids [N] -> features [N, hidden]."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.vision_model = SiglipVisionTransformer(cfg)

    def forward(self, patches: torch.Tensor, position_ids: torch.Tensor, seqlens: list[int]) -> torch.Tensor:
        # Every weight is used inside the forward of its parent module: block offload (diffusers' group
        # offloading with nested block_modules) onloads a parent's loose weights only in its forward.
        return self.vision_model(patches, position_ids, seqlens)
