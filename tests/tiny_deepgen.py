"""Tiny random-weight DeepGen 1.0 kit in the real on-disk layouts (backend_specs.md §2.8).

``write(out_dir)`` writes, and returns ``{name: path}`` for:

- ``out_dir/deepgen/tiny-deepgen/``: the diffusion folder (``transformer/``, ``vae/``, ``scheduler/`` as
  diffusers ``save_pretrained`` writes them, plus ``model_index.json``), the official-style checkpoint
  ``model.pt`` (a flat torch state dict: ``connector.*``, ``projector_{1,2,3}.*``, ``meta_queries``,
  ``transformer.*`` -- its DiT differs from the folder's, as the trained DiT does) and
  ``model-lora.safetensors`` (the same plus the SFT LoRA of the VLM under ``lmm.``: rank 64 on every
  ``nn.Linear`` and ``nn.Embedding`` of the Qwen2.5-VL, as the official ``lora_modules='auto'`` picks them);
- ``out_dir/deepgen/tiny-deepgen-diffusers/``: the ``deepgenteam/DeepGen-1.0-diffusers`` layout (safetensors
  only; its ``deepgen_pipeline.py`` is never written nor run): ``model_index.json``, ``transformer/`` (the
  checkpoint's DiT), ``vae/``, ``scheduler/``, ``connector/model.safetensors`` (the 7 + 16 x layers bridge
  tensors under their official names, float32) and ``vlm/`` (a Qwen2.5-VL folder, two shards + index, whose
  weights are the base VLM with the LoRA above merged in: W + (alpha / r) B A, alpha 128, r 64);
- ``out_dir/vlm/tiny-qwen2.5-vl-36l/``: a Qwen2.5-VL with 36 text layers (so six hidden states are
  selected), text hidden 32, with the tiny Qwen tokenizer and processor files.

Facts behind the layout. The released diffusers folder (hub revision 85c2ed25, as public scripts that download
and audit it record) holds ``connector/model.safetensors`` (103 tensors, 432,449,532 values: our bridge at
the released sizes, checked in test_deepgen_modeling), ``transformer/`` and ``vae/``
(``diffusion_pytorch_model.safetensors``: 909 and 244 tensors), ``scheduler/``, ``vlm/``
(``model-0000{1,2}-of-00002.safetensors`` + index: 824 tensors / 3,754,622,976 values = Qwen2.5-VL-3B with
tied embeddings, re-sharded; DeepGen's VLM with its LoRA merged, per a public audit of
``deepgen_pipeline.py``), ``tokenizer/`` (``vocab.json``, ``merges.txt``, ``tokenizer_config.json``: the hub's
file pages), ``model_index.json`` (pipeline class ``DeepGenPipeline``) and ``deepgen_pipeline.py``.
The LoRA settings are deepgenteam/deepgen's (e6cb0c2) ``configs/finetune/deepgen_joint_sft_scb.py``: r 64,
alpha 128, targets = every Linear / Embedding of the VLM. Not known: whether ``vlm/`` also ships tokenizer
files, whether ``connector/`` has a config, and the component entries of ``model_index.json``; the kit writes
tokenizer files into ``vlm/`` as well as ``tokenizer/``, ``connector/config.json`` (the head count, which the
weights do not hold) and only ``_class_name`` in the index (the loader reads neither the index nor the pipeline
script; tests remove the optional files to check each layout).

Weights are random but deterministic. Folders are written to a temporary sibling and renamed into place
(with a ``.complete`` marker); complete folders are skipped.
"""
from __future__ import annotations

import functools
import json
import os
import warnings
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
# Bridge: llm hidden 32 (= VLM), 8 queries, connector 128 wide (4 heads of 32: not the released head size 64, so
# a loader that assumed it would compute with 2 heads), MLP 96, 2 layers.
BRIDGE = {"llm_hidden": 32, "num_queries": 8, "hidden": 128, "intermediate": 96, "num_layers": 2,
          "num_heads": 4, "pooled_dim": 24, "joint_dim": 32}
CONNECTOR_FILE = "connector/model.safetensors"
# The head count is not in the weights: connector/config.json (DeepGen's ConnectorConfig fields) gives it, beside
# model.pt and in the diffusers folder.
CONNECTOR_CONFIG_FILE = "connector/config.json"
CONNECTOR_CONFIG = {"hidden_size": BRIDGE["hidden"], "intermediate_size": BRIDGE["intermediate"],
                    "num_hidden_layers": BRIDGE["num_layers"], "num_attention_heads": BRIDGE["num_heads"],
                    "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}
TOKENIZER_SUBFOLDER = "tokenizer"  # the published diffusers folder has tokenizer/ at the top level
VLM_SUBFOLDER = "vlm"
LORA_RANK = 64  # official SFT config: lora_rank 64, lora_alpha 128 (configs/finetune/deepgen_joint_sft_scb.py)
LORA_ALPHA = 128
LORA_STD = 0.03  # spread of the random LoRA factors: a visible but moderate change of the VLM
VLM_SHARD_SIZE = "200KB"  # forces two shards + index, as the released vlm/ has


def _atomic(final: Path, fill: Callable[[Path], None], force: bool = False) -> Path:
    from tests.tiny_common import atomic_folder

    return atomic_folder(final, fill, force)


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


def lora_targets(vlm) -> list[str]:
    """Every ``nn.Linear`` and ``nn.Embedding`` of the VLM by full name: the official ``lora_modules='auto'``."""
    import torch

    return [n for n, m in vlm.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))]


