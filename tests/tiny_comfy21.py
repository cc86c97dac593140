"""Tiny Qwen-Image 2.1 as a diffusers folder AND as the Comfy-Org split files, from the same weights.

Independent of the pack (nothing from ``loaders/``): the writers read the folder's safetensors with
``safetensors`` only. A Comfy file carries no config, so everything the tensor shapes do not show is the REAL
model's value and only what shapes show is shrunk:

- transformer (``QwenImage21Transformer2DModel``, class defaults = the released config): head 128, rope axes
  (16, 56, 56), MLP ratio 3, patch 1, 64 channels, block-causal condition (real); 2 layers, 2 heads (width
  256), text input 256 (tiny);
- text encoder (Qwen3-VL-8B, ComfyUI's ``Qwen3VL_8BConfig``): vocabulary 151,936, head 128, rope theta 5e6,
  interleaved mrope (24, 20, 20), rms eps 1e-6, the real special-token ids; vision: 27 blocks, patch 16,
  temporal patch 2, merge 2, 2,304 position embeddings, deepstack (8, 16, 24), gelu-tanh (real); text 2 layers
  of width 256 with 2 heads / 1 KV head, vision width 72 with 1 head (tiny);
- VAE (``AutoencoderKLQwenImage21``): z_dim 64, dim_mult (1, 2, 4, 8, 8), 2 res blocks, temporal downsampling
  (F, T, T, T), RGBA, the real latents mean / std (real); encoder / decoder base widths 8 / 12 (tiny, real 96 /
  144);
- processor: the real Qwen2 BPE (tests/tiny_comfy_tokenizer.py), patch 16, mean / std 0.5, 65,536 ...
  16,777,216 pixels; scheduler: ComfyUI's constant shift 0.69 (comfy/supported_models.py QwenImage21).

Written by ``write21(out_dir)``: ``out_dir/qwen_image/comfy-qwen-image-2.1/`` (the reference) and under
``out_dir/comfyui_models/`` the files of ``FILES`` + bad files (``write_bad_files21``).
File layouts: transformer = diffusers names with each block's ``img_mlp.gate_layer`` / ``img_mlp.proj`` fused
into ``img_mlp.gate_up`` (gate rows first), no prefix; text encoder = transformers-5 names with
``model.language_model.`` -> ``model.`` (``model.visual.`` and ``lm_head`` kept); VAE = ComfyUI's native Wan-2.2
layout (``native_vae_key``) with every causal-conv weight 5-D (time kernel 1).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from tests.tiny_comfy import COMFY_PREFIX, _fp8_scaled, _save, read_component, text_file_state_dict
from tests.tiny_comfy_tokenizer import QWEN25_TOKEN_IDS, load_qwen25_tokenizer, write_qwen25_tokenizer

FOLDER = "qwen_image"
VARIANT = "comfy-qwen-image-2.1"
MODELS = "comfyui_models"
COMPLETE_MARKER = ".complete21"
GGUF_ARCH = "qwen_image21"  # general.architecture of the published 2.1 GGUFs
GGUF_TYPES = ("Q8_0", "Q4_K_M")

TRANSFORMER_CONFIG = {"num_layers": 2, "num_attention_heads": 2, "context_in_dim": 256}
GATE_UP, GATE, UP = "img_mlp.gate_up.weight", "img_mlp.gate_layer.weight", "img_mlp.proj.weight"
VAE_CONFIG = {"base_dim": 8, "decoder_base_dim": 12}
TEXT_CONFIG = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 2,
               "num_key_value_heads": 1, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 262144,
               "rms_norm_eps": 1e-6, "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False,
               "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                   "mrope_interleaved": True},
               "bos_token_id": QWEN25_TOKEN_IDS["<|endoftext|>"], "eos_token_id": QWEN25_TOKEN_IDS["<|im_end|>"]}
VISION_CONFIG = {"depth": 27, "hidden_size": 72, "num_heads": 1, "intermediate_size": 144, "patch_size": 16,
                 "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3, "out_hidden_size": 256,
                 "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24],
                 "hidden_act": "gelu_pytorch_tanh"}
BAD_TEXT_WIDTH = {"hidden_size": 128, "intermediate_size": 256}  # a Qwen3-VL file of another width
VL_PATCH = {"patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5] * 3,
            "image_std": [0.5] * 3}
VL_SIZE = {"shortest_edge": 65536, "longest_edge": 16777216}
SCHEDULER_CONFIG = {"shift": 0.69, "use_dynamic_shifting": False, "num_train_timesteps": 1000}
SEEDS = {"transformer": 41, "vae": 43, "text_encoder": 47, "bad_text_encoder": 53}
# Qwen2-VL / Qwen3-VL chat format for plain conversations (no default system message, as Qwen3-VL's template).
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}{%- for c in message['content'] %}"
    "{%- if c['type'] == 'image' %}{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif c['type'] == 'video' %}{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif c['type'] == 'text' %}{{- c['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Comfy-Org/Qwen-Image-2.1 file names (+ the community GGUF names) under ComfyUI's model folders.
FILES = {
    "transformer:bf16": "diffusion_models/qwen_image_2.1_bf16.safetensors",
    "transformer:fp8_e4m3fn": "diffusion_models/qwen_image_2.1_fp8_e4m3fn.safetensors",
    "transformer:fp8_scaled": "diffusion_models/qwen_image_2.1_fp8_scaled.safetensors",
    "gguf:Q8_0": "unet/qwen-image-2.1-Q8_0.gguf",
    "gguf:Q4_K_M": "unet/qwen-image-2.1-Q4_K_M.gguf",
    "text_encoder:bf16": "text_encoders/qwen3vl_8b_bf16.safetensors",
    "text_encoder:fp8_scaled": "text_encoders/qwen3vl_8b_fp8_scaled.safetensors",
    "vae": "vae/qwen_image_2.1_vae_bf16.safetensors",
}
BAD_FILES = {"vae_truncated": "vae/qwen_image_2.1_vae_truncated.safetensors",
             "text_encoder_wrong_width": "text_encoders/qwen3vl_8b_wrong_width.safetensors"}
TOKENIZER = "qwen25_tokenizer"


def _torch():
    import torch

    return torch


# ----------------------------------------------------------------------------------------------------------------
# The diffusers folder (the reference)
# ----------------------------------------------------------------------------------------------------------------

def text_encoder_config(text: dict | None = None):
    """Qwen3VLConfig of the kit (TEXT_CONFIG / VISION_CONFIG; ``text`` overrides, vision output follows width)."""
    from transformers import Qwen3VLConfig

    ids = QWEN25_TOKEN_IDS
    text_cfg = dict(TEXT_CONFIG, **(text or {}))
    vision_cfg = dict(VISION_CONFIG, out_hidden_size=text_cfg["hidden_size"])
    return Qwen3VLConfig(
        text_config=text_cfg, vision_config=vision_cfg, tie_word_embeddings=False,
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def build_text_encoder(text: dict | None = None, seed: int = SEEDS["text_encoder"]):
    """Qwen3VLForConditionalGeneration with the real non-shape values (tiny widths), seeded."""
    from transformers import Qwen3VLForConditionalGeneration

    _torch().manual_seed(seed)
    return Qwen3VLForConditionalGeneration(text_encoder_config(text)).eval()


def build_processor(tokenizer_dir: Path | str):
    """Qwen3VLProcessor over the real Qwen2 BPE with the Qwen3-VL patch settings."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(size=dict(VL_SIZE), **VL_PATCH),
                            tokenizer=load_qwen25_tokenizer(tokenizer_dir),
                            video_processor=Qwen3VLVideoProcessor(**VL_PATCH), chat_template=CHAT_TEMPLATE)


