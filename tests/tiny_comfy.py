"""Tiny Qwen-Image in the files ComfyUI users have (issue 19 part 5): producers, independent of the loader.

A Comfy-format file carries no config, so a loader must take everything the tensor shapes do not show from the
real model's config. The tiny models here therefore keep every such value REAL and shrink only what shapes show:

- transformer: attention head size 128, rope axes (16, 56, 56), patch 2, 64 -> 16 channels (real); 2 layers,
  2 heads (width 256) (tiny);
- text encoder (Qwen2.5-VL): vocabulary 152,064, the real special-token ids, mrope sections (16, 24, 24),
  rope theta 1e6, head size 128, 7:1 -> 2:1 GQA kept grouped, vision head size 80, full-attention block 7, window
  112 (real); 2 text layers of width 256, 8 vision blocks of width 80 (tiny);
- VAE: z_dim 16, dim_mult (1, 2, 4, 4), 2 res blocks, the real latents mean / std (real); base width 8 (tiny);
- tokenizer: the real Qwen2 BPE (tests/tiny_comfy_tokenizer.py), ids up to 151,668.

Written (``write_comfy_qwen_image(out_dir)``):

- ``out_dir/qwen_image/comfy-qwen-image{,-edit,-edit-2509,-edit-2511}/``: diffusers pipeline folders (bf16, as
  the hub repositories) — the reference each Comfy-format file must reproduce;
- ``comfy_files(folder, out_dir)``: the Comfy-Org split files of one folder in ComfyUI's model folders
  (``diffusion_models/``, ``text_encoders/``, ``vae/``, ``unet/`` for GGUF), see ``TRANSFORMER_FORMATS``;
- bad files (``tests/tiny_comfy_bad.py``).

The writers read the folder's safetensors with ``safetensors`` only and write the published key layouts (checked
against header listings quoted in tests/data/comfy_headers.json by tests/test_tiny_comfy.py); nothing here imports
the pack's loaders. GGUF files: tests/tiny_comfy_gguf.py.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from tests.tiny_comfy_tokenizer import QWEN25_TOKEN_IDS, load_qwen25_tokenizer, write_qwen25_tokenizer

FOLDER = "qwen_image"
COMPLETE_MARKER = ".complete"
T2I, EDIT, EDIT_2509, EDIT_2511 = "comfy-qwen-image", "comfy-qwen-image-edit", "comfy-qwen-image-edit-2509", \
    "comfy-qwen-image-edit-2511"
# variant -> (pipeline class, edit model?, zero_cond_t)
VARIANTS = {
    T2I: ("QwenImagePipeline", False, False),
    EDIT: ("QwenImageEditPipeline", True, False),
    EDIT_2509: ("QwenImageEditPlusPipeline", True, False),
    EDIT_2511: ("QwenImageEditPlusPipeline", True, True),
}
COMFY_PREFIX = "model.diffusion_model."

# Real: head 128, rope (16, 56, 56), patch 2, 64 -> 16 channels (Qwen/Qwen-Image transformer/config.json).
TRANSFORMER_CONFIG = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2,
                      "attention_head_dim": 128, "num_attention_heads": 2, "joint_attention_dim": 256,
                      "guidance_embeds": False, "axes_dims_rope": (16, 56, 56)}
# Real values except the widths / depths (Qwen/Qwen-Image text_encoder/config.json: hidden 3584, 28 heads, 4 KV
# heads, 28 layers, intermediate 18944; vision depth 32, width 1280, 16 heads, intermediate 3420).
TEXT_CONFIG = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 1, "vocab_size": 152064, "max_position_embeddings": 128000,
               "rms_norm_eps": 1e-6, "hidden_act": "silu", "tie_word_embeddings": False,
               "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
               "bos_token_id": QWEN25_TOKEN_IDS["<|endoftext|>"], "eos_token_id": QWEN25_TOKEN_IDS["<|im_end|>"]}
VISION_CONFIG = {"depth": 8, "hidden_size": 80, "intermediate_size": 160, "num_heads": 1, "out_hidden_size": 256,
                 "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
                 "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "in_chans": 3,
                 "hidden_act": "silu"}
# Real z_dim 16, dim_mult, 2 res blocks, temporal downsampling; AutoencoderKLQwenImage's defaults are the real
# latents_mean / latents_std. Tiny base width.
VAE_CONFIG = {"base_dim": 8, "z_dim": 16, "dim_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_scales": [],
              "temperal_downsample": [False, True, True]}
# The real Qwen2.5-VL processor limits (preprocessor_config.json).
VL_MIN_PIXELS, VL_MAX_PIXELS = 3136, 12845056
SEEDS = {"text_encoder": 11, "vae": 13, T2I: 17, EDIT: 19, EDIT_2509: 23, EDIT_2511: 29}

# Transformer file formats Comfy-Org / the community publish (see the README table and comfy_headers.json).
TRANSFORMER_FORMATS = ("bf16", "fp16", "fp8_e4m3fn", "fp8_scaled_old", "fp8_scaled", "fp8_mixed",
                       "fp8_scaled_metadata")
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _torch():
    import torch

    return torch


# ----------------------------------------------------------------------------------------------------------------
# Diffusers folders (the reference)
# ----------------------------------------------------------------------------------------------------------------

def text_encoder_config(text: dict | None = None, vision: dict | None = None, tie: bool = False):
    """Qwen2_5_VLConfig of the kit: TEXT_CONFIG / VISION_CONFIG with ``text`` / ``vision`` overrides (other sizes)."""
    from transformers import Qwen2_5_VLConfig

    ids = QWEN25_TOKEN_IDS
    text_cfg = dict(TEXT_CONFIG, tie_word_embeddings=tie, **(text or {}))
    vision_cfg = dict(VISION_CONFIG, out_hidden_size=text_cfg["hidden_size"], **(vision or {}))
    return Qwen2_5_VLConfig(
        text_config=text_cfg, vision_config=vision_cfg, tie_word_embeddings=tie,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def build_text_encoder():
    """Qwen2_5_VLForConditionalGeneration with the real non-shape config values (tiny widths)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(SEEDS["text_encoder"])
    return Qwen2_5_VLForConditionalGeneration(text_encoder_config()).eval()


