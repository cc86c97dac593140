"""Tiny Qwen-Image LoRAs in every key layout Gentor reads, for the tiny transformer of tests/tiny_models.py.

    python -m tests.tiny_models --out DIR --backend qwen_image   (writes these into DIR/loras/)

One set of random factors (``factors()``: module -> (down [r, in], up [out, r], alpha)) written in:

- ``tiny-qwen-image-lora-diffusers.safetensors``  ``transformer.<module>.lora_A/lora_B.weight`` (+ ``.alpha``)
- ``tiny-qwen-image-lora-peft.safetensors``       ``<module>.lora_A.default.weight`` (PEFT's own spelling) + alpha
- ``tiny-qwen-image-lora-comfyui.safetensors``    ``diffusion_model.<module>.lora_down/lora_up.weight`` + ``.alpha``
- ``tiny-qwen-image-lora-kohya.safetensors``      ``lora_unet_<module with _>.lora_down/lora_up.weight`` + ``.alpha``
- ``tiny-qwen-image-Lightning-8steps-lora.safetensors``  a second LoRA (other factors), named like the Lightning
  releases so the recipe note fires

Every layout describes the same delta: W' = W + strength * alpha / r * up @ down.
"""
from __future__ import annotations

from pathlib import Path

LORA_FOLDER = "loras"
RANK = 4
ALPHA = 2.0  # alpha / rank = 0.5: the scaling is exercised, not 1
FORMATS = ("diffusers", "peft", "comfyui", "kohya")
LIGHTNING = "tiny-qwen-image-Lightning-8steps-lora.safetensors"
SEEDS = {"style": 21, "lightning": 22}
# Linear layers of every block that published Qwen-Image LoRAs target (attention, both MLPs).
BLOCK_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                 "attn.add_v_proj", "attn.to_add_out", "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj",
                 "txt_mlp.net.2")
FACTOR_STD = 0.3


def file_name(fmt: str) -> str:
    return f"tiny-qwen-image-lora-{fmt}.safetensors"


def factors(seed: int = SEEDS["style"]) -> dict:
    """module name -> (down [r, in], up [out, r], alpha), for the tiny transformer's real layer sizes."""
    import torch

    from tests.tiny_models import QWEN_IMAGE_TRANSFORMER_CONFIG as cfg

    inner = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    sizes = {"attn.to_q": (inner, inner), "attn.to_k": (inner, inner), "attn.to_v": (inner, inner),
             "attn.to_out.0": (inner, inner), "attn.add_q_proj": (inner, inner), "attn.add_k_proj": (inner, inner),
             "attn.add_v_proj": (inner, inner), "attn.to_add_out": (inner, inner),
             "img_mlp.net.0.proj": (inner, 4 * inner), "img_mlp.net.2": (4 * inner, inner),
             "txt_mlp.net.0.proj": (inner, 4 * inner), "txt_mlp.net.2": (4 * inner, inner)}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for block in range(cfg["num_layers"]):
        for target in BLOCK_TARGETS:
            fan_in, fan_out = sizes[target]
            down = torch.randn(RANK, fan_in, generator=gen) * FACTOR_STD
            up = torch.randn(fan_out, RANK, generator=gen) * FACTOR_STD
            out[f"transformer_blocks.{block}.{target}"] = (down, up, ALPHA)
    return out


def state_dict(fmt: str, seed: int = SEEDS["style"]) -> dict:
    """The factors in one published key layout."""
    import torch

    out = {}
    for module, (down, up, alpha) in factors(seed).items():
        alpha_t = torch.tensor(alpha)
        if fmt == "diffusers":
            out |= {f"transformer.{module}.lora_A.weight": down, f"transformer.{module}.lora_B.weight": up,
                    f"transformer.{module}.alpha": alpha_t}
        elif fmt == "peft":
            out |= {f"{module}.lora_A.default.weight": down, f"{module}.lora_B.default.weight": up,
                    f"{module}.alpha": alpha_t}
        elif fmt == "comfyui":
            out |= {f"diffusion_model.{module}.lora_down.weight": down, f"diffusion_model.{module}.lora_up.weight": up,
                    f"diffusion_model.{module}.alpha": alpha_t}
        elif fmt == "kohya":
            flat = "lora_unet_" + module.replace(".", "_")
            out |= {f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up, f"{flat}.alpha": alpha_t}
        else:
            raise ValueError(f"unknown LoRA format {fmt!r}; known: {', '.join(FORMATS)}")
    return {k: v.contiguous() for k, v in out.items()}


def write(out_dir: Path | str, force: bool = False) -> dict[str, Path]:
    """Write every layout (and the Lightning-named LoRA) into ``out_dir/loras/``; return {file name: path}."""
    from safetensors.torch import save_file

    folder = Path(out_dir) / LORA_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    files = {file_name(fmt): ("diffusers" if fmt == "diffusers" else fmt, SEEDS["style"]) for fmt in FORMATS}
    files[LIGHTNING] = ("diffusers", SEEDS["lightning"])
    result = {}
    for name, (fmt, seed) in files.items():
        path = folder / name
        if force or not path.is_file():
            tmp = path.with_name(f".{path.name}.tmp")  # never a half-written .safetensors in the dropdown
            try:
                save_file(state_dict(fmt, seed), str(tmp))
                tmp.replace(path)
            finally:
                tmp.unlink(missing_ok=True)
        result[name] = path
    return result
