"""Bad Comfy-format Qwen-Image files (issue 19 part 5): each must be refused with a clear error naming the file.

Written from a tiny_comfy.py pipeline folder with its writers (nothing here imports the pack's loaders).
"""
from __future__ import annotations

import json
from pathlib import Path

from tests.tiny_comfy import _is_linear, _save, _torch, read_component, transformer_file_state_dict, \
    write_transformer_file



def write_truncated(src: Path | str, dst: Path | str, keep_fraction: float = 0.5) -> Path:
    """A copy of ``src`` cut short (an interrupted download): header intact, data missing."""
    data = Path(src).read_bytes()
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_bytes(data[: max(16, int(len(data) * keep_fraction))])
    return dst


def write_scaled_missing_scales(folder: Path | str, path: Path | str, form: str = "fp8_scaled_old") -> Path:
    """A scaled-FP8 transformer file whose per-layer scales were dropped (FP8 weights that cannot be rescaled)."""
    sd, metadata = transformer_file_state_dict(folder, form)
    sd = {k: v for k, v in sd.items() if not k.endswith((".scale_weight", ".weight_scale"))}
    return _save(sd, path, metadata)


def write_int8_convrot(folder: Path | str, path: Path | str) -> Path:
    """A transformer in an int8 format the pack does not read (``comfy_quant`` format ``int8_convrot``, int8
    weights + per-row ``weight_scale``; some community Edit-2511 files)."""
    torch = _torch()
    out: dict = {}
    for name, t in read_component(folder, "transformer").items():
        if _is_linear(name, t):
            layer = name[: -len(".weight")]
            scale = (t.float().abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-12)
            out[name] = (t.float() / scale).round().clamp(-127, 127).to(torch.int8)
            out[f"{layer}.weight_scale"] = scale.float()
            conf = {"format": "int8_convrot"}
            out[f"{layer}.comfy_quant"] = torch.tensor(list(json.dumps(conf).encode("utf-8")), dtype=torch.uint8)
        else:
            out[name] = t.to(torch.bfloat16)
    return _save(out, path)


def write_t5_text_encoder(path: Path | str, layers: int = 1, d_model: int = 64) -> Path:
    """A tiny T5 encoder file in ComfyUI's ``t5xxl`` layout (``encoder.block.N.layer.*``, ``shared.weight``)."""
    torch = _torch()
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(5)
    model = T5EncoderModel(T5Config(vocab_size=256, d_model=d_model, d_kv=16, d_ff=128, num_layers=layers,
                                    num_heads=4, feed_forward_proj="gated-gelu"))
    return _save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()
                  if k != "encoder.embed_tokens.weight"}, path)


def write_qwen3_text_encoder(path: Path | str) -> Path:
    """A tiny Qwen3 text-encoder file (``model.layers.N.self_attn.q_norm``, no k_proj bias), the layout of the
    Qwen3 files other models use (e.g. Z-Image's ``qwen_3_4b.safetensors``)."""
    torch = _torch()
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(7)
    model = Qwen3ForCausalLM(Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, head_dim=32))
    return _save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, path)


def write_bad_files(folder: Path | str, out_dir: Path | str) -> dict[str, Path]:
    """Every bad input of issue 19 part 5 for ``folder``; returns {kind: path}."""
    from tests.tiny_comfy_gguf import write_other_arch_gguf

    out_dir = Path(out_dir)
    good = write_transformer_file(folder, out_dir / "good" / "qwen_image_bf16.safetensors", "bf16")
    return {
        "truncated": write_truncated(good, out_dir / "diffusion_models" / "qwen_image_truncated.safetensors"),
        "gguf_other_arch": write_other_arch_gguf(out_dir / "unet" / "flux1-dev-Q8_0.gguf"),
        "t5_text_encoder": write_t5_text_encoder(out_dir / "text_encoders" / "t5xxl_fp16.safetensors"),
        "qwen3_text_encoder": write_qwen3_text_encoder(out_dir / "text_encoders" / "qwen_3_4b.safetensors"),
        "scaled_missing_scales": write_scaled_missing_scales(
            folder, out_dir / "diffusion_models" / "qwen_image_fp8_scaled_noscale.safetensors"),
        "scaled_missing_scales_v2": write_scaled_missing_scales(
            folder, out_dir / "diffusion_models" / "qwen_image_fp8mixed_noscale.safetensors", "fp8_mixed"),
        "int8_convrot": write_int8_convrot(
            folder, out_dir / "diffusion_models" / "qwen_image_edit_2511_int8.safetensors"),
    }
