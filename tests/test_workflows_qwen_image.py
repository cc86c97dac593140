"""What each Qwen-Image example workflow shows, and that each runs on the tiny models (without ComfyUI: the
API copy's inputs go through the real loader, LoRA and sampler, as the nodes pass them; the shared checks are
in tests/test_workflows.py)."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from gentor.loaders import qwen_image as loader
from gentor.samplers import qwen_image as sampler
from gentor.samplers import qwen_image_job
from tests import tiny_models
from tests import workflow_check as wc
from tests import workflow_files as wf
from tests.workflow_runs import Backend, run_api

SETTINGS_KEYS = ("max_sequence_length", "preview_every", "schedule", "vae_tiling")


def _settings(max_sequence_length: int, preview_every: int, schedule: str, vae_tiling: str):
    """What GentorQwenImageSettings does with its widgets."""
    return qwen_image_job.make_settings(max_sequence_length, preview_every, schedule, vae_tiling)


QWEN_IMAGE = Backend("GentorLoadQwenImage", loader.load_handle, sampler.run, "GentorQwenImageSettings", _settings,
                     SETTINGS_KEYS)


COMFY_FILE_EXAMPLES = "qwen_image_comfy_"  # Gentor Load Qwen-Image (ComfyUI files): tested below


def test_examples_present():
    assert {"qwen_image_edit", "qwen_image_edit_plus", "qwen_image_t2i",
            "qwen_image_t2i_fp8_block_offload"} <= set(wf.workflow_names())


def test_examples_name_tiny_qwen_image_models():
    for name in wf.workflow_names():
        if name.startswith("qwen_image_") and not name.startswith(COMFY_FILE_EXAMPLES):
            _, api = wf.load_pair(name)
            models = [n["inputs"]["model_name"] for _, n in wf.by_class(api, "GentorLoadQwenImage")]
            assert models and all(m in tiny_models.QWEN_IMAGE_VARIANTS for m in models), (name, models)


def test_t2i_example():
    _, api = wf.load_pair("qwen_image_t2i")
    (lid, loader), = wf.by_class(api, "GentorLoadQwenImage")
    (_, t2i), = wf.by_class(api, "GentorTextToImage")
    assert loader["inputs"]["model_name"] == tiny_models.QWEN_IMAGE_T2I
    assert t2i["inputs"]["model"] == [lid, 0]


def test_edit_example_one_image():
    _, api = wf.load_pair("qwen_image_edit")
    (_, loader), = wf.by_class(api, "GentorLoadQwenImage")
    (_, edit), = wf.by_class(api, "GentorEditImage")
    assert loader["inputs"]["model_name"] == tiny_models.QWEN_IMAGE_EDIT
    assert [k for k in edit["inputs"] if k.startswith("image_")] == ["image_1"]


def test_edit_plus_example_three_images_of_different_sizes():
    _, api = wf.load_pair("qwen_image_edit_plus")
    (_, loader), = wf.by_class(api, "GentorLoadQwenImage")
    (_, edit), = wf.by_class(api, "GentorEditImage")
    assert loader["inputs"]["model_name"] == tiny_models.QWEN_IMAGE_EDIT_2511
    wired = {k: v for k, v in edit["inputs"].items() if k.startswith("image_")}
    assert list(wired) == ["image_1", "image_2", "image_3"]
    sizes = []
    for link in wired.values():
        src = api[link[0]]
        assert src["class_type"] == "LoadImage" and link[1] == 0
        with Image.open(wf.INPUTS_DIR / src["inputs"]["image"]) as img:
            sizes.append(img.size)
    assert len(set(sizes)) == 3, sizes


def test_fp8_block_offload_example():
    _, api = wf.load_pair("qwen_image_t2i_fp8_block_offload")
    (mid, mem), = wf.by_class(api, "GentorMemoryOptions")
    (_, loader), = wf.by_class(api, "GentorLoadQwenImage")
    assert mem["inputs"]["weight_dtype"] == "fp8_e4m3fn" and mem["inputs"]["offload"] == "block"
    assert loader["inputs"]["memory"] == [mid, 0]


def test_t2i_example_note_explains_the_defaults():
    ui, _ = wf.load_pair("qwen_image_t2i")
    notes = [n for n in ui["nodes"] if n["type"] in wc.UI_ONLY_TYPES]
    assert notes and all("0 = " in n["widgets_values"][0] or "defaults" in n["widgets_values"][0] for n in notes)


def test_diffsynth_example_asks_for_the_engine_with_fallback():
    _, api = wf.load_pair("qwen_image_t2i_diffsynth")
    (mid, mem), = wf.by_class(api, "GentorMemoryOptions")
    (_, loader), = wf.by_class(api, "GentorLoadQwenImage")
    assert loader["inputs"]["engine"] == "diffsynth-or-diffusers" and loader["inputs"]["memory"] == [mid, 0]


def test_comfy_file_examples_name_the_published_files():
    """The files ComfyUI's own Qwen-Image template downloads (and a GGUF), which the test kit writes under the
    same names (tests/tiny_comfy.py)."""
    for name, transformer in (("qwen_image_comfy_files_t2i", "qwen_image_fp8_e4m3fn.safetensors"),
                              ("qwen_image_comfy_gguf_t2i", "qwen_image-Q4_K_M.gguf")):
        _, api = wf.load_pair(name)
        (lid, loader), = wf.by_class(api, "GentorLoadQwenImageFiles")
        assert loader["inputs"]["diffusion_model"] == transformer
        assert loader["inputs"]["text_encoder"] == "qwen_2.5_vl_7b_fp8_scaled.safetensors"
        assert loader["inputs"]["vae"] == "qwen_image_vae.safetensors"
        (_, t2i), = wf.by_class(api, "GentorTextToImage")
        assert t2i["inputs"]["model"] == [lid, 0]


@pytest.mark.parametrize("name", [n for n in wf.workflow_names()
                                  if n.startswith("qwen_image") and not n.startswith(COMFY_FILE_EXAMPLES)])
def test_examples_run_on_the_tiny_models(fresh_cache, name):
    _, api = wf.load_pair(name)
    run = run_api(api, QWEN_IMAGE)
    task = wf.sampler_of(api)[1]["inputs"]
    image = run.result.image
    assert image.ndim == 4 and image.shape[-1] == 3 and torch.isfinite(image).all()
    assert image.shape[0] == task.get("batch_size", 1)
    if task["width"] and task["height"]:
        assert tuple(image.shape[1:3]) == (task["height"], task["width"])
    assert f"steps={task['steps']}" in run.result.text and f"seed={task['seed']}" in run.result.text
    loras = [n["inputs"]["lora_name"] for _, n in wf.by_class(api, "GentorLoRA")]
    assert [ref.name for ref in run.handle.adapters] == loras
    if loras:
        assert "LoRA " in run.result.text
