"""The VLM pass of DeepGen: prompts (+ reference ViT features) + meta queries -> DiT conditioning.

Reuses transformers' Qwen2.5-VL (vision tower, mRoPE index, text model); what is DeepGen's own:
image-pad embeddings replaced by ViT features, 128 meta queries appended with text-style positions,
all tokens (left padding included) stacked from six hidden states through the bridge.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

from .bridge import DeepGenBridge, stack_hidden_states
from .prompts import IMAGE_PAD, edit_texts, merged_tokens, t2i_texts, vit_patches


@dataclass
class Conditioning:
    """DiT inputs for a batch of [prompts..., negatives...] (the official order)."""

    pooled: torch.Tensor  # [2B, pooled_dim]
    sequence: torch.Tensor  # [2B, N, joint_dim]

    def halves(self) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """((prompt_seq, prompt_pooled), (negative_seq, negative_pooled))."""
        b = self.pooled.shape[0] // 2
        return (self.sequence[:b], self.pooled[:b]), (self.sequence[b:], self.pooled[b:])


def vision_features(vlm: Any, references: Sequence[torch.Tensor],
                    device: torch.device | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Merged ViT tokens per reference ([-1, 1] pixels [3, H, W], sides multiples of 32) and grid_thw."""
    vcfg = vlm.config.vision_config
    visual = vlm.model.visual
    dtype = compute_dtype(visual)
    embeds, grids = [], []
    for pixels in references:  # one call per image, as the official code (results do not depend on batching)
        rows, grid = vit_patches(pixels, vcfg.patch_size, vcfg.spatial_merge_size, vcfg.temporal_patch_size)
        thw = torch.tensor([grid], dtype=torch.long, device=device)
        out = visual(rows.to(device=device, dtype=dtype), grid_thw=thw)
        # transformers 5 returns BaseModelOutputWithPooling (merged tokens in pooler_output); 4.x a tensor.
        merged = out.pooler_output if hasattr(out, "pooler_output") else out
        if merged.shape[0] != merged_tokens(grid, vcfg.spatial_merge_size):
            raise RuntimeError(f"vision tower returned {merged.shape[0]} tokens for grid {grid}")
        embeds.append(merged)
        grids.append(grid)
    return embeds, torch.tensor(grids, dtype=torch.long)


def compute_dtype(module: torch.nn.Module) -> torch.dtype:
    """The dtype a module computes in (diffusers' layerwise casting stores weights in another one)."""
    for m in module.modules():
        registry = getattr(m, "_diffusers_hook", None)
        hook = registry.get_hook("layerwise_casting") if registry is not None else None
        if hook is not None:
            return hook.compute_dtype
    return next(module.parameters()).dtype


@contextlib.contextmanager
def zero_attention_at_padding(layers: Sequence[torch.nn.Module], valid: torch.Tensor) -> Iterator[None]:
    """Padding tokens get a zero attention output in every decoder layer, as flash-attention's unpadded
    path gives them in the official code.

    Why it matters: padding tokens are NOT masked out of the bridge (the connector attends to them and the
    pooled vector averages over them), so their hidden states must be what the reference computes. With
    SDPA a fully masked padding row would otherwise attend to something (or give NaN).
    """
    keep = valid[:, :, None]

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> Any:
        attn = output[0] if isinstance(output, tuple) else output
        attn = torch.where(keep.to(attn.device), attn, torch.zeros((), dtype=attn.dtype, device=attn.device))
        return (attn,) + tuple(output[1:]) if isinstance(output, tuple) else attn

    handles = [layer.self_attn.register_forward_hook(hook) for layer in layers]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def encode(vlm: Any, tokenizer: Any, bridge: DeepGenBridge, prompts: Sequence[str], negatives: Sequence[str],
           references: Sequence[torch.Tensor] = (), device: torch.device | None = None) -> Conditioning:
    """Conditioning for ``prompts`` and ``negatives`` (same count), optionally with reference images.

    Every prompt and negative sees all references (one multi-reference edit); the ViT features are
    computed once and shared by both halves.
    """
    if len(prompts) != len(negatives):
        raise ValueError(f"{len(prompts)} prompts but {len(negatives)} negatives")
    device = device or torch.device("cpu")
    text_model = vlm.model.language_model
    embed = text_model.get_input_embeddings()
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    everything = list(prompts) + list(negatives)
    image_embeds, grid = None, None
    if references:
        per_ref, grid = vision_features(vlm, references, device)
        texts = edit_texts(everything, [len(e) for e in per_ref])
        image_embeds = torch.cat(per_ref * len(everything))
        grid = torch.cat([grid] * len(everything))  # CPU: get_rope_index runs on the CPU token ids
    else:
        texts = t2i_texts(everything)
    tok = tokenizer(texts, add_special_tokens=True, return_tensors="pt", padding=True, padding_side="left")
    ids, mask = tok.input_ids, tok.attention_mask
    b, q = ids.shape[0], bridge.config.num_queries
    full_ids = torch.cat([ids, ids.new_zeros(b, q)], dim=1)  # query slots: text-type positions after the prompt
    full_mask = torch.cat([mask, mask.new_ones(b, q)], dim=1)
    token_types = (full_ids == image_token).int()
    positions, _ = vlm.model.get_rope_index(full_ids, token_types, image_grid_thw=grid, attention_mask=full_mask)
    dtype = compute_dtype(text_model)
    embeds = embed(ids.to(_embed_device(embed, device))).to(device=device, dtype=dtype)
    if image_embeds is not None:
        slots = ids.to(device) == image_token
        if int(slots.sum()) != image_embeds.shape[0]:
            raise RuntimeError(f"{int(slots.sum())} image-pad tokens for {image_embeds.shape[0]} ViT tokens")
        embeds[slots] = image_embeds.to(device=device, dtype=dtype)
    queries = bridge.queries(b).to(device=device, dtype=dtype)
    inputs = torch.cat([embeds, queries], dim=1)
    valid = full_mask.bool().to(device)
    with zero_attention_at_padding(text_model.layers, valid):
        out = text_model(inputs_embeds=inputs, attention_mask=full_mask.to(device), position_ids=positions.to(device),
                         output_hidden_states=True, use_cache=False, return_dict=True)
    stacked = stack_hidden_states(out.hidden_states, bridge.config.num_stacked)
    pooled, sequence = bridge(stacked.to(compute_dtype(bridge)))
    return Conditioning(pooled, sequence)


def _embed_device(embed: torch.nn.Module, fallback: torch.device) -> torch.device:
    weight = getattr(embed, "weight", None)
    return weight.device if weight is not None and weight.device.type != "meta" else fallback
