"""Qwen-Image from ComfyUI's own files (issue 19): every form gives the diffusers folder's image.

The files are written by tests/tiny_comfy.py (independent of the loader under test: real-config tiny models, the
published key layouts, GGUF through the gguf package's writer); the loader and sampler are the real ones.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from gentor import glue
from gentor.errors import GentorError, InputError, ModelFolderError
from gentor.loaders import qwen_image as folder_loader
from gentor.loaders import qwen_image_files as files_loader
from gentor.loaders.cache import CACHE
from gentor.loaders.comfy_files import read_header
from gentor.loaders.comfy_quant import ScaledFP8Linear, dequantize_scaled
from gentor.loaders.memory import MemoryOptions
from gentor.samplers import qwen_image as sampler
from gentor.samplers.common import Request
from tests import tiny_comfy as kit
from tests import tiny_comfy_bad
from tests.qwen_helpers import picture, rel_err

SIZE, STEPS = 32, 2
TE_BF16, TE_FP8 = "qwen_2.5_vl_7b.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors"
VAE = "qwen_image_vae.safetensors"
FP8_TOLERANCE = 1e-2  # as tests/test_memory_options.py for fp8_e4m3fn storage
# Measured on this kit (relative L2 error of the image vs the bf16 folder's; 2 steps, 32 px, fp32 compute, CPU):
# Q8_0 1.15e-3, Q6_K 2.75e-3, Q5_K_M 7.0e-3, Q4_K_M 1.44e-2, Q4_0 1.64e-2. Bounds: about twice the measured error.
GGUF_TOLERANCE = {"Q8_0": 2.5e-3, "Q6_K": 6e-3, "Q5_K_M": 1.5e-2, "Q4_K_M": 3e-2, "Q4_0": 3.5e-2}
# A LoRA (~7 % change of the image) on top of scaled FP8 storage: measured 1.08e-2 once the kit's scaled files
# scale every Linear layer as ComfyUI 0.3.64 expects (the plain FP8 bound was set before that); bound 1.5x that.
FP8_LORA_TOLERANCE = 1.6e-2
FORMAT_FILES = {f: f"qwen_image_{kit._FORMAT_SUFFIX[f]}.safetensors" for f in kit.TRANSFORMER_FORMATS}


@pytest.fixture(scope="module")
def comfy(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The tiny T2I and Edit-2511 folders, ComfyUI's model folders with their files in every form, bad files."""
    from tests.tiny_comfy_gguf import FILE_TYPES
    from tests.tiny_comfy_tokenizer import write_qwen25_tokenizer

    out = Path(os.environ.get("GENTOR_TINY_DIR") or tmp_path_factory.mktemp("comfy")) / "comfy_files_test"
    folders = kit.write_comfy_qwen_image(out, [kit.T2I, kit.EDIT_2511])
    models = out / "comfyui_models"
    if not (models / kit.COMPLETE_MARKER).is_file():
        kit.comfy_files(folders[kit.T2I], models, kit.TRANSFORMER_FORMATS, [t for t in FILE_TYPES if t != "BF16"],
                        text_encoder_formats=("bf16", "fp8_scaled"))
        kit.comfy_files(folders[kit.EDIT_2511], models, ("bf16",), text_encoder_formats=())
        write_qwen25_tokenizer(models / "comfy_text_encoders" / files_loader.TOKENIZER)
        tiny_comfy_bad.write_bad_files(folders[kit.T2I], out / "bad")
        (models / kit.COMPLETE_MARKER).write_text("ok\n")
    return {"folders": folders, "models": models, "bad": out / "bad", "root": out}


@pytest.fixture()
def roots(comfy: dict):
    models = comfy["models"]
    glue.set_fallback_roots("diffusion_models", [models / "diffusion_models"])
    glue.set_fallback_roots("unet", [models / "unet"])
    glue.set_fallback_roots("text_encoders", [models / "text_encoders", comfy["bad"] / "text_encoders"])
    glue.set_fallback_roots("clip", [])
    glue.set_fallback_roots("vae", [models / "vae"])
    glue.set_fallback_roots(glue.BUNDLED_TOKENIZERS_KEY, [models / "comfy_text_encoders"])
    glue.set_fallback_roots("qwen_image", [comfy["root"] / kit.FOLDER])
    glue.set_fallback_roots("diffusers", [])
    yield comfy
    CACHE.unload()


