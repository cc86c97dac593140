"""Qwen-Image 2.1 from Comfy-Org's files (issue 19): the diffusers folder's image from the same weights.

The files are written by tests/tiny_comfy21.py (independent of the loader under test: real-config tiny models, the
published key layouts — fused ``img_mlp.gate_up``, Qwen3-VL's ``model.layers`` / ``model.visual`` names,
ComfyUI's native Wan-2.2 VAE layout — GGUF through the gguf package's writer); loader and sampler are the real ones.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from gentor import glue
from gentor.errors import InputError, ModelFolderError
from gentor.loaders import qwen_image as folder_loader
from gentor.loaders import qwen_image_files as files_loader
from gentor.loaders.cache import CACHE
from gentor.samplers import qwen_image as sampler
from gentor.samplers.common import Request
from tests import tiny_comfy21 as kit
from tests.qwen_helpers import rel_err

SIZE, STEPS = 32, 2
NAMES = {k: Path(v).name for k, v in kit.FILES.items()}
DM, TE, VAE = NAMES["transformer:bf16"], NAMES["text_encoder:bf16"], NAMES["vae"]
FP8_TOLERANCE = 1e-2  # as tests/test_qwen_image_files.py
# Relative L2 error of the image vs the bf16 folder's, measured on this kit (2 steps, 32 px, fp32 compute, CPU):
# Q8_0 1.13e-3, Q4_K_M 1.36e-2 (printed by the test). Bounds: about twice the measured error.
GGUF_TOLERANCE = {"Q8_0": 2.5e-3, "Q4_K_M": 3e-2}


@pytest.fixture(scope="module")
def kit21(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = Path(os.environ.get("GENTOR_TINY_DIR") or tmp_path_factory.mktemp("comfy21")) / "comfy21_files_test"
    paths = kit.write21(out)
    paths["root"] = out
    paths["other"] = _write_1x_files(out / "qwen_image_1x")
    return paths


def _write_1x_files(out: Path) -> dict[str, Path]:
    """A Qwen-Image 1.x transformer, Qwen2.5-VL text encoder and VAE file (tests/tiny_comfy.py writers)."""
    import diffusers

    from tests import tiny_comfy as kit1

    marker = out / ".complete"
    names = {"transformer": out / "diffusion_models" / "qwen_image_bf16.safetensors",
             "text_encoder": out / "text_encoders" / "qwen_2.5_vl_7b.safetensors",
             "vae": out / "vae" / "qwen_image_vae.safetensors"}
    if marker.is_file():
        return names
    folder = out / "folder"
    torch.manual_seed(0)
    diffusers.QwenImageTransformer2DModel(**kit1.TRANSFORMER_CONFIG).to(torch.bfloat16).save_pretrained(
        folder / "transformer")
    diffusers.AutoencoderKLQwenImage(**kit1.VAE_CONFIG).to(torch.bfloat16).save_pretrained(folder / "vae")
    kit1.build_text_encoder().to(torch.bfloat16).save_pretrained(folder / "text_encoder")
    kit1.write_transformer_file(folder, names["transformer"])
    kit1.write_text_encoder_file(folder, names["text_encoder"])
    kit1.write_vae_file(folder, names["vae"])
    marker.write_text("ok\n")
    return names


@pytest.fixture()
def roots(kit21: dict):
    models = kit21["comfyui_models"]
    other = kit21["other"]
    glue.set_fallback_roots("diffusion_models", [models / "diffusion_models", other["transformer"].parent])
    glue.set_fallback_roots("unet", [models / "unet"])
    glue.set_fallback_roots("text_encoders", [models / "text_encoders", other["text_encoder"].parent])
    glue.set_fallback_roots("clip", [])
    glue.set_fallback_roots("vae", [models / "vae", other["vae"].parent])
    glue.set_fallback_roots(glue.BUNDLED_TOKENIZERS_KEY, [models])
    glue.set_fallback_roots("qwen_image", [kit21["root"] / kit.FOLDER])
    glue.set_fallback_roots("diffusers", [])
    yield kit21
    CACHE.unload()


def request(**kw) -> Request:
    return Request(**{"prompt": "a red fox sitting in fresh snow", "seed": 7, "steps": STEPS, "width": SIZE,
                      "height": SIZE, **kw})


def folder_run(task: str = "t2i", **kw):
    return sampler.run(folder_loader.load_handle(kit.VARIANT, None), task, request(**kw))


def files_run(dm: str = DM, te: str = TE, vae: str = VAE, task: str = "t2i", engine: str = "diffusers", **kw):
    return sampler.run(files_loader.load_handle(dm, te, vae, None, engine), task, request(**kw))


def reference_image() -> Image.Image:
    grid = torch.linspace(0, 255, 48).to(torch.uint8)
    rgba = torch.stack([grid[:, None].expand(48, 48), grid[None, :].expand(48, 48),
                        torch.full((48, 48), 90, dtype=torch.uint8), torch.full((48, 48), 255, dtype=torch.uint8)], -1)
    return Image.fromarray(rgba.numpy(), "RGBA")


def test_combos_list_the_21_files(roots):
    assert {DM, NAMES["transformer:fp8_e4m3fn"], NAMES["transformer:fp8_scaled"], NAMES["gguf:Q8_0"],
            NAMES["gguf:Q4_K_M"]} <= set(
        files_loader.list_transformers())
    assert {TE, NAMES["text_encoder:fp8_scaled"]} <= set(files_loader.list_text_encoders())
    assert VAE in files_loader.list_vaes()
    handle = files_loader.load_handle(DM, TE, VAE, None)
    assert (handle.variant, handle.info_dict["task"], handle.info_dict["layers"]) == ("qwen-image-2.1", "qi21", "2")


def test_bf16_files_give_the_folders_image(roots):
    reference = folder_run()
    result = files_run()
    assert torch.equal(result.image, reference.image) and torch.equal(result.mask, reference.mask)
    assert "model=qwen-image-2.1" in result.text


def test_edit_with_a_reference_gives_the_folders_image(roots):
    ref = reference_image()
    reference = folder_run("edit", images=[ref])
    result = files_run(task="edit", images=[ref])
    assert torch.equal(result.image, reference.image)
    assert "references=1" in result.text


def test_fp8_transformer_and_scaled_text_encoder_within_fp8_tolerance(roots):
    reference = folder_run().image
    assert rel_err(files_run(NAMES["transformer:fp8_e4m3fn"]).image, reference) < FP8_TOLERANCE
    assert rel_err(files_run(te=NAMES["text_encoder:fp8_scaled"]).image, reference) < FP8_TOLERANCE


def test_scaled_fp8_transformer_keeps_its_stored_form_split_with_one_scale(roots):
    from gentor.loaders.comfy_quant import ScaledFP8Linear

    reference = folder_run().image
    assert rel_err(files_run(NAMES["transformer:fp8_scaled"]).image, reference) < FP8_TOLERANCE
    entry = next(e for e in CACHE.entries("qwen_image21_transformer") if "fp8_scaled" in e.source)
    mlp = entry.value.transformer_blocks[0].img_mlp
    gate, up = mlp.gate_layer, mlp.proj
    assert isinstance(gate, ScaledFP8Linear) and isinstance(up, ScaledFP8Linear)
    assert gate.weight.dtype == torch.float8_e4m3fn and torch.equal(gate.weight_scale, up.weight_scale)


@pytest.mark.parametrize("qtype", kit.GGUF_TYPES)
def test_gguf_transformer_within_measured_bounds_and_rests_quantised(roots, qtype):
    reference = folder_run().image
    result = files_run(NAMES[f"gguf:{qtype}"])
    err = rel_err(result.image, reference)
    print(f"GGUF {qtype}: relative error {err:.3g}")  # the measured value the bound is set from
    assert err < GGUF_TOLERANCE[qtype]
    entry = next(e for e in CACHE.entries("qwen_image21_transformer") if e.source.endswith(".gguf"))
    gate = entry.value.transformer_blocks[0].img_mlp.gate_layer.weight
    assert getattr(gate, "quant_type", None) is not None  # the fused matrix was split block rows by block rows


@pytest.mark.parametrize("dm, te, vae, words", [
    ("qwen_image_bf16.safetensors", TE, VAE, ["the text encoder is not Qwen-Image's", "qwen3vl_8b_bf16"]),
    (DM, "qwen_2.5_vl_7b.safetensors", VAE, ["not Qwen-Image 2.1's", "qwen_2.5_vl_7b.safetensors", "Qwen3-VL"]),
    (DM, TE, "qwen_image_vae.safetensors", ["VAE does not fit", "qwen_image_vae.safetensors", "Qwen-Image 2.1 VAE"]),
    ("qwen_image_bf16.safetensors", "qwen_2.5_vl_7b.safetensors", VAE, ["VAE does not fit", "a Qwen-Image 2.1 VAE"]),
    (DM, Path(kit.BAD_FILES["text_encoder_wrong_width"]).name, VAE, ["width does not fit", "128 channels", "256"]),
])
def test_mismatched_trio_is_refused_before_loading_naming_both_files(roots, dm, te, vae, words):
    reads = CACHE.disk_reads
    with pytest.raises(ModelFolderError) as err:
        files_loader.load_handle(dm, te, vae, None)
    for word in words:
        assert word in str(err.value)
    assert CACHE.disk_reads == reads


def test_vae_missing_tensors_is_refused_naming_the_file(roots):
    bad = Path(kit.BAD_FILES["vae_truncated"]).name  # half of its tensors: not the 2.1 VAE's layout any more
    with pytest.raises(ModelFolderError) as err:
        files_loader.load_handle(DM, TE, bad, None)
    assert "vae" in str(err.value) and bad in str(err.value) and "Qwen-Image 2.1 VAE" in str(err.value)


def test_variant_other_than_auto_is_refused_for_a_21_file(roots):
    with pytest.raises(InputError) as err:
        files_loader.load_handle(DM, TE, VAE, None, "diffusers", "qwen-image-edit")
    assert "variant" in str(err.value) and "auto" in str(err.value)


def test_prompt_enhancer_lists_the_qwen3vl_file_and_shares_its_copy(roots):
    from gentor.loaders import vlm as vlm_loader
    from gentor.samplers import vlm as vlm_sampler

    assert vlm_loader.COMFY_FILES + TE in vlm_loader.list_models()
    files_run()
    copies = CACHE.entries("qwen3_vl")
    reads = CACHE.disk_reads
    handle = vlm_loader.load_handle(vlm_loader.COMFY_FILES + TE, None)
    reply = vlm_sampler.enhance(handle, Request(prompt="a cat on a sofa", steps=3))
    assert isinstance(reply.text, str)
    assert [id(e) for e in CACHE.entries("qwen3_vl")] == [id(e) for e in copies] and len(copies) == 1
    assert CACHE.disk_reads - reads == 0  # model and processor: both the 2.1 loader's cached copies


def test_diffsynth_engine_on_the_bf16_files_matches_the_folder_and_gguf_falls_back(roots):
    pytest.importorskip("diffsynth")
    reference = sampler.run(folder_loader.load_handle(kit.VARIANT, None, "diffsynth"), "t2i", request())
    result = files_run(engine="diffsynth")
    assert torch.equal(result.image, reference.image) and "engine=diffsynth" in result.text
    fallback = files_run(NAMES["gguf:Q8_0"], engine="diffsynth-or-diffusers")
    assert "engine=diffusers" in fallback.text
    with pytest.raises(InputError) as err:
        files_run(NAMES["gguf:Q8_0"], engine="diffsynth")
    assert "engine" in str(err.value)


@pytest.mark.parametrize("name", ["qwen_image_comfy_files_21_t2i", "qwen_image_comfy_gguf_21_edit"])
def test_example_workflows_run_on_the_kit_files(roots, name):
    """The examples name Comfy-Org's published file names, which the kit writes; run as the nodes wire them."""
    from tests import workflow_files as wf
    from tests.workflow_runs import Backend, run_api

    _, api = wf.load_pair(name)
    (_, loader), = wf.by_class(api, "GentorLoadQwenImageFiles")
    assert {loader["inputs"]["text_encoder"], loader["inputs"]["vae"]} == {TE, VAE}
    assert loader["inputs"]["diffusion_model"] in (DM, NAMES["gguf:Q8_0"])
    backend = Backend("GentorLoadQwenImageFiles", files_loader.load_handle, sampler.run)
    run = run_api(api, backend)
    task = wf.sampler_of(api)[1]["inputs"]
    assert tuple(run.result.image.shape) == (1, task["height"], task["width"], 3)
    assert run.result.mask is not None and "model=qwen-image-2.1" in run.result.text


