"""BAGEL inference: packed queries, the three KV-cache contexts, the flow sampler, text decoding.

Follows the reference ``inferencer.py:interleave_inference`` and ``bagel.py`` (restated, not copied):
- gen context: [think system prompt] + every input in order (an image as a VAE block then a ViT block;
  understanding skips the VAE block), then the think text when think mode produced one;
- cfg_text context: ``gen`` as it was just before the last text input (images without instruction);
- cfg_img context: [think system prompt] + the text inputs only (the think text is NOT added, as in
  interleave_inference; the GEdit eval script differs).
Randomness: every draw comes from the CPU ``torch.Generator`` passed in (the sampler seeds it from the
node's seed): first the autoencoder posterior noise of each input image in order, then the initial noise.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from PIL import Image

from .attention import KVCache
from .autoencoder import AutoEncoder
from .embeddings import flattened_position_ids, patchify, unpatchify_latent
from .flow import branches, combine, timesteps
from .model import HEAD_LOGITS, HEAD_VELOCITY, Bagel, LatentBlock, Query, VitBlock
from .preprocess import VAE_RULE, VIT_RULE, ResizeRule, to_model_tensor

GEN_THINK_SYSTEM_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here "
    "</think> image here")
VLM_THINK_SYSTEM_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the "
    "answer. \nThe reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning "
    "process here </think> answer here")
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")


@dataclass(frozen=True)
class TokenIds:
    bos: int  # <|im_start|>
    eos: int  # <|im_end|>
    vision_start: int
    vision_end: int


@dataclass(frozen=True)
class FlowSettings:
    steps: int = 50  # num_timesteps (grid points; steps - 1 Euler updates)
    cfg_text: float = 4.0
    cfg_img: float = 1.5
    cfg_interval: tuple[float, float] = (0.4, 1.0)
    renorm: str = "global"
    renorm_min: float = 0.0
    shift: float = 3.0


@dataclass
class Contexts:
    gen: KVCache
    cfg_text: KVCache
    cfg_img: KVCache
    size: tuple[int, int]  # output (height, width)
    think: str = ""
    think_cut: bool = False
    images: list[tuple[int, int]] = field(default_factory=list)  # (h, w) each reference was resized to


def token_ids(tokenizer) -> TokenIds:
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    unk = getattr(tokenizer, "unk_token_id", None)
    missing = [t for t, i in zip(SPECIAL_TOKENS, ids) if i is None or i == unk]
    if missing:
        raise ValueError(f"tokenizer lacks {', '.join(missing)}")
    return TokenIds(*ids)


def _block(length: int, ids: TokenIds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Marker ids, marker places and block places of [<|vision_start|>, length tokens, <|vision_end|>]."""
    return (torch.tensor([ids.vision_start, ids.vision_end]), torch.tensor([0, length + 1]),
            torch.arange(1, length + 1))


