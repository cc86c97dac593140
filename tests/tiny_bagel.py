"""Tiny random-weight BAGEL-7B-MoT in the real on-disk layout (backend_specs.md §1.8).

``write(out_dir)`` -> ``out_dir/bagel/tiny-bagel/`` with ema.safetensors (every key of the real model,
tiny widths), ae.safetensors (original FLUX key names: ch 32, ch_mult 1,1,1,1, one res block, 16 latent
channels, 8x down), llm_config.json, vit_config.json (image_size 980 keeps the 70x70 position table) and
the tokenizer files (byte-level Qwen2 BPE with the real special tokens, from tests/tiny_models.py).
Real constants kept: latent patch 2 (64-dim latent tokens), latent table 64x64, ViT patch 14.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

FOLDER = "tiny-bagel"
SEED = 1234
LLM_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "model_type": "qwen2",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "max_window_layers": 2,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "use_cache": True,
    "use_sliding_window": False,
    "sliding_window": 4096,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "torch_dtype": "bfloat16",
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
}  # + vocab_size from the tokenizer
VIT_CONFIG = {
    "model_type": "siglip_vision_model",
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,  # 2 used
    "num_attention_heads": 2,
    "num_channels": 3,
    "image_size": 980,
    "patch_size": 14,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-06,
    "attention_dropout": 0.0,
}
AE_SIZES = {"ch": 32, "ch_mult": (1, 1, 1, 1), "num_res_blocks": 1}
# Small-image preprocessing for tests (GentorBagelSettings image_max_side / image_min_side).
TEST_MAX_SIDE = 64
TEST_MIN_SIDE = 32


def _bagel_modeling():
    from importlib import import_module

    from tests.tiny_common import import_pack  # the pack importable as ``gentor`` whatever its folder

    import_pack()
    return import_module("gentor.modeling.bagel")


def _save(module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(path))


def write(out_dir: Path, force: bool = False) -> dict[str, Path]:
    """Write the tiny BAGEL folder (atomically: nothing partial on failure); returns {"tiny-bagel": folder}."""
    from tests.tiny_common import atomic_folder

    return {FOLDER: atomic_folder(Path(out_dir) / "bagel" / FOLDER, _fill, force)}


def _fill(folder: Path) -> None:
    import torch

    from tests import tiny_models

    tok = tiny_models.build_qwen_tokenizer()
    tok.save_pretrained(str(folder))
    tiny_models._write_legacy_tokenizer_files(folder)  # vocab.json + merges.txt as in the real repo
    llm = dict(LLM_CONFIG, vocab_size=tiny_models.qwen_text_vocab_size())
    (folder / "llm_config.json").write_text(json.dumps(llm, indent=2), encoding="utf-8")
    (folder / "vit_config.json").write_text(json.dumps(VIT_CONFIG, indent=2), encoding="utf-8")

    mb = _bagel_modeling()
    cfg = mb.BagelConfig(mb.LLMConfig.from_dict(llm), mb.ViTConfig.from_dict(VIT_CONFIG),
                         mb.AEConfig(**AE_SIZES))
    torch.manual_seed(SEED)
    model = mb.Bagel(cfg)
    _randomise_norms(model, torch)
    model.vit_pos_embed.reset_table()
    model.latent_pos_embed.reset_table()
    _save(model, folder / "ema.safetensors")
    _save(mb.AutoEncoder(cfg.ae), folder / "ae.safetensors")


def _randomise_norms(model, torch) -> None:
    """Norm weights away from 1 so a test notices a norm applied with the wrong expert or not at all."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)


if __name__ == "__main__":
    print(write(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("tiny_out")))


def session_folder(tmp_path_factory) -> Path:
    """The tiny folder for a pytest session (GENTOR_TINY_DIR reuses a written kit)."""
    import os

    root = os.environ.get("GENTOR_TINY_DIR")
    out = Path(root) if root else tmp_path_factory.getbasetemp() / "tiny_bagel_models"
    return write(out)[FOLDER]


def load_plain(folder: Path, dtype=None):
    """(Bagel, AutoEncoder, tokenizer) read with plain ``load_state_dict(strict=True)`` — no pack loader."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    mb = _bagel_modeling()
    llm = mb.LLMConfig.from_dict(json.loads((folder / "llm_config.json").read_text()))
    vit = mb.ViTConfig.from_dict(json.loads((folder / "vit_config.json").read_text()))
    ae_sd = load_file(str(folder / "ae.safetensors"))
    ae_cfg = mb.AEConfig.from_shapes({k: tuple(v.shape) for k, v in ae_sd.items()})
    model = mb.Bagel(mb.BagelConfig(llm, vit, ae_cfg))
    model.load_state_dict(load_file(str(folder / "ema.safetensors")), strict=True)
    ae = mb.AutoEncoder(ae_cfg)
    ae.load_state_dict(ae_sd, strict=True)
    dtype = dtype or torch.float32
    return model.to(dtype).eval(), ae.to(dtype).eval(), AutoTokenizer.from_pretrained(str(folder))