@functools.lru_cache(maxsize=2)  # both folders use it; callers only read the tensors
def lora_state(seed: int = 31) -> dict:
    """PEFT LoRA tensors (PEFT's own names) for the tiny VLM under the official ``lmm.`` prefix, B non-zero."""
    import torch
    from peft import LoraConfig, inject_adapter_in_model

    vlm = build_vlm()
    with warnings.catch_warnings():  # adapters on the tied embed_tokens / lm_head are intended (as trained)
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*", category=UserWarning)
        inject_adapter_in_model(LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, target_modules=lora_targets(vlm),
                                           init_lora_weights="gaussian"), vlm)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in vlm.named_parameters():
        if "lora_" in name:
            out["lmm." + name] = (torch.randn(p.shape, generator=g) * LORA_STD).contiguous()
    if not out:
        raise RuntimeError("tiny DeepGen: no LoRA tensors were created")
    return out


def merged_vlm(lora: dict):
    """The base tiny VLM with the LoRA folded in by the plain formula W + (alpha / r) * B @ A.

    An embedding's delta is (B @ A)^T ([vocab, hidden]). The lm_head delta is left out: the tiny VLM ties
    lm_head to the embedding (as Qwen2.5-VL-3B does, and the released vlm/ keeps one tensor for both), and
    DeepGen reads hidden states only, never logits.
    """
    import torch

    vlm = build_vlm()
    params = dict(vlm.named_parameters())
    scale = LORA_ALPHA / LORA_RANK
    names = {k[len("lmm."):].split(".lora_")[0] for k in lora}
    with torch.no_grad():
        for name in sorted(names):
            if name == "lm_head":
                continue
            pre = f"lmm.{name}."
            if pre + "lora_A.default.weight" in lora:
                delta = lora[pre + "lora_B.default.weight"] @ lora[pre + "lora_A.default.weight"]
            else:
                delta = (lora[pre + "lora_embedding_B.default"] @ lora[pre + "lora_embedding_A.default"]).T
            params[name + ".weight"].add_(scale * delta)
    return vlm


def write_merged_vlm(folder: Path, lora: dict) -> None:
    """``vlm/`` of the diffusers form: config + two safetensors shards + index, tokenizer and processor files."""
    from tests.tiny_models import _write_legacy_tokenizer_files, build_qwen_processor, build_qwen_tokenizer

    vlm = merged_vlm(lora)
    total = sum(p.numel() * p.element_size() for p in vlm.parameters())
    vlm.save_pretrained(folder, safe_serialization=True, max_shard_size=int(total * 0.6))
    build_qwen_processor(build_qwen_tokenizer()).save_pretrained(folder)
    _write_legacy_tokenizer_files(folder)


def write_connector_config(folder: Path) -> None:
    (folder / CONNECTOR_CONFIG_FILE).parent.mkdir(parents=True, exist_ok=True)
    (folder / CONNECTOR_CONFIG_FILE).write_text(json.dumps(CONNECTOR_CONFIG, indent=2))


def write_tokenizer(folder: Path) -> None:
    """The top-level ``tokenizer/`` of the diffusers form: vocab.json, merges.txt, tokenizer_config.json."""
    from tests.tiny_models import _write_legacy_tokenizer_files, build_qwen_tokenizer

    build_qwen_tokenizer().save_pretrained(folder)
    _write_legacy_tokenizer_files(folder)


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
        write_connector_config(tmp)
        save_file({**state, **lora_state()}, str(tmp / LORA_CHECKPOINT_FILE))

    def fill_diffusers(tmp: Path) -> None:
        state = checkpoint_state()
        transformer = build_transformer(seed=2)
        transformer.load_state_dict({k[len("transformer."):]: v for k, v in state.items()
                                     if k.startswith("transformer.")})
        transformer.save_pretrained(tmp / "transformer", safe_serialization=True)
        _scheduler_and_vae(tmp)
        (tmp / "connector").mkdir()
        save_file({k: v.float() for k, v in state.items() if not k.startswith("transformer.")},
                  str(tmp / CONNECTOR_FILE), metadata={"format": "pt"})
        write_connector_config(tmp)
        write_merged_vlm(tmp / VLM_SUBFOLDER, lora_state())
        write_tokenizer(tmp / TOKENIZER_SUBFOLDER)
        # Only the pipeline class is known of the released index; Gentor reads none of it.
        (tmp / "model_index.json").write_text(json.dumps(
            {"_class_name": "DeepGenPipeline", "_diffusers_version": index["_diffusers_version"]}, indent=2))

    return {
        CHECKPOINT_FOLDER: _atomic(deepgen / CHECKPOINT_FOLDER, fill_checkpoint, force),
        DIFFUSERS_FOLDER: _atomic(deepgen / DIFFUSERS_FOLDER, fill_diffusers, force),
        VLM_NAME: write_vlm(vlm / VLM_NAME, force=force),
    }


if __name__ == "__main__":
    import sys

    for name, path in write(Path(sys.argv[1])).items():
        print(f"{name}\t{path}")