def build_pipeline21(tokenizer_dir: Path | str):
    """diffusers.QwenImage21Pipeline (bf16) of the kit; ``tokenizer_dir`` from write_qwen25_tokenizer."""
    import diffusers

    torch = _torch()
    torch.manual_seed(SEEDS["transformer"])
    transformer = diffusers.QwenImage21Transformer2DModel(**TRANSFORMER_CONFIG).eval()
    torch.manual_seed(SEEDS["vae"])
    vae = diffusers.AutoencoderKLQwenImage21(**VAE_CONFIG).eval()
    pipe = diffusers.QwenImage21Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae,
        text_encoder=build_text_encoder(), processor=build_processor(tokenizer_dir), transformer=transformer)
    return pipe.to(torch.bfloat16)


def write_folder21(out_dir: Path | str, force: bool = False) -> Path:
    """Write ``out_dir/qwen_image/comfy-qwen-image-2.1/`` atomically (kept when complete unless ``force``)."""
    from tests.tiny_common import atomic_folder

    def fill(tmp: Path) -> None:
        tok_dir = write_qwen25_tokenizer(tmp.parent / f".tokenizer21-{os.getpid()}")
        try:
            build_pipeline21(tok_dir).save_pretrained(tmp, safe_serialization=True)
            for name in ("vocab.json", "merges.txt"):  # the classic files next to tokenizer.json, as the hub has
                shutil.copy(tok_dir / name, tmp / "processor" / name)
        finally:
            shutil.rmtree(tok_dir, ignore_errors=True)

    return atomic_folder(Path(out_dir) / FOLDER / VARIANT, fill, force)