def build_processor(tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    kw = dict(min_pixels=VL_MIN_PIXELS, max_pixels=VL_MAX_PIXELS, patch_size=14, temporal_patch_size=2, merge_size=2)
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**kw), tokenizer=tokenizer,
                            video_processor=Qwen2VLVideoProcessor(**kw))


def build_pipeline(variant: str, tokenizer_dir: Path):
    import diffusers
    import torch

    from tests.tiny_models import build_qwen_scheduler

    class_name, edit, zero_cond_t = VARIANTS[variant]
    torch.manual_seed(SEEDS[variant])
    cfg = dict(TRANSFORMER_CONFIG, zero_cond_t=True) if zero_cond_t else dict(TRANSFORMER_CONFIG)
    transformer = diffusers.QwenImageTransformer2DModel(**cfg).eval()
    torch.manual_seed(SEEDS["vae"])
    vae = diffusers.AutoencoderKLQwenImage(**VAE_CONFIG).eval()
    parts = dict(transformer=transformer, vae=vae, text_encoder=build_text_encoder(),
                 tokenizer=load_qwen25_tokenizer(tokenizer_dir), scheduler=build_qwen_scheduler())
    if edit:
        parts["processor"] = build_processor(load_qwen25_tokenizer(tokenizer_dir))
    pipe = getattr(diffusers, class_name)(**parts)
    return pipe.to(torch.bfloat16)  # the hub repositories are bf16


