"""What a Comfy-format Qwen-Image file is, from its header: transformer, text encoder or VAE, and their sizes.

Kinds and sizes come from tensor names and shapes (ComfyUI's own rule: ``txt_norm.weight`` + ``img_in.weight``
is a Qwen-Image transformer; blocks are counted), never from file names. A Comfy file carries no config: what
its shapes show (layer counts, widths) is read from them, everything else is the released model's value
(diffusers' class defaults, the JSON configs in ``loaders/configs/qwen_image/``).
"""
from __future__ import annotations

import json
from pathlib import Path

from .comfy_files import INDEX_TIMESTEP_ZERO, FileHeader

CONFIG_DIR = Path(__file__).parent / "configs" / "qwen_image"
TRANSFORMER_HEAD_DIM = 128  # Qwen-Image's attention head size (not visible in any shape)
TEXT_HEAD_DIM = 128  # Qwen2.5-VL-7B: 3584 / 28 heads; the mrope sections (16, 24, 24) cover half of it
VISION_HEAD_DIM = 80  # Qwen2.5-VL's vision tower: 1280 / 16 heads
LATENT_PATCH = 4  # 2x2 latent patches: in_channels = 4 * VAE latent channels
# Telltale keys (after the common prefix): ComfyUI's detection for 1.x; diffusers' for 2.1.
QWEN_IMAGE_KEYS = ("txt_norm.weight", "img_in.weight")
QWEN_IMAGE21_KEYS = ("txt_in.text_norm.weight",)
LAYERED_KEY = "time_text_embed.addition_t_embedding.weight"
# Text-encoder layouts: transformers 4 (ComfyUI's files) and transformers 5.
TEXT_LAYER_PREFIXES = ("model.layers.", "model.language_model.layers.")
VISION_PREFIXES = ("visual.", "model.visual.")
WAN_VAE_KEYS = ("encoder.conv1.weight", "decoder.conv1.weight", "conv2.weight")
DIFFUSERS_VAE_KEYS = ("encoder.conv_in.weight", "decoder.conv_in.weight", "post_quant_conv.weight")
QWEN_IMAGE_LATENT_CHANNELS = 16
RGB = 3
# Qwen-Image 2.1's VAE (64 latent channels, RGBA): ComfyUI's Wan-2.2 layout, or diffusers' AutoencoderKLQwenImage21.
VAE21_KEYS = {"native": ("decoder.upsamples.0.upsamples.0.residual.2.weight", "encoder.conv1.weight", "conv2.weight"),
              "diffusers": ("decoder.up_blocks.0.resnets.0.conv1.weight", "encoder.conv_in.weight",
                            "post_quant_conv.weight")}
QWEN_IMAGE21_LATENT_CHANNELS = 64
RGBA = 4


def describe(h: FileHeader) -> str:
    """What a file looks like, for messages ("a Qwen2.5-VL text encoder", "a Flux transformer", ...)."""
    kind = transformer_kind(h) or text_kind(h) or vae_kind(h)
    if kind:
        return {"qwen_image": "a Qwen-Image transformer", "qwen_image21": "a Qwen-Image 2.1 transformer",
                "qwen_image_layered": "a Qwen-Image-Layered transformer", "qwen2_5_vl": "a Qwen2.5-VL text encoder",
                "qwen3": "a Qwen3 text encoder", "qwen3_vl": "a Qwen3-VL text encoder", "t5": "a T5 text encoder",
                "clip": "a CLIP text encoder", "llm": "another language model",
                "qwen_image_vae": "a Qwen-Image / Wan-2.1 VAE", "qwen_image21_vae": "a Qwen-Image 2.1 VAE",
                "vae_other": "another VAE"}.get(kind, kind)
    arch = h.metadata.get("general.architecture")
    if arch:
        return f"a GGUF file of architecture {arch!r}"
    for key, what in (("double_blocks.0.img_attn.qkv.weight", "a Flux transformer"),
                      ("joint_blocks.0.x_block.attn.qkv.weight", "an SD3 transformer"),
                      ("blocks.0.cross_attn.q.weight", "a Wan transformer"),
                      ("input_blocks.0.0.weight", "an SD/SDXL UNet")):
        if key in h.shapes:
            return what
    return f"an unknown model ({len(h.shapes)} tensors, e.g. {', '.join(sorted(h.shapes)[:3])})"


