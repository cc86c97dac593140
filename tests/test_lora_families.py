"""A LoRA of another architecture is named ("this is an SDXL LoRA"), never reported as garbled unmatched keys.
Keys are spelled as the common trainers save them (kohya's flattened names, diffusers/PEFT names, ComfyUI's
and the original repositories' names); the Qwen-Image layouts the pack reads still pass."""
from __future__ import annotations

import pytest

from gentor.errors import ModelFolderError
from gentor.loaders.lora import detect_format

DOWN, UP = ".lora_down.weight", ".lora_up.weight"


def pair(base: str, a: str = DOWN, b: str = UP) -> list[str]:
    return [base + a, base + b, base.removesuffix(".weight") + ".alpha"] if a == DOWN else [base + a, base + b]


FAMILIES = {
    "SDXL": [  # kohya sd-scripts, SDXL: two text encoders, ten-deep transformer blocks
        *pair("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
        *pair("lora_unet_output_blocks_2_1_transformer_blocks_9_ff_net_2"),
        *pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj")],
    "SDXL diffusers": [  # diffusers' SDXL LoRA (unet. prefix, PEFT names)
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.lora_A.weight",
        "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q.lora_B.weight"],
    "SD 1.x": [  # kohya, SD 1.5: attention in the first down block
        *pair("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"),
        *pair("lora_te_text_model_encoder_layers_11_mlp_fc1")],
    "FLUX": [  # kohya FLUX.1
        *pair("lora_unet_double_blocks_0_img_attn_qkv"), *pair("lora_unet_double_blocks_0_txt_mlp_0"),
        *pair("lora_unet_single_blocks_37_linear1")],
    "FLUX diffusers": [
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight",
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight",
        "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight",
        "transformer.transformer_blocks.0.attn.add_q_proj.lora_B.weight"],
    "SD3 / SD3.5": [
        "transformer.transformer_blocks.0.ff_context.net.0.proj.lora_A.weight",
        "transformer.transformer_blocks.0.ff_context.net.0.proj.lora_B.weight",
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight"],
    "Wan": [  # ComfyUI / musubi-tuner Wan 2.x
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight", "diffusion_model.blocks.0.self_attn.q.lora_up.weight",
        "diffusion_model.blocks.0.cross_attn.k.lora_down.weight", "diffusion_model.blocks.0.ffn.0.lora_up.weight"],
    "HunyuanVideo": [  # musubi-tuner HunyuanVideo: 20 double, 40 single blocks
        *pair("lora_unet_double_blocks_19_img_attn_qkv"), *pair("lora_unet_single_blocks_39_linear1")],
    "HunyuanVideo diffusers": [
        "transformer.context_embedder.token_refiner.refiner_blocks.0.attn.to_q.lora_A.weight",
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"],
    "Z-Image / Lumina 2": ["diffusion_model.context_refiner.0.attention.qkv.lora_A.weight",
                           "diffusion_model.noise_refiner.0.attention.out.lora_B.weight"],
    "language-model (LLM)": ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                             "base_model.model.model.layers.0.mlp.gate_proj.lora_B.weight"],
}
SAYS = {"SDXL diffusers": "SDXL", "FLUX diffusers": "FLUX", "HunyuanVideo diffusers": "HunyuanVideo"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_foreign_lora_is_named_by_family(family):
    with pytest.raises(ModelFolderError) as info:
        detect_format(FAMILIES[family], "Gentor LoRA", "x.safetensors")
    message = str(info.value)
    name = SAYS.get(family, family)
    assert f"this is {'an' if name.startswith('SD') else 'a'} {name} LoRA" in message, message
    assert message.startswith("Gentor LoRA lora_name: x.safetensors is not a Qwen-Image LoRA"), message


@pytest.mark.parametrize("keys, layout", [
    (["transformer.transformer_blocks.0.attn.to_q.lora_A.weight",
      "transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_B.weight"], "diffusers"),
    (["diffusion_model.transformer_blocks.0.attn.add_q_proj.lora_down.weight",
      "diffusion_model.transformer_blocks.0.txt_mod.1.lora_up.weight"], "comfyui"),
    (["lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight",
      "lora_unet_transformer_blocks_59_img_mlp_net_2.lora_up.weight", "lora_unet_transformer_blocks_0_attn_to_q.alpha"],
     "kohya"),
])
def test_qwen_image_layouts_still_pass(keys, layout):
    assert detect_format(keys, "Gentor LoRA", "q.safetensors") == layout


def test_unknown_architecture_says_so():
    with pytest.raises(ModelFolderError, match="an unknown architecture's LoRA"):
        detect_format(["model.something.lora_A.weight"], "Gentor LoRA", "u.safetensors")