# ----------------------------------------------------------------------------------------------------------------
# Transformer (diffusion_models/, unet/)
# ----------------------------------------------------------------------------------------------------------------

def fuse_gate_up(sd: dict) -> dict:
    """diffusers 2.1 transformer names -> the Comfy file's: each ``img_mlp.gate_layer`` + ``img_mlp.proj`` fused
    into ``img_mlp.gate_up`` = cat([gate, up], 0) (the layout diffusers' single-file converter undoes)."""
    torch = _torch()
    out: dict = {}
    for name, t in sd.items():
        if name.endswith(GATE):
            block = name[: -len(GATE)]
            out[block + GATE_UP] = torch.cat([t, sd[block + UP]], dim=0)
        elif not name.endswith(UP):
            out[name] = t
    return out


def transformer21_file_state_dict(folder: Path | str, fmt: str = "bf16", prefix: bool = False) -> dict:
    """Tensors of the Comfy 2.1 transformer file of ``folder``: ``bf16``; ``fp8_e4m3fn`` (every 2-D weight
    downcast, no scales; the rest bf16); ``fp8_scaled`` (ComfyUI's newer scaled form: every 2-D weight of the
    blocks in FP8 with a float32 ``weight_scale`` and a ``comfy_quant`` JSON — the fused ``gate_up`` matrix has
    one scale for both halves). ``prefix``: ``model.diffusion_model.`` before every name."""
    torch = _torch()
    if fmt not in ("bf16", "fp8_e4m3fn", "fp8_scaled"):
        raise ValueError(f"unknown 2.1 transformer format {fmt!r}; known: bf16, fp8_e4m3fn, fp8_scaled")
    out = {}
    for name, t in fuse_gate_up(read_component(folder, "transformer")).items():
        linear = name.endswith(".weight") and t.ndim == 2
        if fmt == "fp8_scaled" and linear and name.startswith("transformer_blocks."):
            layer = name[: -len(".weight")]
            out[name], out[f"{layer}.weight_scale"] = _fp8_scaled(t)
            conf = json.dumps({"format": "float8_e4m3fn"}).encode("utf-8")
            out[f"{layer}.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
        else:
            out[name] = t.to(torch.float8_e4m3fn if fmt == "fp8_e4m3fn" and linear else torch.bfloat16)
    return {COMFY_PREFIX + k: v for k, v in out.items()} if prefix else out


def write_transformer21_file(folder: Path | str, path: Path | str, fmt: str = "bf16", prefix: bool = False) -> Path:
    return _save(transformer21_file_state_dict(folder, fmt, prefix), path)


def write_transformer21_gguf(folder: Path | str, path: Path | str, file_type: str = "Q8_0") -> Path:
    """GGUF ``file_type`` of the Comfy 2.1 transformer (fused names, no prefix; arch ``qwen_image21``)."""
    from tests.tiny_comfy_gguf import FILE_TYPES, write_gguf

    if file_type not in FILE_TYPES:
        raise ValueError(f"unknown GGUF file type {file_type!r}; known: {', '.join(FILE_TYPES)}")
    return write_gguf(transformer21_file_state_dict(folder), path, file_type, arch=GGUF_ARCH)


def write_transformer21(out_dir: Path | str, prefix: bool = True, seed: int = 31) -> tuple[Path, Path]:
    """(diffusers ``transformer/`` folder, Comfy file) of a lone kit transformer: a quick fixture without the
    text encoder and tokenizer."""
    import diffusers

    torch = _torch()
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    model = diffusers.QwenImage21Transformer2DModel(**TRANSFORMER_CONFIG).eval().to(torch.bfloat16)
    folder = out_dir / "qwen_image_21_transformer"
    model.save_pretrained(folder, safe_serialization=True)
    fused = fuse_gate_up({k: v.detach() for k, v in model.state_dict().items()})
    if prefix:
        fused = {COMFY_PREFIX + k: v for k, v in fused.items()}
    return folder, _save(fused, out_dir / "diffusion_models" / "qwen_image_2.1_bf16.safetensors")


# ----------------------------------------------------------------------------------------------------------------
# Text encoder (text_encoders/qwen3vl_8b_*.safetensors)
# ----------------------------------------------------------------------------------------------------------------

LANGUAGE_PREFIX, FILE_LANGUAGE_PREFIX = "model.language_model.", "model."


def te_file_key(name: str) -> str:
    """transformers-5 Qwen3-VL name -> the Comfy file's (``model.language_model.X`` -> ``model.X``)."""
    return FILE_LANGUAGE_PREFIX + name[len(LANGUAGE_PREFIX):] if name.startswith(LANGUAGE_PREFIX) else name


def te_state_dict_to_file(sd: dict, fmt: str = "bf16", lm_head: bool = True) -> dict:
    """A transformers-5 Qwen3-VL state dict as the Comfy file: ``bf16``, or ``fp8_scaled`` (the language
    model's Linear weights FP8 + ``<layer>.scale_weight``, ``scaled_fp8`` marker; the rest bf16)."""
    def scaled(key: str, t) -> bool:
        return key.startswith(FILE_LANGUAGE_PREFIX + "layers.") and key.endswith(".weight") and t.ndim == 2
    return text_file_state_dict(sd, te_file_key, scaled, fmt, lm_head)


def write_text_encoder21_file(folder: Path | str, path: Path | str, fmt: str = "bf16", lm_head: bool = True) -> Path:
    return _save(te_state_dict_to_file(read_component(folder, "text_encoder"), fmt, lm_head), path)


# ----------------------------------------------------------------------------------------------------------------
# VAE (vae/qwen_image_2.1_vae_bf16.safetensors): ComfyUI's native Wan-2.2 layout
# ----------------------------------------------------------------------------------------------------------------

_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
_SIDE = {"conv_in": "conv1", "conv_out": "head.2", "norm_out": "head.0"}
_RES = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
        "conv_shortcut": "shortcut"}