# ----------------------------------------------------------------------------- transformer
def transformer_kind(h: FileHeader) -> str | None:
    if h.has(*QWEN_IMAGE21_KEYS):
        return "qwen_image21"
    if h.has(*QWEN_IMAGE_KEYS):
        return "qwen_image_layered" if LAYERED_KEY in h.shapes else "qwen_image"
    return None


def is_qwen_transformer(path: Path) -> bool:
    from .comfy_files import read_header  # noqa: PLC0415

    return transformer_kind(read_header(path, "Qwen-Image", "diffusion_model")) in ("qwen_image", "qwen_image21")


def transformer_config(h: FileHeader, zero_cond_t: bool) -> dict:
    """diffusers' QwenImageTransformer2DModel config: sizes from shapes, the rest the class defaults (released)."""
    inner, in_channels = h.shapes["img_in.weight"]
    return {"num_layers": h.count("transformer_blocks."), "num_attention_heads": inner // TRANSFORMER_HEAD_DIM,
            "attention_head_dim": TRANSFORMER_HEAD_DIM, "joint_attention_dim": h.shapes["txt_in.weight"][1],
            "in_channels": in_channels, "out_channels": h.shapes["proj_out.weight"][0] // LATENT_PATCH,
            "zero_cond_t": zero_cond_t}


def has_2511_marker(h: FileHeader) -> bool:
    """ComfyUI's Edit-2511 files carry a ``__index_timestep_zero__`` marker tensor (its model_detection rule)."""
    return INDEX_TIMESTEP_ZERO in h.shapes


# ----------------------------------------------------------------------------- text encoder
def _text_prefix(h: FileHeader) -> str | None:
    return next((p for p in TEXT_LAYER_PREFIXES if any(k.startswith(p) for k in h.shapes)), None)


def text_kind(h: FileHeader) -> str | None:
    if any(k.startswith("encoder.block.") for k in h.shapes) or "shared.weight" in h.shapes:
        return "t5"
    if any(k.startswith("text_model.encoder.") for k in h.shapes):
        return "clip"
    prefix = _text_prefix(h)
    if prefix is None:
        return None
    vision = any(k.startswith(VISION_PREFIXES) for k in h.shapes)
    if f"{prefix}0.self_attn.q_norm.weight" in h.shapes:
        return "qwen3_vl" if vision else "qwen3"
    if f"{prefix}0.self_attn.q_proj.bias" in h.shapes and vision:
        return "qwen2_5_vl"
    return "llm"


def is_qwen25vl(path: Path) -> bool:
    from .comfy_files import read_header  # noqa: PLC0415

    return text_kind(read_header(path, "Qwen-Image", "text_encoder")) == "qwen2_5_vl"


def is_qwen_text_encoder(path: Path) -> bool:
    """Qwen-Image 1.x's Qwen2.5-VL or 2.1's Qwen3-VL (the trio check tells which transformer it fits)."""
    from .comfy_files import read_header  # noqa: PLC0415

    return text_kind(read_header(path, "Qwen-Image", "text_encoder")) in ("qwen2_5_vl", "qwen3_vl")


def _embed(h: FileHeader) -> tuple[int, int]:
    key = next(k for k in h.shapes if k.endswith("embed_tokens.weight"))
    return h.shapes[key]


def text_hidden(h: FileHeader) -> int:
    return _embed(h)[1]


