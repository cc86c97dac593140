"""Tiny random-weight DeepGen 1.0 kit in the real on-disk layouts (backend_specs.md §2.8).

``write(out_dir)`` writes, and returns ``{name: path}`` for:

- ``out_dir/deepgen/tiny-deepgen/``: the diffusion folder (``transformer/``, ``vae/``, ``scheduler/`` as
  diffusers ``save_pretrained`` writes them, plus ``model_index.json``), the official-style checkpoint
  ``model.pt`` (a flat torch state dict: ``connector.*``, ``projector_{1,2,3}.*``, ``meta_queries``,
  ``transformer.*`` -- its DiT differs from the folder's, as the trained DiT does) and
  ``model-lora.safetensors`` (the same plus PEFT LoRA keys ``lmm.*lora*`` for the VLM);
- ``out_dir/deepgen/tiny-deepgen-diffusers/``: the single diffusers-form folder (safetensors only):
  ``model_index.json``, ``transformer/`` (the checkpoint's DiT), ``vae/``, ``scheduler/``, ``connector/``
  (bridge tensors, official names);
- ``out_dir/vlm/tiny-qwen2.5-vl-36l/``: a Qwen2.5-VL with 36 text layers (so six hidden states are
  selected), text hidden 32, with the tiny Qwen tokenizer and processor files.

Weights are random but deterministic. Folders are written to a temporary sibling and renamed into place
(with a ``.complete`` marker); complete folders are skipped.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DEEPGEN_FOLDER = "deepgen"
VLM_FOLDER = "vlm"
CHECKPOINT_FOLDER = "tiny-deepgen"
DIFFUSERS_FOLDER = "tiny-deepgen-diffusers"
VLM_NAME = "tiny-qwen2.5-vl-36l"
CHECKPOINT_FILE = "model.pt"
LORA_CHECKPOINT_FILE = "model-lora.safetensors"
COMPLETE = ".complete"

VLM_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 36, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [1, 1, 2]}}
VLM_VISION = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 32,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
              "fullatt_block_indexes": [1], "tokens_per_second": 2}
TRANSFORMER = {"sample_size": 32, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 2,
               "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32,
               "caption_projection_dim": 16, "pooled_projection_dim": 24, "pos_embed_max_size": 48,
               "dual_attention_layers": (0,), "qk_norm": "rms_norm"}
VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
       "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [8, 8, 8, 8], "layers_per_block": 1,
       "latent_channels": 16, "norm_num_groups": 4, "use_quant_conv": False, "use_post_quant_conv": False,
       "scaling_factor": 1.5305, "shift_factor": 0.0609}
SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}
# Bridge: llm hidden 32 (= VLM), 8 queries, connector 128 wide (2 heads of 64), MLP 96, 2 layers.
BRIDGE = {"llm_hidden": 32, "num_queries": 8, "hidden": 128, "intermediate": 96, "num_layers": 2,
          "num_heads": 2, "pooled_dim": 24, "joint_dim": 32}
LORA_RANK = 4
LORA_TARGETS = ("q_proj", "v_proj", "qkv")  # language q/v projections and the vision blocks' qkv


def _atomic(final: Path, fill: Callable[[Path], None], force: bool = False) -> Path:
    if (final / COMPLETE).is_file() and not force:
        return final
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        (tmp / COMPLETE).write_text(final.name + "\n")
        if final.exists():
            shutil.rmtree(final)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / COMPLETE).is_file():  # lost a race against another writer: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def build_vlm(hidden: int = VLM_TEXT["hidden_size"], layers: int = VLM_TEXT["num_hidden_layers"], seed: int = 11):
    """A tiny Qwen2_5_VLForConditionalGeneration with the tiny Qwen tokenizer's special ids."""
    import torch
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from tests.tiny_models import qwen_text_vocab_size, qwen_token_ids

    ids = qwen_token_ids()
    text = dict(VLM_TEXT, hidden_size=hidden, num_hidden_layers=layers, vocab_size=qwen_text_vocab_size(),
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"])
    config = Qwen2_5_VLConfig(text_config=text, vision_config=dict(VLM_VISION, out_hidden_size=hidden),
                              image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                              vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                              tie_word_embeddings=True)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def write_vlm(folder: Path, hidden: int = VLM_TEXT["hidden_size"], layers: int = VLM_TEXT["num_hidden_layers"],
              force: bool = False) -> Path:
    """A Qwen2.5-VL folder as on the hub: config, safetensors, tokenizer and processor files."""
    from tests.tiny_models import _import_libs, _write_legacy_tokenizer_files, build_qwen_processor, build_qwen_tokenizer

    _import_libs()

    def fill(tmp: Path) -> None:
        build_vlm(hidden, layers).save_pretrained(tmp, safe_serialization=True)
        build_qwen_processor(build_qwen_tokenizer()).save_pretrained(tmp)
        _write_legacy_tokenizer_files(tmp)

    return _atomic(folder, fill, force)


def build_transformer(seed: int):
    import torch
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(**TRANSFORMER).eval()
    with torch.no_grad():  # AdaLN / output layers start at zero in diffusers: give them values
        for name, p in model.named_parameters():
            if p.abs().sum() == 0 and p.ndim > 0:
                p.normal_(0.0, 0.05)
    return model


def bridge_state(seed: int = 21) -> dict:
    """Bridge tensors under the official names, written out by hand (independent of the pack's module)."""
    import torch

    b = BRIDGE
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        scale = 0.3 if len(shape) == 1 else 1.0 / shape[-1] ** 0.5
        return torch.randn(*shape, generator=g) * scale

    state = {"meta_queries": torch.randn(b["num_queries"], b["llm_hidden"], generator=g),
             "projector_1.weight": rand(b["hidden"], 6 * b["llm_hidden"]), "projector_1.bias": rand(b["hidden"]),
             "projector_2.weight": rand(b["pooled_dim"], b["hidden"]), "projector_2.bias": rand(b["pooled_dim"]),
             "projector_3.weight": rand(b["joint_dim"], b["hidden"]), "projector_3.bias": rand(b["joint_dim"])}
    h, m = b["hidden"], b["intermediate"]
    for i in range(b["num_layers"]):
        pre = f"connector.layers.{i}."
        for norm in ("layer_norm1", "layer_norm2"):
            state[pre + norm + ".weight"] = 1.0 + rand(h)
            state[pre + norm + ".bias"] = rand(h)
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state[pre + f"self_attn.{proj}.weight"] = rand(h, h)
            state[pre + f"self_attn.{proj}.bias"] = rand(h)
        state[pre + "mlp.fc1.weight"], state[pre + "mlp.fc1.bias"] = rand(m, h), rand(m)
        state[pre + "mlp.fc2.weight"], state[pre + "mlp.fc2.bias"] = rand(h, m), rand(h)
    return state


def lora_state(seed: int = 31) -> dict:
    """PEFT LoRA tensors for the tiny VLM under the official ``lmm.`` prefix (B non-zero, so it matters)."""
    import torch
    from peft import LoraConfig

    vlm = build_vlm()
    vlm.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=list(LORA_TARGETS),
                               init_lora_weights="gaussian"))
    torch.manual_seed(seed)
    out = {}
    for name, p in vlm.named_parameters():
        if "lora_" in name:
            with torch.no_grad():
                p.normal_(0.0, 0.2)
            out["lmm." + name] = p.detach().clone().contiguous()
    if not out:
        raise RuntimeError("tiny DeepGen: no LoRA tensors were created")
    return out