_BLOCKS = {"down_blocks": ("downsamples", "downsampler", 0), "up_blocks": ("upsamples", "upsampler", 1)}


def native_vae_key(name: str, num_res_blocks: int) -> str:
    """diffusers AutoencoderKLQwenImage21 name -> ComfyUI's native Wan-2.2 VAE name.

    Res blocks (mid / down / up): norm1, conv1, norm2, conv2, conv_shortcut -> residual.0 / .2 / .3 / .6,
    shortcut. Mid block = [res 0, attention, res 1]. A down block holds ``num_res_blocks`` res blocks then its
    downsampler, an up block one more res block then its upsampler, all in one ``downsamples`` / ``upsamples``
    list.
    """
    parts = name.split(".")
    if parts[0] in _TOP:
        return ".".join([_TOP[parts[0]], *parts[1:]])
    side, head, rest = parts[0], parts[1], parts[2:]
    if side not in ("encoder", "decoder"):
        raise KeyError(f"no native VAE name for {name!r}")
    if head in _SIDE:
        return ".".join([side, _SIDE[head], *rest])

    def res(tail: list[str]) -> list[str]:
        return [_RES.get(tail[0], tail[0]), *tail[1:]]

    if head == "mid_block":
        kind, idx, tail = rest[0], int(rest[1]), rest[2:]
        if kind == "attentions":
            return ".".join([side, "middle", "1", *tail])
        return ".".join([side, "middle", str(2 * idx), *res(tail)])
    if head in _BLOCKS:
        group, sampler, extra = _BLOCKS[head]
        block, kind = rest[0], rest[1]
        if kind == "resnets":
            return ".".join([side, group, block, group, rest[2], *res(rest[3:])])
        if kind == sampler:
            return ".".join([side, group, block, group, str(num_res_blocks + extra), *rest[2:]])
    raise KeyError(f"no native VAE name for {name!r}")