def text_config(h: FileHeader):
    """transformers' Qwen2_5_VLConfig: the released 7B values, sizes from the file's shapes."""
    from transformers import Qwen2_5_VLConfig  # noqa: PLC0415

    data = json.loads((CONFIG_DIR / "text_encoder_config.json").read_text(encoding="utf-8"))
    data.pop("_comment", None)
    prefix = _text_prefix(h)
    vocab, hidden = _embed(h)
    vis = next(p for p in VISION_PREFIXES if any(k.startswith(p) for k in h.shapes))
    vision_hidden = h.shapes[f"{vis}blocks.0.norm1.weight"][0]
    data.update(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=h.count(prefix),
                intermediate_size=h.shapes[f"{prefix}0.mlp.gate_proj.weight"][0],
                num_attention_heads=hidden // TEXT_HEAD_DIM,
                num_key_value_heads=h.shapes[f"{prefix}0.self_attn.k_proj.weight"][0] // TEXT_HEAD_DIM,
                max_window_layers=h.count(prefix))
    data["vision_config"].update(depth=h.count(f"{vis}blocks."), hidden_size=vision_hidden,
                                 intermediate_size=h.shapes[f"{vis}blocks.0.mlp.gate_proj.weight"][0],
                                 num_heads=vision_hidden // VISION_HEAD_DIM,
                                 out_hidden_size=h.shapes[f"{vis}merger.mlp.2.weight"][0])
    tie = not any(k.endswith("lm_head.weight") for k in h.shapes)
    # ComfyUI only encodes with this model and its files may leave lm_head out: tie it to the embeddings then
    # (encoding never uses it; text generation would be wrong, so the prompt enhancer refuses such a file).
    data["tie_word_embeddings"] = tie
    config = Qwen2_5_VLConfig.from_dict(data)
    config.text_config.tie_word_embeddings = tie
    return config


def has_lm_head(h: FileHeader) -> bool:
    return any(k.endswith("lm_head.weight") for k in h.shapes)


# ----------------------------------------------------------------------------- VAE
def vae21_layout(h: FileHeader) -> str | None:
    """``native`` (ComfyUI's file) / ``diffusers`` for a Qwen-Image 2.1 VAE, else None."""
    for layout, keys in VAE21_KEYS.items():
        if h.has(*keys):
            conv_in, post = h.shapes[keys[1]], h.shapes[keys[2]]
            if conv_in[1] == RGBA and post[0] == QWEN_IMAGE21_LATENT_CHANNELS:
                return layout
    return None


def vae_kind(h: FileHeader) -> str | None:
    if vae21_layout(h):
        return "qwen_image21_vae"
    keys = WAN_VAE_KEYS if h.has(*WAN_VAE_KEYS) else DIFFUSERS_VAE_KEYS if h.has(*DIFFUSERS_VAE_KEYS) else None
    if keys is None:
        return None
    conv_in, _, post = keys
    shape = h.shapes[conv_in]
    if len(shape) == 5 and shape[1] == RGB and h.shapes[post][0] == QWEN_IMAGE_LATENT_CHANNELS:
        return "qwen_image_vae"
    return "vae_other"


def is_qwen_vae(path: Path) -> bool:
    from .comfy_files import read_header  # noqa: PLC0415

    return vae_kind(read_header(path, "Qwen-Image", "vae")) in ("qwen_image_vae", "qwen_image21_vae")


def vae_latent_channels(h: FileHeader) -> int:
    post = "conv2.weight" if "conv2.weight" in h.shapes else "post_quant_conv.weight"
    return h.shapes[post][0]


def vae_config(h: FileHeader) -> dict:
    """diffusers' AutoencoderKLQwenImage config: base width and latent channels from shapes, the rest (channel
    multipliers, 2 res blocks, temporal downsampling, latent statistics) the class defaults (released)."""
    conv_in = "encoder.conv1.weight" if "encoder.conv1.weight" in h.shapes else "encoder.conv_in.weight"
    return {"base_dim": h.shapes[conv_in][0], "z_dim": vae_latent_channels(h)}


def wan_vae_rename(h: FileHeader):
    """Wan-2.1 VAE keys -> diffusers keys, as diffusers' own ``convert_wan_vae_to_diffusers`` maps them.

    The converter works on a whole state dict; run on placeholder tensors (meta, nothing read) it yields the
    key map, which the streaming loader applies one tensor at a time.
    """
    import torch  # noqa: PLC0415
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers  # noqa: PLC0415

    if not h.has(*WAN_VAE_KEYS):
        prefix = h.prefix
        return lambda key: key[len(prefix):] if key.startswith(prefix) else key
    placeholders = {h.prefix + k: torch.empty(0, device="meta") for k in h.shapes}
    by_id = {id(t): k for k, t in placeholders.items()}
    converted = convert_wan_vae_to_diffusers(dict(placeholders))
    mapping = {by_id[id(t)]: new for new, t in converted.items() if id(t) in by_id}
    return mapping.get