def _write_lora21(folder: Path) -> str:
    """A diffusers-layout LoRA (rank 4) on every block's attention and on the SwiGLU's two layers — the ones
    ComfyUI's file fuses — of the kit's 2.1 transformer."""
    from safetensors.torch import save_file

    inner = kit.TRANSFORMER_CONFIG["num_attention_heads"] * 128
    hidden = 3 * inner  # mlp_ratio 3
    gen = torch.Generator().manual_seed(5)
    out = {}
    for block in range(kit.TRANSFORMER_CONFIG["num_layers"]):
        for target, rows in (("attn.to_q", inner), ("attn.to_v", inner), ("img_mlp.gate_layer", hidden),
                             ("img_mlp.proj", hidden)):
            name = f"transformer.transformer_blocks.{block}.{target}"
            out[f"{name}.lora_A.weight"] = torch.randn(4, inner, generator=gen) * 0.3
            out[f"{name}.lora_B.weight"] = torch.randn(rows, 4, generator=gen) * 0.3
    folder.mkdir(parents=True, exist_ok=True)
    save_file(out, str(folder / "comfy21_kit_lora.safetensors"))
    return "comfy21_kit_lora.safetensors"


@pytest.mark.parametrize("dm, tolerance", [(DM, 0.0), (NAMES["gguf:Q8_0"], GGUF_TOLERANCE["Q8_0"])])
def test_lora_on_21_files_matches_the_folder_with_the_lora(roots, dm, tolerance):
    from gentor.loaders import lora

    name = _write_lora21(roots["root"] / "loras")
    glue.set_fallback_roots("loras", [roots["root"] / "loras"])
    plain = folder_run().image
    want = sampler.run(lora.with_lora(folder_loader.load_handle(kit.VARIANT, None), name, 1.0), "t2i",
                       request()).image
    got = sampler.run(lora.with_lora(files_loader.load_handle(dm, TE, VAE, None), name, 1.0), "t2i", request()).image
    assert rel_err(want, plain) > 3 * max(tolerance, 1e-4)  # the LoRA changes the image
    assert rel_err(got, want) <= tolerance
