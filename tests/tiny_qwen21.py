"""Tiny Qwen-Image 2.1 pipeline (QwenImage21Pipeline) in the real diffusers folder layout.

    python -m tests.tiny_models --out DIR --backend qwen_image   (writes DIR/qwen_image/tiny-qwen-image-2.1/)

Components: ``QwenImage21Transformer2DModel`` (single-stream, block-causal; 2 layers, head_dim 32 = sum of the
RoPE axes), ``AutoencoderKLQwenImage21`` (real z_dim 64, 16x spatial compression, RGBA in/out; tiny channels),
``Qwen3VLForConditionalGeneration`` + ``Qwen3VLProcessor`` (the tiny Qwen3-VL of tests/tiny_vlm.py, so its
text encoder folder is the same architecture the prompt enhancer loads) and the scheduler.
"""
from __future__ import annotations

from pathlib import Path

FOLDER = "qwen_image"
VARIANT = "tiny-qwen-image-2.1"
TEXT_HIDDEN = 64  # tests/tiny_vlm.py TEXT hidden_size (= the transformer's context_in_dim)
TRANSFORMER_CONFIG = {"patch_size": 1, "in_channels": 64, "out_channels": 64, "num_layers": 2,
                      "attention_head_dim": 32, "num_attention_heads": 2, "context_in_dim": TEXT_HIDDEN,
                      "mlp_ratio": 3, "axes_dims_rope": (8, 12, 12), "causal_condition": True}
# Real z_dim 64 and 4 spatial downsamples (16x); tiny channels.
VAE_CONFIG = {"base_dim": 8, "decoder_base_dim": 8, "z_dim": 64, "dim_mult": [1, 2, 2, 2, 2], "num_res_blocks": 1,
              "temperal_downsample": [False, True, True, True]}
# The pipeline's own shift defaults (calculate_shift: 256 -> 0.5, 4096 -> 1.15); not checked against the hub files.
SCHEDULER_CONFIG = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15,
                    "use_dynamic_shifting": True, "time_shift_type": "exponential", "num_train_timesteps": 1000,
                    "shift": 1.0}
SEEDS = {"transformer": 31, "vae": 32}


def build_pipeline():
    import diffusers
    import torch

    from tests import tiny_vlm

    torch.manual_seed(SEEDS["transformer"])
    transformer = diffusers.QwenImage21Transformer2DModel(**TRANSFORMER_CONFIG).eval()
    torch.manual_seed(SEEDS["vae"])
    vae = diffusers.AutoencoderKLQwenImage21(**VAE_CONFIG).eval()
    return diffusers.QwenImage21Pipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG), vae=vae,
        text_encoder=tiny_vlm.build_model(tiny_vlm.QWEN3_VL), processor=tiny_vlm.build_processor(tiny_vlm.QWEN3_VL),
        transformer=transformer)


def write(out_dir: Path | str, force: bool = False) -> dict[str, Path]:
    """Write the tiny 2.1 pipeline folder (atomically; skipped when complete unless ``force``)."""
    from tests.tiny_common import atomic_folder

    def fill(tmp: Path) -> None:
        build_pipeline().save_pretrained(tmp, safe_serialization=True)

    return {VARIANT: atomic_folder(Path(out_dir) / FOLDER / VARIANT, fill, force)}