class BagelEngine:
    """The weights plus the packing rules; one sample at a time (as the reference's inference)."""

    def __init__(self, model: Bagel, ae: AutoEncoder, tokenizer, vae_rule: ResizeRule = VAE_RULE,
                 vit_rule: ResizeRule = VIT_RULE, device: torch.device | None = None):
        self.model, self.ae, self.tokenizer = model, ae, tokenizer
        # Where to compute: offloaded weights rest on the CPU and are moved here by the placement hooks.
        self.device = device or torch.device("cpu")
        # Called before every model forward (the sampler checks Cancel there: within a step too).
        self.before_forward: Callable[[], None] | None = None
        self.cfg = model.cfg
        self.ids = token_ids(tokenizer)
        self.vae_rule, self.vit_rule = vae_rule, vit_rule

    def _forward(self, *args, **kwargs) -> tuple[torch.Tensor | None, KVCache]:
        if self.before_forward is not None:
            self.before_forward()
        return self.model(*args, **kwargs)

    def empty(self) -> KVCache:
        return KVCache.empty(self.cfg.llm.num_layers)

    # -- queries --------------------------------------------------------------------------------------
    def text_query(self, text: str) -> Query:
        tokens = [self.ids.bos] + self.tokenizer.encode(text, add_special_tokens=False) + [self.ids.eos]
        n = len(tokens)
        return Query(n, torch.tensor(tokens), torch.arange(n), n, causal=True)

    def vit_query(self, image: Image.Image) -> Query:
        pixels = to_model_tensor(self.vit_rule.resize(image))
        p, side = self.cfg.vit.patch_size, self.cfg.vit_max_patches_per_side
        patches = patchify(pixels, p)
        n = patches.shape[0]
        marks, marks_at, at = _block(n, self.ids)
        pos = flattened_position_ids(pixels.shape[1], pixels.shape[2], p, side)
        return Query(n + 2, marks, marks_at, 1, causal=False, vit=VitBlock(patches, pos, at))

    def latent_query(self, tokens: torch.Tensor, height: int, width: int, t: float) -> Query:
        n = tokens.shape[0]
        marks, marks_at, at = _block(n, self.ids)
        pos = flattened_position_ids(height, width, self.cfg.latent_downsample, self.cfg.max_latent_size)
        return Query(n + 2, marks, marks_at, 1, causal=False, latent=LatentBlock(tokens, t, pos, at))

    def encode_latent(self, image: Image.Image, generator: torch.Generator | None) -> torch.Tensor:
        """A VAE-sized RGB image -> patchified condition latent tokens [h*w, 64] (posterior sample)."""
        pixels = to_model_tensor(self.vae_rule.resize(image)).unsqueeze(0)
        dtype = next(self.ae.parameters()).dtype  # the autoencoder never rests in FP8 (fp8_exclude)
        latent = self.ae.encode(pixels.to(self.device, dtype), generator=generator)[0]
        return patchify(latent.float(), self.cfg.latent_patch_size)

    # -- context updates ------------------------------------------------------------------------------
    def add_text(self, cache: KVCache, text: str) -> KVCache:
        return self._forward(self.text_query(text), cache, device=self.device)[1]

    def add_image(self, cache: KVCache, image: Image.Image, generator: torch.Generator | None,
                  vae: bool = True) -> KVCache:
        """``image`` must already follow the VAE size rule (it is also the ViT input before its own rule)."""
        if vae:
            w, h = image.size
            query = self.latent_query(self.encode_latent(image, generator), h, w, 0.0)
            cache = self._forward(query, cache, device=self.device)[1]
        return self._forward(self.vit_query(image), cache, device=self.device)[1]

    # -- outputs --------------------------------------------------------------------------------------
    def velocity(self, cache: KVCache, x: torch.Tensor, height: int, width: int, t: float) -> torch.Tensor:
        query = self.latent_query(x, height, width, t)
        return self._forward(query, cache, HEAD_VELOCITY, update=False, device=self.device)[0]

    def generate_text(self, cache: KVCache, max_length: int, on_token: Callable[[int], None] | None = None,
                      temperature: float = 0.0, generator: torch.Generator | None = None) -> tuple[str, bool]:
        """Decode from ``<|im_start|>`` at the next position: greedy (temperature 0) or sampled. Runs at most
        ``max_length`` forward passes like the reference (whose last prediction is dropped). Returns
        (text up to ``<|im_end|>``, whether the limit cut it)."""
        token, out, cut = self.ids.bos, [], True
        for step in range(max_length):
            one = Query(1, torch.tensor([token]), torch.arange(1), 1, causal=True)
            logits, cache = self._forward(one, cache, HEAD_LOGITS, device=self.device)
            if temperature > 0:
                probs = torch.softmax(logits[0].cpu() / temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            else:
                token = int(logits[0].argmax())
            if on_token is not None:
                on_token(step)
            if token == self.ids.eos:
                cut = False
                break
            if step < max_length - 1:
                out.append(token)
        text = self.tokenizer.decode(out, skip_special_tokens=False)
        return text.split("<|im_end|>")[0].split("<|im_start|>")[0], cut

    def decode(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Latent tokens [h*w, 64] -> image [3, H, W] in 0..1 (float32, CPU)."""
        d = self.cfg.latent_downsample
        latent = unpatchify_latent(x, height // d, width // d, self.cfg.latent_patch_size, self.cfg.ae.z_channels)
        dtype = next(self.ae.parameters()).dtype
        image = self.ae.decode(latent.unsqueeze(0).to(self.device, dtype))[0].float().cpu()
        return (image * 0.5 + 0.5).clamp(0, 1)

    # -- the reference's interleave_inference ---------------------------------------------------------
    def build_contexts(self, inputs: Sequence[str | Image.Image], generator: torch.Generator | None,
                       size: tuple[int, int], think: bool = False, understanding: bool = False) -> Contexts:
        """The three contexts for ``inputs`` (images RGB, any size: resized by the VAE rule here)."""
        gen = self.empty()
        cfg_text = gen
        cfg_img = gen
        if think:
            prompt = VLM_THINK_SYSTEM_PROMPT if understanding else GEN_THINK_SYSTEM_PROMPT
            gen = self.add_text(gen, prompt)
            cfg_img = self.add_text(cfg_img, prompt)
        sizes = []
        for item in inputs:
            if isinstance(item, str):
                cfg_text = gen  # snapshot: immutable caches share tensors, no copy
                gen = self.add_text(gen, item)
                cfg_img = self.add_text(cfg_img, item)
            else:
                image = self.vae_rule.resize(item)
                gen = self.add_image(gen, image, generator, vae=not understanding)
                size = (image.size[1], image.size[0])
                sizes.append(size)
                cfg_text = gen
        return Contexts(gen, cfg_text, cfg_img, size, images=sizes)

    def think(self, ctx: Contexts, max_length: int, on_token: Callable[[int], None] | None = None,
              temperature: float = 0.0, generator: torch.Generator | None = None) -> Contexts:
        """Decode the planning text and append it to the gen context (generation think mode)."""
        text, cut = self.generate_text(ctx.gen, max_length, on_token, temperature, generator)
        return Contexts(self.add_text(ctx.gen, text), ctx.cfg_text, ctx.cfg_img, ctx.size, text, cut, ctx.images)

    def generate_image(self, ctx: Contexts, noise: torch.Tensor, flow: FlowSettings,
                       on_step: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Euler flow from ``noise`` [h*w, 64] to latent tokens, with text/image CFG inside cfg_interval.
        ``on_step(i, x0_estimate)`` after every step."""
        height, width = ctx.size
        grid = timesteps(flow.steps, flow.shift)
        x = noise.float()
        for i in range(flow.steps - 1):
            t = float(grid[i])
            use_text, use_img = branches(flow.cfg_text, flow.cfg_img, t, flow.cfg_interval)
            v = self.velocity(ctx.gen, x, height, width, t)
            v_text = self.velocity(ctx.cfg_text, x, height, width, t) if use_text else None
            v_img = self.velocity(ctx.cfg_img, x, height, width, t) if use_img else None
            v = combine(v, v_text, v_img, flow.cfg_text, flow.cfg_img, flow.renorm, flow.renorm_min)
            x = x - v.to(x.device) * float(grid[i] - grid[i + 1])
            if on_step is not None:
                on_step(i, x - float(grid[i + 1]) * v)  # x0 estimate (x_t = (1 - t) x0 + t noise, v = noise - x0)
        return x
