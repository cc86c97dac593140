"""BAGEL's Mixture-of-Transformers Qwen2 decoder (``language_model.*`` keys of ema.safetensors).

Every layer holds two full experts sharing one self-attention: the understanding expert (plain names:
text and ViT tokens) and the generation expert (``*_moe_gen``: VAE latent tokens). Tokens are routed by
index, never by a learned router. q/k RMSNorm over head_dim per expert, before RoPE.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .attention import KVCache, apply_rope, packed_attention, rope_cos_sin
from .activations import activation
from .config import LLMConfig


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in fp32, cast back to the input dtype, then scale."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward (gate/up/down, no bias)."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


@dataclass(frozen=True)
class Route:
    """Which query tokens go through which expert (indexes into the query segment)."""

    und: torch.Tensor
    gen: torch.Tensor


def routed(x: torch.Tensor, route: Route | None, und: Callable, gen: Callable) -> torch.Tensor:
    """Apply ``und`` to the understanding tokens and ``gen`` to the generation tokens."""
    if route is None:
        return und(x)
    a = und(x[route.und])
    b = gen(x[route.gen])
    out = torch.empty((x.shape[0],) + tuple(a.shape[1:]), dtype=torch.promote_types(a.dtype, b.dtype),
                      device=a.device)
    out[route.und] = a.to(out.dtype)
    out[route.gen] = b.to(out.dtype)
    return out


class MoTAttention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        h, d, nh, nkv = cfg.hidden_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        for suffix in ("", "_moe_gen"):
            setattr(self, f"q_proj{suffix}", nn.Linear(h, nh * d, bias=True))
            setattr(self, f"k_proj{suffix}", nn.Linear(h, nkv * d, bias=True))
            setattr(self, f"v_proj{suffix}", nn.Linear(h, nkv * d, bias=True))
            setattr(self, f"o_proj{suffix}", nn.Linear(nh * d, h, bias=False))
            setattr(self, f"q_norm{suffix}", RMSNorm(d, cfg.rms_norm_eps))
            setattr(self, f"k_norm{suffix}", RMSNorm(d, cfg.rms_norm_eps))

    def _project(self, x: torch.Tensor, route: Route | None, name: str, heads: int,
                 norm_dtype: torch.dtype | None) -> torch.Tensor:
        def und(t: torch.Tensor) -> torch.Tensor:
            return self._one(t, name, "", heads, norm_dtype)

        def gen(t: torch.Tensor) -> torch.Tensor:
            return self._one(t, name, "_moe_gen", heads, norm_dtype)

        return routed(x, route, und, gen)

    def _one(self, t: torch.Tensor, name: str, suffix: str, heads: int,
             norm_dtype: torch.dtype | None) -> torch.Tensor:
        out = getattr(self, f"{name}_proj{suffix}")(t).reshape(t.shape[0], heads, self.cfg.head_dim)
        if name == "v":
            return out
        if norm_dtype is not None:
            out = out.to(norm_dtype)
        return getattr(self, f"{name}_norm{suffix}")(out)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, route: Route | None,
                past: tuple[torch.Tensor | None, torch.Tensor | None], causal: bool,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # The reference normalises q/k (and applies RoPE) in fp32 in generation mode, in the compute dtype in
        # understanding mode; we do the same so bf16 runs round like the reference.
        norm_dtype = torch.float32 if route is not None else None
        q = self._project(x, route, "q", self.cfg.num_heads, norm_dtype)
        k = self._project(x, route, "k", self.cfg.num_kv_heads, norm_dtype)
        v = self._project(x, route, "v", self.cfg.num_kv_heads, None)
        q = apply_rope(q, cos.to(q.dtype), sin.to(q.dtype)).to(x.dtype)
        k = apply_rope(k, cos.to(k.dtype), sin.to(k.dtype)).to(x.dtype)
        v = v.to(x.dtype)
        past_k, past_v = past
        if past_k is not None:
            k = torch.cat([past_k, k], dim=0)
            v = torch.cat([past_v, v], dim=0)
        out = packed_attention(q, k, v, causal, mask)
        out = routed(out, route, self.o_proj, self.o_proj_moe_gen)
        return out, k, v


class MoTDecoderLayer(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.self_attn = MoTAttention(cfg)
        self.mlp = MLP(cfg)
        self.mlp_moe_gen = MLP(cfg)
        for suffix in ("", "_moe_gen"):
            setattr(self, f"input_layernorm{suffix}", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))
            setattr(self, f"post_attention_layernorm{suffix}", RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, route: Route | None,
                past: tuple[torch.Tensor | None, torch.Tensor | None], causal: bool,
                mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = routed(x, route, self.input_layernorm, self.input_layernorm_moe_gen)
        h, k, v = self.self_attn(h, cos, sin, route, past, causal, mask)
        x = x + h.to(x.dtype)
        h = routed(x, route, lambda t: self.mlp(self.post_attention_layernorm(t)),
                   lambda t: self.mlp_moe_gen(self.post_attention_layernorm_moe_gen(t)))
        return x + h.to(x.dtype), k, v


class MoTModel(nn.Module):
    """``language_model.model``: embeddings, layers, the two final norms."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(MoTDecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, text_ids: torch.Tensor, text_index: torch.Tensor | None, extra: torch.Tensor | None,
                extra_index: torch.Tensor | None, position_ids: torch.Tensor, route: Route | None, cache: KVCache,
                causal: bool, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, list, list]:
        """Run one packed query segment after ``cache``; returns (normed hidden, merged keys, values).

        The segment is the embedded ``text_ids`` at ``text_index`` plus already-embedded ``extra`` tokens
        (ViT features, latents) at ``extra_index`` (None: a text-only segment)."""
        x = self.embed_tokens(text_ids)
        if extra is not None:
            seq = x.new_zeros((x.shape[0] + extra.shape[0], x.shape[1]))
            seq[text_index] = x
            seq[extra_index] = extra.to(x.dtype)
            x = seq
        cos, sin = rope_cos_sin(position_ids, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        keys, values = [], []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, cos, sin, route, cache.layer(i), causal, mask)
            keys.append(k)
            values.append(v)
        return routed(x, route, self.norm, self.norm_moe_gen), keys, values


class MoTForCausalLM(nn.Module):
    """``language_model``: the decoder and its (untied) ``lm_head``."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.model = MoTModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def forward(self, *args, logits: bool = False, **kwargs) -> tuple[torch.Tensor, list, list, torch.Tensor | None]:
        """``model(*args)``, plus next-token logits of the last token when ``logits`` (lm_head is used
        only here, so offload hooks on this module see it)."""
        hidden, keys, values = self.model(*args, **kwargs)
        return hidden, keys, values, self.lm_head(hidden[-1:]).float() if logits else None