def write_comfy_qwen_image(out_dir: Path | str, variants: Iterable[str] | None = None,
                           force: bool = False) -> dict[str, Path]:
    """Write the real-config tiny pipeline folders into ``out_dir/qwen_image/<variant>``; return {variant: path}."""
    root = Path(out_dir) / FOLDER
    variants = list(VARIANTS if variants is None else dict.fromkeys(variants))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown Comfy-test Qwen-Image variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    result = {v: root / v for v in variants}
    todo = [v for v in variants if force or not (root / v / COMPLETE_MARKER).is_file()]
    if not todo:
        return result
    from tests.tiny_models import _import_libs

    _import_libs()  # quiet library logging
    root.mkdir(parents=True, exist_ok=True)
    tok_dir = write_qwen25_tokenizer(root / f".tokenizer-{os.getpid()}")
    try:
        for variant in todo:
            pipe = build_pipeline(variant, tok_dir)
            final, tmp = root / variant, root / f".{variant}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                pipe.save_pretrained(tmp, safe_serialization=True)
                for sub in ("tokenizer", "processor"):  # the classic files next to tokenizer.json, as the hub has
                    if (tmp / sub).is_dir():
                        shutil.copy(tok_dir / "vocab.json", tmp / sub / "vocab.json")
                        shutil.copy(tok_dir / "merges.txt", tmp / sub / "merges.txt")
                (tmp / COMPLETE_MARKER).write_text(f"{variant}\n")
                if final.exists():
                    shutil.rmtree(final)
                tmp.rename(final)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    finally:
        shutil.rmtree(tok_dir, ignore_errors=True)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Reading a folder's weights (safetensors only)
# ----------------------------------------------------------------------------------------------------------------

def read_component(folder: Path | str, sub: str) -> dict:
    """All tensors of ``folder/sub/*.safetensors`` (sharded or not) as {name: tensor}."""
    from safetensors.torch import load_file

    files = sorted((Path(folder) / sub).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder}/{sub}: no safetensors files")
    sd: dict = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def _save(sd: dict, path: Path | str, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Transformer (diffusion_models/)
# ----------------------------------------------------------------------------------------------------------------

def _is_linear(name: str, tensor) -> bool:
    """A Linear weight (every 2-D weight of the Qwen-Image transformer and of the text encoder's layers). Scaled
    files store each in FP8 with its scale: ComfyUI 0.3.x's scaled-FP8 ops expect a scale for every Linear."""
    return name.endswith(".weight") and tensor.ndim == 2


def _fp8_scaled(weight):
    """(float8_e4m3fn weight, float32 scalar scale) with weight ~= fp8 * scale (per-tensor absmax scaling)."""
    torch = _torch()
    w = weight.float()
    scale = (w.abs().amax() / FP8_MAX).clamp(min=1e-12)
    return (w / scale).to(torch.float8_e4m3fn), scale.reshape(())


def transformer_file_state_dict(folder: Path | str, fmt: str = "bf16", prefix: bool = False,
                                bf16_blocks: Iterable[int] = (0,), scale_input: bool = True,
                                ) -> tuple[dict, dict[str, str] | None]:
    """(tensors, safetensors metadata) of a Comfy-Org split transformer file made from ``folder``'s transformer.

    ``fmt``: ``bf16`` / ``fp16`` (cast); ``fp8_e4m3fn`` (every floating tensor downcast, no scales);
    ``fp8_scaled_old`` (``scaled_fp8`` marker + ``<layer>.scale_weight`` per Linear, the rest bf16);
    ``fp8_scaled`` (``<layer>.comfy_quant`` JSON bytes + ``<layer>.weight_scale``); ``fp8_mixed`` (as
    ``fp8_scaled`` for the blocks, but the blocks in ``bf16_blocks`` and the layers outside the blocks stay bf16
    without ``comfy_quant``); ``fp8_scaled_metadata``
    (the per-layer formats in the ``_quantization_metadata`` header entry instead of ``comfy_quant`` tensors).
    ``scale_input``: old form only, also write a unit ``<layer>.scale_input`` per layer, as ComfyUI 0.3.x's own
    saver does (its scaled ops expect one; 0.4+ drops unit input scales when loading).
    Edit-2511 folders (``zero_cond_t``) add ComfyUI's ``__index_timestep_zero__`` marker (float32, shape [0]).
    """
    torch = _torch()
    if fmt not in TRANSFORMER_FORMATS:
        raise ValueError(f"unknown transformer format {fmt!r}; known: {', '.join(TRANSFORMER_FORMATS)}")
    src = read_component(folder, "transformer")
    config = json.loads((Path(folder) / "transformer" / "config.json").read_text())
    keep_bf16 = {f"transformer_blocks.{i}." for i in bf16_blocks} if fmt == "fp8_mixed" else set()
    quantise = (lambda n, t: _is_linear(n, t) and n.startswith("transformer_blocks.")  # noqa: E731
                and not n.startswith(tuple(keep_bf16))) if fmt == "fp8_mixed" else _is_linear
    out: dict = {}
    layers: dict[str, dict] = {}
    for name, t in src.items():
        if fmt in ("bf16", "fp16"):
            out[name] = t.to(torch.bfloat16 if fmt == "bf16" else torch.float16)
        elif fmt == "fp8_e4m3fn":
            out[name] = t.to(torch.float8_e4m3fn) if t.is_floating_point() else t
        elif quantise(name, t):
            layer = name[: -len(".weight")]
            out[name], scale = _fp8_scaled(t)
            if fmt == "fp8_scaled_old":
                out[f"{layer}.scale_weight"] = scale
                if scale_input:
                    out[f"{layer}.scale_input"] = torch.ones((), dtype=torch.float32)
            else:
                out[f"{layer}.weight_scale"] = scale
                layers[layer] = {"format": "float8_e4m3fn"}
        else:
            out[name] = t.to(torch.bfloat16)
    metadata = None
    if fmt == "fp8_scaled_old":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    elif fmt in ("fp8_scaled", "fp8_mixed"):
        for layer, conf in layers.items():
            out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)
    elif fmt == "fp8_scaled_metadata":
        metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})}
    if config.get("zero_cond_t"):
        out["__index_timestep_zero__"] = torch.empty(0, dtype=torch.float32)
    if prefix:
        out = {COMFY_PREFIX + k: v for k, v in out.items()}
    return out, metadata