def request(**kw) -> Request:
    return Request(**{"prompt": "a red fox sitting in fresh snow", "seed": 7, "steps": STEPS, "width": SIZE,
                      "height": SIZE, **kw})


def folder_image(name: str = kit.T2I, task: str = "t2i", memory: MemoryOptions | None = None, **kw) -> torch.Tensor:
    return sampler.run(folder_loader.load_handle(name, memory), task, request(**kw)).image


def files_image(dm: str, te: str = TE_BF16, task: str = "t2i", memory: MemoryOptions | None = None,
                variant: str = "auto", **kw):
    handle = files_loader.load_handle(dm, te, VAE, memory, "diffusers", variant)
    return sampler.run(handle, task, request(**kw))


@pytest.fixture()
def reference(roots) -> torch.Tensor:
    return folder_image()


def transformer_entry():
    return next(e for e in CACHE.entries("qwen_image_transformer") if e.source.endswith((".safetensors", ".gguf")))


def test_combos_list_only_files_of_the_right_kind(roots):
    transformers = files_loader.list_transformers()
    assert set(FORMAT_FILES.values()) <= set(transformers)
    assert {"qwen_image-Q8_0.gguf", "qwen_image-Q4_K_M.gguf"} <= set(transformers)  # unet/ is listed too
    assert files_loader.list_text_encoders() == sorted([TE_BF16, TE_FP8])  # the T5 / Qwen3 files are left out
    assert files_loader.list_vaes() == [VAE]


def test_bf16_file_gives_the_folders_image(reference):
    result = files_image(FORMAT_FILES["bf16"])
    assert torch.equal(result.image, reference)
    assert "qwen-image-1.x" in result.text


def test_fp16_file_and_fp8_text_encoder_stay_close(reference):
    assert rel_err(files_image(FORMAT_FILES["fp16"]).image, reference) < 1e-3
    assert rel_err(files_image(FORMAT_FILES["bf16"], TE_FP8).image, reference) < FP8_TOLERANCE


@pytest.mark.parametrize("form", ["fp8_e4m3fn", "fp8_scaled_old", "fp8_scaled", "fp8_mixed", "fp8_scaled_metadata"])
def test_fp8_files_within_fp8_tolerance_and_keep_their_stored_form(reference, form):
    path = Path(files_loader.resolve_file("Qwen-Image", "diffusion_model", FORMAT_FILES[form],
                                          files_loader.DIFFUSION_KEYS))
    image = files_image(FORMAT_FILES[form]).image
    assert rel_err(image, reference) < FP8_TOLERANCE
    module = transformer_entry().value
    fp8 = sum(p.numel() for p in module.parameters() if p.dtype == torch.float8_e4m3fn)
    assert fp8 > 0.8 * sum(p.numel() for n, p in module.named_parameters() if ".weight" in n and p.ndim == 2
                           and n.startswith("transformer_blocks.")) * (0.5 if form == "fp8_mixed" else 1)
    if form != "fp8_e4m3fn":
        scaled = [m for m in module.modules() if isinstance(m, ScaledFP8Linear)]
        assert scaled and all(m.weight.dtype == torch.float8_e4m3fn and m.weight_scale.dtype == torch.float32
                              for m in scaled)
        # The file's FP8 weights rest as stored, byte for byte in size.
        header = read_header(path, "test", "file")
        stored = sum(math.prod(header.shapes[k]) for k, d in header.dtypes.items() if d == "F8_E4M3" and
                     len(header.shapes[k]) == 2)
        assert fp8 == stored


