"""Comfy-format Qwen-Image files at other sizes (benchmarks): random weights written straight from shapes.

ComfyUI core builds its Qwen-Image transformer at the released width whatever the file holds (24 heads x 128,
text width 3584; only ``num_layers`` and ``in_channels`` come from the weights), so a file core and Gentor can
both sample must be full width; depth is free. Gentor then needs a text encoder 3584 wide with the real
vocabulary (a few layers and a narrow MLP are enough: the loader reads those sizes from the shapes) and a VAE.

Each model is built on the meta device (no memory for weights) and its tensors are filled one at a time in the
file's dtype, so a full-size 60-layer file (``--gpu`` benchmarks) needs only its own size in host RAM. Layouts
and key names are tests/tiny_comfy.py's (the published Comfy-Org layouts): transformer keys as diffusers names
them, the text encoder in the transformers-4 layout (``_te_key``), the VAE in the Wan 2.1 layout.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from tests import tiny_comfy as kit

RELEASED_TRANSFORMER = {"num_attention_heads": 24, "attention_head_dim": 128, "joint_attention_dim": 3584}
RELEASED_TEXT_WIDTH = {"hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4}
WEIGHT_STD = 0.02  # matrices ~ N(0, 0.02): activations stay finite and far from denormals at any depth
NAMES = {"transformer": "qwen_image_bench_bf16.safetensors", "text_encoder": "qwen_2.5_vl_bench_bf16.safetensors",
         "vae": "qwen_image_vae.safetensors"}


def random_state_dict(model, seed: int, dtype) -> dict:
    """Random tensors for every entry of ``model``'s (meta) state dict: matrices / convolutions ~ N(0, 0.02),
    1-D norm scales 1, other vectors (biases) 0."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in model.state_dict().items():
        if t.ndim >= 2:
            out[name] = (torch.randn(t.shape, generator=gen, dtype=torch.float32) * WEIGHT_STD).to(dtype)
        elif "norm" in name and name.endswith((".weight", ".gamma")):
            out[name] = torch.ones(t.shape, dtype=dtype)
        else:
            out[name] = torch.zeros(t.shape, dtype=dtype)
    return out


def _on_meta(build):
    import torch

    with torch.device("meta"):
        return build()


def write_transformer(path: Path | str, layers: int, seed: int = 0) -> Path:
    """A bf16 Comfy-Org split transformer file at the released width with ``layers`` blocks."""
    import diffusers
    import torch

    cfg = dict(kit.TRANSFORMER_CONFIG, **RELEASED_TRANSFORMER, num_layers=layers)
    model = _on_meta(lambda: diffusers.QwenImageTransformer2DModel(**cfg))
    return kit._save(random_state_dict(model, seed, torch.bfloat16), path)


def write_text_encoder(path: Path | str, layers: int = 1, intermediate: int = 1024, seed: int = 1) -> Path:
    """A bf16 ``qwen_2.5_vl_7b``-layout file 3584 wide (real vocabulary, 28 / 4 heads), ``layers`` text layers with
    an MLP ``intermediate`` wide, the kit's tiny vision tower, no ``lm_head`` (as ComfyUI's encoder-only files)."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = kit.text_encoder_config(dict(RELEASED_TEXT_WIDTH, num_hidden_layers=layers,
                                          intermediate_size=intermediate), tie=True)
    model = _on_meta(lambda: Qwen2_5_VLForConditionalGeneration(config))
    sd = random_state_dict(model, seed, torch.bfloat16)
    return kit._save({kit._te_key(k): v for k, v in sd.items() if not k.endswith("lm_head.weight")}, path)


def write_vae(path: Path | str, work: Path | str) -> Path:
    """The kit's tiny VAE (16 latent channels, Wan 2.1 layout) through its own writer."""
    import diffusers
    import torch

    folder = Path(work) / ".vae-folder"
    torch.manual_seed(kit.SEEDS["vae"])
    diffusers.AutoencoderKLQwenImage(**kit.VAE_CONFIG).to(torch.bfloat16).save_pretrained(folder / "vae")
    try:
        return kit.write_vae_file(folder, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_files(models_dir: Path | str, layers: int, text_layers: int = 1, text_intermediate: int = 1024
                ) -> dict[str, Path]:
    """The three files in ComfyUI's folders under ``models_dir``; returns {role: path}."""
    models = Path(models_dir)
    return {"transformer": write_transformer(models / "diffusion_models" / NAMES["transformer"], layers),
            "text_encoder": write_text_encoder(models / "text_encoders" / NAMES["text_encoder"], text_layers,
                                               text_intermediate),
            "vae": write_vae(models / "vae" / NAMES["vae"], models)}