def write_transformer_file(folder: Path | str, path: Path | str, fmt: str = "bf16", prefix: bool = False,
                           **kw) -> Path:
    """Write the Comfy split transformer file of ``folder`` in ``fmt`` (see transformer_file_state_dict)."""
    sd, metadata = transformer_file_state_dict(folder, fmt, prefix, **kw)
    return _save(sd, path, metadata)


# ----------------------------------------------------------------------------------------------------------------
# Text encoder (text_encoders/qwen_2.5_vl_7b*.safetensors): transformers-4 key layout
# ----------------------------------------------------------------------------------------------------------------

def _te_key(name: str) -> str:
    """transformers-5 Qwen2.5-VL name -> the transformers-4 layout of the published files."""
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith("model.visual."):
        return "visual." + name[len("model.visual."):]
    return name


def text_file_state_dict(sd: dict, key_of, scaled, fmt: str = "bf16", lm_head: bool = True) -> dict:
    """A text encoder's state dict as a Comfy file: names through ``key_of``; ``bf16``, or ``fp8_scaled`` (the
    weights ``scaled(file_key, tensor)`` picks in FP8 with ``<layer>.scale_weight``, a ``scaled_fp8`` marker,
    everything else bf16); ``lm_head`` False leaves the output head out."""
    torch = _torch()
    if fmt not in ("bf16", "fp8_scaled"):
        raise ValueError(f"unknown text-encoder format {fmt!r}; known: bf16, fp8_scaled")
    out: dict = {}
    for name, t in sd.items():
        key = key_of(name)
        if key == "lm_head.weight" and not lm_head:
            continue
        if fmt == "fp8_scaled" and scaled(key, t):
            out[key], out[key[: -len(".weight")] + ".scale_weight"] = _fp8_scaled(t)
        else:
            out[key] = t.to(torch.bfloat16)
    if fmt == "fp8_scaled":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    return out


