"""What Comfy-Org's Qwen-Image 2.1 files are, from their headers, and how their keys map to diffusers / transformers.

Comfy-Org/Qwen-Image-2.1 ships ``diffusion_models/qwen_image_2.1_*.safetensors`` (diffusers' parameter names, each
block's ``img_mlp`` gate and up projections fused into one ``img_mlp.gate_up`` matrix, gate rows first — the
layout diffusers' ``convert_qwen_image21_transformer_checkpoint_to_diffusers`` undoes), ``text_encoders/
qwen3vl_8b_*.safetensors`` (Qwen3-VL-8B: ``model.embed_tokens`` / ``model.layers.N`` / ``model.norm`` for the
language model, ``model.visual.*``, ``lm_head``) and ``vae/qwen_image_2.1_vae_bf16.safetensors`` (ComfyUI's own
Wan-2.2 VAE layout, 64 latent channels, RGBA, 16x; its causal convolutions carry a time kernel of 1). GGUF
transformers (``general.architecture = qwen_image21``) keep the transformer file's names.

Configs: diffusers' class defaults (the released values) with the sizes the shapes show, and the JSON in
``configs/qwen_image/`` (Qwen3-VL-8B, its image processor, ComfyUI's sampling shift).
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable

from .comfy_files import FileHeader
from .comfy_qwen import CONFIG_DIR, TRANSFORMER_HEAD_DIM, vae21_layout

TEXT_CONFIG_FILE = CONFIG_DIR / "qwen3_vl_8b_config.json"
PROCESSOR_CONFIG_FILE = CONFIG_DIR / "preprocessor21_config.json"
SCHEDULER_CONFIG_FILE = CONFIG_DIR / "scheduler21_config.json"
TEXT_HEAD_DIM = 128  # Qwen3-VL-8B: head_dim 128 (32 heads of a 4096 width; not visible in any shape)
VISION_HEAD_DIM = 72  # Qwen3-VL's vision tower: 1152 / 16 heads
# The fused SwiGLU matrix of ComfyUI's file -> diffusers' two layers (gate rows first).
GATE_UP = "img_mlp.gate_up."
SPLIT_INTO = ("img_mlp.gate_layer.", "img_mlp.proj.")
ENCODER_RES_BLOCKS_KEY = "encoder.downsamples.0.downsamples."


# ----------------------------------------------------------------------------- transformer
def transformer_config(h: FileHeader) -> dict:
    """diffusers' QwenImage21Transformer2DModel config: sizes from shapes, the rest the class defaults."""
    inner, in_channels = h.shapes["img_in.weight"]
    fused = h.shapes.get(f"transformer_blocks.0.{GATE_UP}weight")
    hidden = fused[0] // 2 if fused else h.shapes[f"transformer_blocks.0.{SPLIT_INTO[0]}weight"][0]
    return {"num_layers": h.count("transformer_blocks."), "num_attention_heads": inner // TRANSFORMER_HEAD_DIM,
            "attention_head_dim": TRANSFORMER_HEAD_DIM, "context_in_dim": h.shapes["txt_in.in_layer.weight"][1],
            "in_channels": in_channels, "out_channels": h.shapes["proj_out.weight"][0], "mlp_ratio": hidden // inner}


def split_fused(key: str) -> tuple[str, ...] | None:
    """The two diffusers keys a fused ``img_mlp.gate_up`` tensor (weight or its scale) holds, else None."""
    if GATE_UP not in key:
        return None
    return tuple(key.replace(GATE_UP, part) for part in SPLIT_INTO)


# ----------------------------------------------------------------------------- text encoder (Qwen3-VL)
_TEXT_PARTS = re.compile(r"^model\.(embed_tokens|layers|norm)\.")


def text_rename(prefix: str) -> Callable[[str], str]:
    """Comfy Qwen3-VL key -> transformers-5 key: the language model moves under ``model.language_model``,
    a bare ``visual.`` under ``model.visual`` (files already in the transformers-5 layout pass unchanged)."""
    def rename(key: str) -> str:
        name = key[len(prefix):] if prefix and key.startswith(prefix) else key
        name = _TEXT_PARTS.sub(r"model.language_model.\1.", name)
        return "model." + name if name.startswith("visual.") else name
    return rename


def _text_key(h: FileHeader, suffix: str) -> str:
    for prefix in ("model.language_model.", "model."):
        if prefix + suffix in h.shapes:
            return prefix + suffix
    raise KeyError(suffix)


def _vision_prefix(h: FileHeader) -> str:
    return "model.visual." if any(k.startswith("model.visual.") for k in h.shapes) else "visual."


def text_hidden(h: FileHeader) -> int:
    return h.shapes[_text_key(h, "embed_tokens.weight")][1]


def text_config(h: FileHeader):
    """transformers' Qwen3VLConfig: Qwen3-VL-8B's values, sizes from the file's shapes."""
    from transformers import Qwen3VLConfig  # noqa: PLC0415

    data = json.loads(TEXT_CONFIG_FILE.read_text(encoding="utf-8"))
    data.pop("_comment", None)
    vocab, hidden = h.shapes[_text_key(h, "embed_tokens.weight")]
    layers = _text_key(h, "layers.0.input_layernorm.weight")[: -len("0.input_layernorm.weight")]
    vis = _vision_prefix(h)
    vision_hidden = h.shapes[f"{vis}blocks.0.norm1.weight"][0]
    tie = "lm_head.weight" not in h.shapes
    data["text_config"].update(
        vocab_size=vocab, hidden_size=hidden, num_hidden_layers=h.count(layers),
        intermediate_size=h.shapes[f"{layers}0.mlp.gate_proj.weight"][0],
        num_attention_heads=h.shapes[f"{layers}0.self_attn.q_proj.weight"][0] // TEXT_HEAD_DIM,
        num_key_value_heads=h.shapes[f"{layers}0.self_attn.k_proj.weight"][0] // TEXT_HEAD_DIM,
        tie_word_embeddings=tie)
    data["vision_config"].update(
        depth=h.count(f"{vis}blocks."), hidden_size=vision_hidden, num_heads=vision_hidden // VISION_HEAD_DIM,
        intermediate_size=h.shapes[f"{vis}blocks.0.mlp.linear_fc1.weight"][0],
        out_hidden_size=h.shapes[f"{vis}merger.linear_fc2.weight"][0],
        num_position_embeddings=h.shapes[f"{vis}pos_embed.weight"][0])
    # ComfyUI only encodes with this model and a file may leave lm_head out: tie it then (encoding never uses it;
    # the prompt enhancer refuses such a file for text generation).
    data["tie_word_embeddings"] = tie
    return Qwen3VLConfig(**data)


# ----------------------------------------------------------------------------- VAE
def vae_config(h: FileHeader) -> dict:
    """diffusers' AutoencoderKLQwenImage21 config: widths from shapes, the rest (channel multipliers, temporal
    downsampling, latent statistics) the class defaults, the released values."""
    if vae21_layout(h) == "diffusers":
        conv_in, head, z = "encoder.conv_in.weight", "decoder.conv_out.weight", "post_quant_conv.weight"
        res_blocks = h.count("encoder.down_blocks.0.resnets.")
    else:
        conv_in, head, z = "encoder.conv1.weight", "decoder.head.2.weight", "conv2.weight"
        res_blocks = h.count(ENCODER_RES_BLOCKS_KEY) - 1  # the last entry of a down level is its downsampler
    return {"base_dim": h.shapes[conv_in][0], "decoder_base_dim": h.shapes[head][1], "z_dim": h.shapes[z][0],
            "num_res_blocks": res_blocks}


_RES_PARTS = {"residual.0.": "norm1.", "residual.2.": "conv1.", "residual.3.": "norm2.", "residual.6.": "conv2.",
              "shortcut.": "conv_shortcut."}
_TOP = {"conv1.": "quant_conv.", "conv2.": "post_quant_conv."}
_HEAD = {"conv1.": "conv_in.", "head.0.": "norm_out.", "head.2.": "conv_out."}
_NATIVE_BLOCK = re.compile(r"^(encoder|decoder)\.(down|up)samples\.(\d+)\.(?:down|up)samples\.(\d+)\.(.*)$")
_NATIVE_MIDDLE = re.compile(r"^(encoder|decoder)\.middle\.(\d)\.(.*)$")
_MIDDLE = {"0": "resnets.0.", "1": "attentions.0.", "2": "resnets.1."}


def _res_part(tail: str) -> str:
    for native, name in _RES_PARTS.items():
        if tail.startswith(native):
            return name + tail[len(native):]
    return tail


def vae_rename(h: FileHeader) -> Callable[[str], str]:
    """Native (ComfyUI) Wan-2.2 VAE key -> AutoencoderKLQwenImage21 key; a diffusers-layout file passes unchanged.

    Native numbering: down level I holds ``num_res_blocks`` res blocks then its downsampler (entry
    ``num_res_blocks``); up level I holds ``num_res_blocks + 1`` res blocks then its upsampler."""
    prefix = h.prefix
    if vae21_layout(h) == "diffusers":
        return lambda key: key[len(prefix):] if key.startswith(prefix) else key
    res_blocks = vae_config(h)["num_res_blocks"]

    def rename(key: str) -> str:
        name = key[len(prefix):] if key.startswith(prefix) else key
        side, _, rest = name.partition(".")
        if side in ("conv1", "conv2"):
            return _TOP[side + "."] + rest
        for native, new in _HEAD.items():
            if rest.startswith(native):
                return f"{side}.{new}{rest[len(native):]}"
        m = _NATIVE_MIDDLE.match(name)
        if m:
            mid = _MIDDLE[m.group(2)]
            return f"{m.group(1)}.mid_block.{mid}{_res_part(m.group(3)) if mid.startswith('resnets') else m.group(3)}"
        m = _NATIVE_BLOCK.match(name)
        if m:
            side, direction, level, entry, tail = m.groups()
            blocks = res_blocks if direction == "down" else res_blocks + 1
            if int(entry) == blocks:
                return f"{side}.{direction}_blocks.{level}.{direction}sampler.{tail}"
            return f"{side}.{direction}_blocks.{level}.resnets.{entry}.{_res_part(tail)}"
        return name
    return rename