def causal_conv_modules(config: dict) -> set[str]:
    """Module names of the ``QwenImage21CausalConv3d`` layers of a VAE built from ``config`` (meta device)."""
    import diffusers

    torch = _torch()
    cls = diffusers.AutoencoderKLQwenImage21
    with torch.device("meta"):
        vae = cls.from_config(config)
    conv = type(vae.quant_conv)  # QwenImage21CausalConv3d
    assert conv.__name__ == "QwenImage21CausalConv3d", conv
    return {n for n, m in vae.named_modules() if isinstance(m, conv)}


def vae21_file_state_dict(folder: Path | str) -> dict:
    """The native Wan-2.2 VAE tensors of ``folder``'s VAE (bf16; causal-conv weights 5-D, time kernel 1)."""
    torch = _torch()
    config = json.loads((Path(folder) / "vae" / "config.json").read_text())
    causal = causal_conv_modules(config)
    out = {}
    for name, t in read_component(folder, "vae").items():
        module, _, param = name.rpartition(".")
        if module in causal and param == "weight":
            t = t.unsqueeze(2)
        out[native_vae_key(name, config["num_res_blocks"])] = t.to(torch.bfloat16)
    return out


def write_vae21_file(folder: Path | str, path: Path | str) -> Path:
    return _save(vae21_file_state_dict(folder), path)


# ----------------------------------------------------------------------------------------------------------------
# A ComfyUI models folder
# ----------------------------------------------------------------------------------------------------------------

def write_bad_files21(folder: Path | str, models_dir: Path | str) -> dict[str, Path]:
    """``vae_truncated``: the VAE file with only its first half of tensors; ``text_encoder_wrong_width``: a
    Qwen3-VL file of hidden width 128 (the kit's is 256)."""
    models = Path(models_dir)
    vae = vae21_file_state_dict(folder)
    keep = sorted(vae)[: len(vae) // 2]
    bad = build_text_encoder(BAD_TEXT_WIDTH, seed=SEEDS["bad_text_encoder"])
    return {
        "vae_truncated": _save({k: vae[k] for k in keep}, models / BAD_FILES["vae_truncated"]),
        "text_encoder_wrong_width": _save(te_state_dict_to_file(bad.state_dict()),
                                          models / BAD_FILES["text_encoder_wrong_width"]),
    }


def comfy_files21(folder: Path | str, models_dir: Path | str) -> dict[str, Path]:
    """Write every file of ``FILES`` from ``folder`` under ``models_dir``; return {key: path}."""
    models = Path(models_dir)
    out = {f"transformer:{fmt}": write_transformer21_file(folder, models / FILES[f"transformer:{fmt}"], fmt)
           for fmt in ("bf16", "fp8_e4m3fn", "fp8_scaled")}
    for qtype in GGUF_TYPES:
        out[f"gguf:{qtype}"] = write_transformer21_gguf(folder, models / FILES[f"gguf:{qtype}"], qtype)
    for fmt in ("bf16", "fp8_scaled"):
        out[f"text_encoder:{fmt}"] = write_text_encoder21_file(folder, models / FILES[f"text_encoder:{fmt}"], fmt)
    out["vae"] = write_vae21_file(folder, models / FILES["vae"])
    return out


def write21(out_dir: Path | str, force: bool = False) -> dict[str, Path]:
    """The folder, the Comfy files (``FILES``), the bad files (``BAD_FILES``) and ComfyUI's tokenizer folder;
    returns {"folder", "comfyui_models", "tokenizer", <FILES / BAD_FILES keys>: path}. Files are kept when
    ``comfyui_models/.complete21`` exists unless ``force``."""
    from tests.tiny_models import _import_libs

    _import_libs()  # quiet library logging
    folder = write_folder21(out_dir, force)
    models = Path(out_dir) / MODELS
    marker = models / COMPLETE_MARKER
    result = {"folder": folder, "comfyui_models": models, "tokenizer": models / TOKENIZER}
    result.update({k: models / rel for k, rel in {**FILES, **BAD_FILES}.items()})
    if force or not marker.is_file():
        marker.unlink(missing_ok=True)
        comfy_files21(folder, models)
        write_bad_files21(folder, models)
        if not (models / TOKENIZER / "vocab.json").is_file():
            write_qwen25_tokenizer(models / TOKENIZER)
        marker.write_text("comfyui_models 2.1\n")
    return result


write = write21  # the kit entry (python -m tests.tiny_models --backend qwen_image_comfy21)