def text_encoder_file_state_dict(folder: Path | str, fmt: str = "bf16", lm_head: bool = True) -> dict:
    """Tensors of ``qwen_2.5_vl_7b.safetensors`` (``bf16``) or ``qwen_2.5_vl_7b_fp8_scaled.safetensors``
    (``fp8_scaled``: every Linear weight of the language model and the vision tower in FP8 with ``scale_weight``,
    ``scaled_fp8`` marker; embeddings, ``lm_head``, the patch-embedding conv, norms and biases bf16 — the split
    that reproduces the published file's 9,384,670,680 bytes, see comfy_headers.json)."""
    def scaled(key: str, t) -> bool:
        return key.startswith(("model.layers.", "visual.")) and _is_linear(key, t)
    return text_file_state_dict(read_component(folder, "text_encoder"), _te_key, scaled, fmt, lm_head)


def write_text_encoder_file(folder: Path | str, path: Path | str, fmt: str = "bf16", **kw) -> Path:
    return _save(text_encoder_file_state_dict(folder, fmt, **kw), path)


# ----------------------------------------------------------------------------------------------------------------
# VAE (vae/qwen_image_vae.safetensors): the Wan 2.1 layout
# ----------------------------------------------------------------------------------------------------------------

_RESNET = {"norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
           "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
           "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias"}
_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
_HEAD = {"norm_out.gamma": "head.0.gamma", "conv_out.weight": "head.2.weight", "conv_out.bias": "head.2.bias",
         "conv_in.weight": "conv1.weight", "conv_in.bias": "conv1.bias"}


def wan_vae_key(name: str, resnets_per_up_block: int) -> str:
    """diffusers AutoencoderKLQwenImage name -> Wan 2.1 VAE name (the published ``qwen_image_vae`` layout).

    Wan numbers the decoder's res blocks and upsamplers in one flat list (``decoder.upsamples.N``): up block
    ``i`` holds ``resnets_per_up_block`` res blocks then (all but the last block) one upsampler.
    """
    part, _, rest = name.partition(".")
    if part in _TOP:
        return f"{_TOP[part]}.{rest}"
    if rest in _HEAD:
        return f"{part}.{_HEAD[rest]}"
    if rest.startswith("mid_block."):
        kind, idx, tail = rest.split(".", 3)[1:]
        flat = 2 * int(idx) if kind == "resnets" else 1  # middle = [res 0, attention, res 1]
        return f"{part}.middle.{flat}.{_RESNET.get(tail, tail)}"
    if rest.startswith("down_blocks."):  # already flat in diffusers
        _, idx, tail = rest.split(".", 2)
        return f"{part}.downsamples.{idx}.{_RESNET.get(tail, tail)}"
    if rest.startswith("up_blocks."):
        _, block, kind, idx, tail = rest.split(".", 4)
        base = int(block) * (resnets_per_up_block + 1)
        flat = base + int(idx) if kind == "resnets" else base + resnets_per_up_block
        return f"{part}.upsamples.{flat}.{_RESNET.get(tail, tail) if kind == 'resnets' else tail}"
    raise KeyError(f"no Wan 2.1 VAE name for {name!r}")


def vae_file_state_dict(folder: Path | str) -> dict:
    torch = _torch()
    config = json.loads((Path(folder) / "vae" / "config.json").read_text())
    per_block = config["num_res_blocks"] + 1  # the decoder has one more res block per level than the encoder
    return {wan_vae_key(k, per_block): v.to(torch.bfloat16) for k, v in read_component(folder, "vae").items()}


def write_vae_file(folder: Path | str, path: Path | str) -> Path:
    return _save(vae_file_state_dict(folder), path)