def _scheduler_and_vae(tmp: Path) -> None:
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler

    torch.manual_seed(5)
    AutoencoderKL(**VAE).eval().save_pretrained(tmp / "vae", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_pretrained(tmp / "scheduler")


def checkpoint_state() -> dict:
    """The official-style checkpoint: bridge + the trained DiT under ``transformer.``."""
    state = bridge_state()
    state.update({f"transformer.{k}": v.detach().clone().contiguous()
                  for k, v in build_transformer(seed=41).state_dict().items()})
    return state


def write(out_dir: Path, force: bool = False) -> dict[str, Path]:
    """Write the three tiny DeepGen folders (complete ones are kept unless ``force``); return ``{name: path}``."""
    from tests.tiny_models import _import_libs

    torch = _import_libs()
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    deepgen, vlm = out_dir / DEEPGEN_FOLDER, out_dir / VLM_FOLDER
    deepgen.mkdir(parents=True, exist_ok=True)
    vlm.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": "StableDiffusion3Pipeline", "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"]}

    def fill_checkpoint(tmp: Path) -> None:
        build_transformer(seed=2).save_pretrained(tmp / "transformer", safe_serialization=True)
        _scheduler_and_vae(tmp)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        state = checkpoint_state()
        torch.save(state, tmp / CHECKPOINT_FILE)
        save_file({**state, **lora_state()}, str(tmp / LORA_CHECKPOINT_FILE))

    def fill_diffusers(tmp: Path) -> None:
        state = checkpoint_state()
        transformer = build_transformer(seed=2)
        transformer.load_state_dict({k[len("transformer."):]: v for k, v in state.items()
                                     if k.startswith("transformer.")})
        transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        _scheduler_and_vae(tmp)
        (tmp / "connector").mkdir()
        save_file({k: v for k, v in state.items() if not k.startswith("transformer.")},
                  str(tmp / "connector" / "diffusion_pytorch_model.safetensors"))
        (tmp / "connector" / "config.json").write_text(json.dumps(dict(BRIDGE), indent=2))
        (tmp / "model_index.json").write_text(json.dumps(
            dict(index, _class_name="DeepGenPipeline", connector=["deepgen_pipeline", "DeepGenConnector"]), indent=2))

    return {
        CHECKPOINT_FOLDER: _atomic(deepgen / CHECKPOINT_FOLDER, fill_checkpoint, force),
        DIFFUSERS_FOLDER: _atomic(deepgen / DIFFUSERS_FOLDER, fill_diffusers, force),
        VLM_NAME: write_vlm(vlm / VLM_NAME, force=force),
    }


if __name__ == "__main__":
    import sys

    for name, path in write(Path(sys.argv[1])).items():
        print(f"{name}\t{path}")
