"""What each Qwen-Image example workflow shows (the shared checks are in tests/test_workflows.py)."""
from __future__ import annotations

from PIL import Image

from tests import tiny_models
from tests import workflow_check as wc
from tests import workflow_files as wf


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