# ----------------------------------------------------------------------------------------------------------------
# A ComfyUI models folder
# ----------------------------------------------------------------------------------------------------------------

# Comfy-Org's file names per variant (the loader must not depend on them: detection is by tensors).
FILE_STEMS = {T2I: "qwen_image", EDIT: "qwen_image_edit", EDIT_2509: "qwen_image_edit_2509",
              EDIT_2511: "qwen_image_edit_2511"}
_FORMAT_SUFFIX = {"bf16": "bf16", "fp16": "fp16", "fp8_e4m3fn": "fp8_e4m3fn", "fp8_scaled_old": "fp8_scaled",
                  "fp8_scaled": "fp8_scaled_v2", "fp8_mixed": "fp8mixed", "fp8_scaled_metadata": "fp8_scaled_meta"}


def comfy_files(folder: Path | str, models_dir: Path | str, formats: Iterable[str] = ("bf16",),
                gguf_types: Iterable[str] = (), prefix: bool = False, text_encoder_formats: Iterable[str] = ("bf16",),
                ) -> dict[str, Path]:
    """Write ``folder``'s weights as the Comfy-Org split files into ComfyUI's model folders under ``models_dir``.

    Returns {key: path} with keys ``transformer:<fmt>``, ``gguf:<type>``, ``text_encoder:<fmt>``, ``vae``.
    """
    folder, models = Path(folder), Path(models_dir)
    stem = FILE_STEMS[folder.name] if folder.name in FILE_STEMS else folder.name
    out: dict[str, Path] = {}
    for fmt in formats:
        out[f"transformer:{fmt}"] = write_transformer_file(
            folder, models / "diffusion_models" / f"{stem}_{_FORMAT_SUFFIX[fmt]}.safetensors", fmt, prefix)
    if gguf_types:
        from tests.tiny_comfy_gguf import write_transformer_gguf

        for qtype in gguf_types:
            out[f"gguf:{qtype}"] = write_transformer_gguf(folder, models / "unet" / f"{stem}-{qtype}.gguf", qtype)
    for fmt in text_encoder_formats:
        name = "qwen_2.5_vl_7b.safetensors" if fmt == "bf16" else "qwen_2.5_vl_7b_fp8_scaled.safetensors"
        out[f"text_encoder:{fmt}"] = write_text_encoder_file(folder, models / "text_encoders" / name, fmt)
    out["vae"] = write_vae_file(folder, models / "vae" / "qwen_image_vae.safetensors")
    return out


def write(out_dir: Path | str, force: bool = False) -> dict[str, Path]:
    """The kit entry (``python -m tests.tiny_models --out DIR --backend qwen_image_comfy``): every folder under
    ``DIR/qwen_image/``, and under ``DIR/comfyui_models/`` the T2I folder in every format (+ GGUF in ``unet/``,
    both text-encoder files, the VAE, the tokenizer in ComfyUI's layout) and each edit variant's transformer in
    bf16 and fp8mixed. About 1 GB (each folder's text encoder keeps the real 152,064-row vocabulary)."""
    from tests.tiny_comfy_gguf import FILE_TYPES

    folders = write_comfy_qwen_image(out_dir, force=force)
    models = Path(out_dir) / "comfyui_models"
    marker = models / COMPLETE_MARKER
    result = dict(folders)
    if force or not marker.is_file():
        comfy_files(folders[T2I], models, TRANSFORMER_FORMATS, tuple(FILE_TYPES), prefix=False,
                    text_encoder_formats=("bf16", "fp8_scaled"))
        for variant in (EDIT, EDIT_2509, EDIT_2511):
            comfy_files(folders[variant], models, ("bf16", "fp8_mixed"), text_encoder_formats=())
        write_qwen25_tokenizer(models / "qwen25_tokenizer")
        marker.write_text("comfyui_models\n")
    result["comfyui_models"] = models
    return result

