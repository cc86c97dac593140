"""DeepGen's "dynamic" SD3 transformer: diffusers' SD3 weights, a forward that takes reference latents.

The module IS diffusers' ``SD3Transformer2DModel`` (same config, blocks and state-dict keys, so the
UniPic2 / SD3.5-Medium folder and the checkpoint's ``transformer.*`` keys load as they are); only the
forward differs, as in the official model:

- every target latent is patch-embedded with the standard SD3 ``PatchEmbed`` (centre-cropped sincos
  table); each reference latent of the same sample is patch-embedded the SAME way (same positions, no
  offset) and appended after the target tokens in the image stream;
- samples of different token counts are right-padded; a boolean mask hides the padding from real
  tokens (a padding token only sees itself, the official "diagonal kept valid" rule);
- only the first h*w output tokens (the target) are unpatchified.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0

Latents = torch.Tensor | Sequence[torch.Tensor]
References = Sequence[Sequence[torch.Tensor]] | None


class MaskedJointAttnProcessor(JointAttnProcessor2_0):
    """diffusers' SD3 joint attention plus an optional padding mask over the image tokens.

    ``attention_mask`` is [B, N_img] bool (True = real token); text tokens are always real. Without a
    mask this is diffusers' processor unchanged.
    """

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor:
        if attention_mask is None:
            return super().__call__(attn, hidden_states, encoder_hidden_states)
        b, n_img, _ = hidden_states.shape
        heads = attn.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        valid = attention_mask
        if encoder_hidden_states is not None:
            cq = split(attn.add_q_proj(encoder_hidden_states))
            ck = split(attn.add_k_proj(encoder_hidden_states))
            cv = split(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                cq = attn.norm_added_q(cq)
            if attn.norm_added_k is not None:
                ck = attn.norm_added_k(ck)
            q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
            valid = torch.cat([valid, valid.new_ones(b, encoder_hidden_states.shape[1])], dim=1)
        pair = valid[:, None, :] & valid[:, :, None]
        pair = pair | torch.eye(pair.shape[-1], dtype=torch.bool, device=pair.device)  # padding sees itself
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=pair[:, None])
        out = out.transpose(1, 2).reshape(b, -1, heads * q.shape[-1]).to(q.dtype)
        context = None
        if encoder_hidden_states is not None:
            out, context = out[:, :n_img], out[:, n_img:]
            if not attn.context_pre_only:
                context = attn.to_add_out(context)
        out = attn.to_out[1](attn.to_out[0](out))
        return out if context is None else (out, context)


class DeepGenTransformer(SD3Transformer2DModel):
    """``SD3Transformer2DModel`` with DeepGen's reference-latent forward (see the module docstring)."""

    # No __init__ of its own: diffusers reads the config arguments from SD3Transformer2DModel's signature.

    def use_masked_attention(self) -> None:
        """Install the mask-aware processor once (padded batches need it; unpadded ones run unchanged)."""
        if not isinstance(self.transformer_blocks[0].attn.processor, MaskedJointAttnProcessor):
            self.set_attn_processor(MaskedJointAttnProcessor())

    def forward(self, hidden_states: Latents, encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor,
                timestep: torch.Tensor, cond_hidden_states: References = None,
                return_dict: bool = False) -> tuple[torch.Tensor | list[torch.Tensor]]:
        """Velocity for each target latent; ``cond_hidden_states[i]`` are sample i's reference latents.

        Returns ``(out,)``: a [B,C,H,W] tensor when all targets share a size, else a list.
        """
        targets = list(hidden_states)
        refs = [list(r) for r in cond_hidden_states] if cond_hidden_states is not None else [[] for _ in targets]
        if len(refs) != len(targets):
            raise ValueError(f"{len(refs)} reference lists for {len(targets)} samples")
        sizes = [tuple(t.shape[-2:]) for t in targets]
        tokens, mask = self._embed(targets, refs)
        temb = self.time_text_embed(timestep, pooled_projections)
        context = self.context_embedder(encoder_hidden_states)
        kwargs = None
        if mask is not None:
            self.use_masked_attention()
            kwargs = {"attention_mask": mask}
        for block in self.transformer_blocks:
            context, tokens = block(hidden_states=tokens, encoder_hidden_states=context, temb=temb,
                                    joint_attention_kwargs=kwargs)
        tokens = self.proj_out(self.norm_out(tokens, temb))
        out = [self._unpatchify(tokens[i], h, w) for i, (h, w) in enumerate(sizes)]
        if len(set(sizes)) == 1:
            return (torch.stack(out),)
        return (out,)

    def _embed(self, targets: list[torch.Tensor], refs: list[list[torch.Tensor]]
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Image-stream tokens [B, N, D] and a padding mask (None when no sample is padded)."""
        layout = {(tuple(t.shape), tuple(tuple(r.shape) for r in rs)) for t, rs in zip(targets, refs)}
        if len(layout) == 1:
            # Every sample has the same shapes: embed the batch at once (same result, one call per image).
            parts = [self.pos_embed(torch.stack(targets))]
            parts += [self.pos_embed(torch.stack([rs[j] for rs in refs])) for j in range(len(refs[0]))]
            return torch.cat(parts, dim=1).contiguous(), None
        per_sample = []
        for target, rs in zip(targets, refs):
            parts = [self.pos_embed(target[None])[0]] + [self.pos_embed(r[None])[0] for r in rs]
            per_sample.append(torch.cat(parts))
        longest = max(len(t) for t in per_sample)
        tokens = per_sample[0].new_zeros(len(per_sample), longest, per_sample[0].shape[-1])
        mask = torch.zeros(len(per_sample), longest, dtype=torch.bool, device=tokens.device)
        for i, t in enumerate(per_sample):
            tokens[i, :len(t)] = t
            mask[i, :len(t)] = True
        return tokens, mask

    def _unpatchify(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        p = self.config.patch_size
        h, w = height // p, width // p
        x = tokens[: h * w].reshape(h, w, p, p, self.out_channels)
        return torch.einsum("hwpqc->chpwq", x).reshape(self.out_channels, h * p, w * p)