def test_scale_multiply_reproduces_the_original_weights(roots):
    """The one hand-written piece: fp8 weight x scale against the bf16 weights the producer started from."""
    from safetensors.torch import load_file

    files = roots["models"] / "diffusion_models"
    scaled = load_file(str(files / FORMAT_FILES["fp8_scaled_old"]))
    original = kit.read_component(roots["folders"][kit.T2I], "transformer")
    layer = "transformer_blocks.0.attn.to_q"
    rebuilt = dequantize_scaled(scaled[f"{layer}.weight"], scaled[f"{layer}.scale_weight"], torch.float32)
    target = original[f"{layer}.weight"].float()
    assert rel_err(rebuilt, target) < 0.05  # e4m3: 3 mantissa bits
    assert rel_err(scaled[f"{layer}.weight"].float(), target) > 1.0  # the scale matters


@pytest.mark.parametrize("qtype", ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"])
def test_gguf_files_within_measured_bounds_and_rest_quantised(reference, qtype):
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    name = f"qwen_image-{qtype}.gguf"
    image = files_image(name).image
    err = rel_err(image, reference)
    print(f"GGUF {qtype}: relative error {err:.2e}")  # the measured figure the README quotes (pytest -s)
    assert err < GGUF_TOLERANCE[qtype], err
    entry = transformer_entry()
    quantised = [m for m in entry.value.modules() if isinstance(m, GGUFLinear)]
    assert quantised and all(isinstance(m.weight, GGUFParameter) for m in quantised)
    size = (roots_file := Path(entry.source)).stat().st_size
    assert entry.nbytes < 1.3 * size, (entry.nbytes, size, roots_file)  # dequantised per forward, not at load


def test_gguf_under_block_offload_gives_the_same_image(roots):
    plain = files_image("qwen_image-Q8_0.gguf").image
    CACHE.unload()
    offloaded = files_image("qwen_image-Q8_0.gguf", memory=MemoryOptions(offload="block")).image
    assert torch.equal(plain, offloaded)


def test_edit_2511_file_is_detected_by_its_marker_and_matches_the_folder(roots):
    images = [picture(40, 32, 1)]
    want = folder_image(kit.EDIT_2511, "edit", images=images, prompt="make it blue")
    handle = files_loader.load_handle("qwen_image_edit_2511_bf16.safetensors", TE_BF16, VAE, None)
    assert handle.variant == "qwen-image-edit-2511" and handle.info_dict["zero_cond_t"] == "true"
    got = sampler.run(handle, "edit", request(images=images, prompt="make it blue")).image
    assert torch.equal(got, want)


def test_auto_variant_lets_the_task_node_pick_and_an_explicit_variant_is_kept(roots):
    handle = files_loader.load_handle(FORMAT_FILES["bf16"], TE_BF16, VAE, None)
    assert handle.variant == files_loader.AUTO_VARIANT
    assert files_loader.handle_task(handle, "t2i") == ("t2i", [])
    task, notes = files_loader.handle_task(handle, "edit")
    assert task == "edit_plus" and "Edit-2509's pipeline" in notes[0]
    with pytest.raises(InputError, match="cannot edit"):  # refused before any weight is read
        files_image(FORMAT_FILES["bf16"], task="edit", variant="qwen-image", images=[picture(32, 32, 2)])
    assert not CACHE.entries()


# ----------------------------------------------------------------------------- bad input
def _bad(path: Path, role: str) -> tuple[str, str, str]:
    """(diffusion_model, text_encoder, vae) with ``path`` in ``role`` (registered as a root of that role)."""
    keys = {"diffusion_model": ("diffusion_models", "unet"), "text_encoder": ("text_encoders",)}[role]
    for key in keys:
        glue.set_fallback_roots(key, glue.model_roots(key) + [str(path.parent)])
    trio = {"diffusion_model": FORMAT_FILES["bf16"], "text_encoder": TE_BF16}
    trio[role] = path.name
    return trio["diffusion_model"], trio["text_encoder"], VAE


@pytest.mark.parametrize("kind, role, words", [
    ("truncated", "diffusion_model", "truncated"),
    ("gguf_other_arch", "diffusion_model", "'flux'"),
    ("t5_text_encoder", "text_encoder", "T5"),
    ("qwen3_text_encoder", "text_encoder", "Qwen3"),
    ("scaled_missing_scales", "diffusion_model", "scales missing"),
    ("scaled_missing_scales_v2", "diffusion_model", "scales missing"),
    ("int8_convrot", "diffusion_model", "int8_convrot"),
])
def test_bad_files_are_refused_naming_the_file(roots, kind, role, words):
    files = {"truncated": "diffusion_models/qwen_image_truncated.safetensors", "gguf_other_arch": "unet/flux1-dev-Q8_0.gguf",
             "t5_text_encoder": "text_encoders/t5xxl_fp16.safetensors",
             "qwen3_text_encoder": "text_encoders/qwen_3_4b.safetensors",
             "scaled_missing_scales": "diffusion_models/qwen_image_fp8_scaled_noscale.safetensors",
             "scaled_missing_scales_v2": "diffusion_models/qwen_image_fp8mixed_noscale.safetensors",
             "int8_convrot": "diffusion_models/qwen_image_edit_2511_int8.safetensors"}
    path = roots["bad"] / files[kind]
    with pytest.raises(ModelFolderError) as err:
        files_loader.load_handle(*_bad(path, role), None)
    assert path.name in str(err.value) and words in str(err.value)
    assert not CACHE.entries()  # refused before any weight was read


def test_mismatched_trio_names_both_files(roots):
    models = roots["models"]
    with pytest.raises(ModelFolderError) as err:  # the VAE file given as the text encoder
        files_loader.inspect_files(models / "diffusion_models" / FORMAT_FILES["bf16"], models / "vae" / VAE,
                                   models / "vae" / VAE)
    text = str(err.value)
    assert FORMAT_FILES["bf16"] in text and VAE in text and "VAE" in text


def test_names_outside_the_model_folders_are_refused(roots):
    with pytest.raises(InputError, match="not a plain file name"):
        files_loader.load_handle("../qwen_image_bf16.safetensors", TE_BF16, VAE, None)


def test_missing_bundled_tokenizer_is_a_clear_error(roots):
    glue.set_fallback_roots(glue.BUNDLED_TOKENIZERS_KEY, [])
    with pytest.raises(GentorError, match="qwen25_tokenizer"):
        files_image(FORMAT_FILES["bf16"])


def test_prompt_enhancer_lists_the_text_encoder_file_and_shares_its_copy(roots):
    from gentor.loaders import vlm as vlm_loader
    from gentor.samplers import vlm as vlm_sampler

    assert vlm_loader.COMFY_FILES + TE_BF16 in vlm_loader.list_models()
    files_image(FORMAT_FILES["bf16"])
    copies = CACHE.entries("qwen2_5_vl")
    reads = CACHE.disk_reads
    handle = vlm_loader.load_handle(vlm_loader.COMFY_FILES + TE_BF16, None)
    reply = vlm_sampler.enhance(handle, Request(prompt="a cat on a sofa", steps=3))
    assert isinstance(reply.text, str)
    assert [id(e) for e in CACHE.entries("qwen2_5_vl")] == [id(e) for e in copies] and len(copies) == 1
    # Only the enhancer's processor may be new (the model entry was reused, nothing else read from disk).
    assert CACHE.disk_reads - reads <= 1


def _write_lora(folder: Path) -> str:
    """A diffusers-layout LoRA on every block's attention projections of the kit's transformer (rank 4)."""
    from safetensors.torch import save_file

    inner = kit.TRANSFORMER_CONFIG["num_attention_heads"] * kit.TRANSFORMER_CONFIG["attention_head_dim"]
    gen = torch.Generator().manual_seed(5)
    out = {}
    for block in range(kit.TRANSFORMER_CONFIG["num_layers"]):
        for target in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0"):
            name = f"transformer.transformer_blocks.{block}.{target}"
            out[f"{name}.lora_A.weight"] = torch.randn(4, inner, generator=gen) * 0.3
            out[f"{name}.lora_B.weight"] = torch.randn(inner, 4, generator=gen) * 0.3
    folder.mkdir(parents=True, exist_ok=True)
    save_file(out, str(folder / "comfy_kit_lora.safetensors"))
    return "comfy_kit_lora.safetensors"


@pytest.mark.parametrize("dm, tolerance", [(FORMAT_FILES["bf16"], 0.0), ("qwen_image-Q8_0.gguf", 2.5e-3),
                                           (FORMAT_FILES["fp8_scaled"], FP8_LORA_TOLERANCE)])
def test_lora_on_comfy_files_matches_the_folder_with_the_lora(roots, dm, tolerance):
    from gentor.loaders import lora

    name = _write_lora(roots["root"] / "loras")
    glue.set_fallback_roots("loras", [roots["root"] / "loras"])
    plain = folder_image()
    want = sampler.run(lora.with_lora(folder_loader.load_handle(kit.T2I, None), name, 1.0), "t2i", request()).image
    handle = lora.with_lora(files_loader.load_handle(dm, TE_BF16, VAE, None), name, 1.0)
    got = sampler.run(handle, "t2i", request()).image
    assert rel_err(want, plain) > 3 * max(tolerance, 1e-4)  # the LoRA changes the image (~7%)
    assert rel_err(got, want) <= tolerance


def test_diffsynth_engine_on_the_bf16_file_matches_the_folder_and_stored_forms_fall_back(roots):
    pytest.importorskip("diffsynth", reason="the optional DiffSynth engine is not installed")
    want = sampler.run(folder_loader.load_handle(kit.T2I, None, "diffsynth"), "t2i", request()).image
    handle = files_loader.load_handle(FORMAT_FILES["bf16"], TE_BF16, VAE, None, "diffsynth")
    result = sampler.run(handle, "t2i", request())
    assert torch.equal(result.image, want) and "engine=diffsynth" in result.text
    with pytest.raises(InputError, match="stored form"):
        files_loader.load_handle("qwen_image-Q8_0.gguf", TE_BF16, VAE, None, "diffsynth")
    fallback = files_loader.load_handle("qwen_image-Q8_0.gguf", TE_BF16, VAE, None, "diffsynth-or-diffusers")
    assert fallback.info_dict["engine"] == "diffusers"


def test_diffsynth_engine_on_the_plain_fp8_file_stays_within_fp8_tolerance(roots):
    """DiffSynth computes from the FP8 weights as stored (up-cast per layer by its VRAM management)."""
    pytest.importorskip("diffsynth", reason="the optional DiffSynth engine is not installed")
    want = sampler.run(folder_loader.load_handle(kit.T2I, None, "diffsynth"), "t2i", request()).image
    handle = files_loader.load_handle(FORMAT_FILES["fp8_e4m3fn"], TE_BF16, VAE, None, "diffsynth")
    result = sampler.run(handle, "t2i", request())
    assert "engine=diffsynth" in result.text
    assert rel_err(result.image, want) < FP8_TOLERANCE
    module = transformer_entry().value
    assert any(p.dtype == torch.float8_e4m3fn for p in module.parameters())  # it rested in FP8


def test_another_weight_dtype_keeps_a_stored_form_and_says_so(roots):
    plain = files_image("qwen_image-Q8_0.gguf")
    CACHE.unload()
    fp8 = files_image("qwen_image-Q8_0.gguf", memory=MemoryOptions(weight_dtype="fp8_e4m3fn"))
    assert rel_err(fp8.image, plain.image) < FP8_TOLERANCE  # the bf16 text encoder file does rest in FP8
    gguf_weights = [p for p in transformer_entry().value.parameters() if getattr(p, "quant_type", None) is not None]
    assert gguf_weights and not any(p.dtype == torch.float8_e4m3fn for p in transformer_entry().value.parameters())
    assert "weight_dtype fp8_e4m3fn: diffusion_model gguf_Q8_0 kept as stored" in fp8.text
    assert "kept as stored" not in plain.text
