"""The BAGEL top module (every key of ``ema.safetensors``) and its one entry point, ``forward(query, cache)``.

Everything the samplers do with the weights goes through ``forward`` so that offload hooks placed on this
module (and its direct children) see every use.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .attention import KVCache
from .config import CONNECTOR_ACT, TIMESTEP_FREQ_DIM, BagelConfig
from .embeddings import Connector, PositionEmbedding, TimestepEmbedder
from .mot import MoTForCausalLM, Route
from .vit import SiglipNavit

HEAD_NONE = "none"
HEAD_LOGITS = "logits"  # next-token logits of the LAST query token
HEAD_VELOCITY = "velocity"  # llm2vae on the latent tokens


@dataclass
class VitBlock:
    patches: torch.Tensor  # [N, p*p*C] normalised pixels
    position_ids: torch.Tensor  # [N] flattened ids row * 70 + col
    index: torch.Tensor  # [N] where the patch tokens sit in the query


@dataclass
class LatentBlock:
    tokens: torch.Tensor  # [N, 64] patchified latents (clean condition or noisy x_t)
    timestep: float  # 0 for clean condition latents
    position_ids: torch.Tensor  # [N] flattened ids row * 64 + col
    index: torch.Tensor  # [N] where the latent tokens sit in the query


@dataclass
class Query:
    """One packed query segment: text/marker tokens plus at most one ViT or latent block."""

    length: int
    text_ids: torch.Tensor  # [T] token ids
    text_index: torch.Tensor  # [T] their places in the query
    positions: int  # RoPE position ids it uses: text: one per token; an image block: one for all
    causal: bool
    vit: VitBlock | None = None
    latent: LatentBlock | None = None

    def position_ids(self, start: int) -> torch.Tensor:
        if self.positions == 1:
            return torch.full((self.length,), start, dtype=torch.long)
        return torch.arange(start, start + self.length, dtype=torch.long)


class Bagel(nn.Module):
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.cfg = cfg
        hidden = cfg.llm.hidden_size
        self.language_model = MoTForCausalLM(cfg.llm)
        self.vit_model = SiglipNavit(cfg.vit)
        self.connector = Connector(cfg.vit.hidden_size, hidden, CONNECTOR_ACT)
        self.vit_pos_embed = PositionEmbedding(cfg.vit_max_patches_per_side, hidden)
        self.time_embedder = TimestepEmbedder(hidden, TIMESTEP_FREQ_DIM)
        self.vae2llm = nn.Linear(cfg.patch_latent_dim, hidden)
        self.llm2vae = nn.Linear(hidden, cfg.patch_latent_dim)
        self.latent_pos_embed = PositionEmbedding(cfg.max_latent_size, hidden)

    @property
    def compute_dtype(self) -> torch.dtype:
        # Embeddings never rest in FP8 (skip list), so their dtype is the compute dtype.
        return self.language_model.model.embed_tokens.weight.dtype

    def embed_extra(self, query: Query, device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The non-text tokens of ``query`` embedded (ViT features or latents) and their places."""
        dtype = self.compute_dtype
        if query.vit is not None:
            vb = query.vit
            pos = vb.position_ids.to(device)
            feats = self.vit_model(vb.patches.to(device, dtype), pos, [vb.patches.shape[0]])
            return (self.connector(feats) + self.vit_pos_embed(pos)).to(dtype), vb.index.to(device)
        if query.latent is not None:
            lb = query.latent
            t = torch.full((1,), float(lb.timestep), device=device)
            x = self.vae2llm(lb.tokens.to(device, dtype)) + self.time_embedder(t, dtype) \
                + self.latent_pos_embed(lb.position_ids.to(device))
            return x.to(dtype), lb.index.to(device)
        return None, None

    def forward(self, query: Query, cache: KVCache, head: str = HEAD_NONE, update: bool = True,
                mask: torch.Tensor | None = None, device: torch.device | None = None
                ) -> tuple[torch.Tensor | None, KVCache]:
        """Run ``query`` after the context in ``cache``. Returns (head output, cache). With ``update`` the
        returned cache includes the query (a new context); otherwise it is ``cache`` unchanged.
        ``device``: where to compute (offloaded weights rest elsewhere); default: where the weights are.
        ``mask`` (bool [query, cache + query]) replaces the segment rule: used by tests to run a whole
        packed sequence at once with explicit masks."""
        device = device or self.vae2llm.weight.device
        extra, extra_index = self.embed_extra(query, device)
        route = None
        if query.latent is not None:  # latent tokens -> generation expert; markers -> understanding expert
            route = Route(query.text_index.to(device), query.latent.index.to(device))
        pos = query.position_ids(cache.next_position).to(device)
        hidden, keys, values, logits = self.language_model(
            query.text_ids.to(device), query.text_index.to(device), extra, extra_index, pos, route, cache,
            query.causal, None if mask is None else mask.to(device), logits=head == HEAD_LOGITS)
        new_cache = cache.extend(keys, values, 1 if query.positions == 1 else query.length) if update else cache
        if head == HEAD_LOGITS:
            return logits, new_cache
        if head == HEAD_VELOCITY:
            return self.llm2vae(hidden[query.latent.index.to(device)]).float(), new_cache
        return None, new_cache
