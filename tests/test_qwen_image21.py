"""Qwen-Image 2.1 through the real loader and sampler: detection, agreement with diffusers' pipeline, up to 10
references, RGBA -> IMAGE + MASK, defaults, limits, the Qwen3-VL encoder shared with the prompt enhancer."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from gentor import registry
from gentor.errors import InputError, ModelFolderError
from gentor.loaders import qwen_image as loader
from gentor.loaders import qwen_image21 as loader21
from gentor.loaders.cache import CACHE
from gentor.samplers import qwen_image as sampler
from gentor.samplers import qwen_image21 as sampler21
from gentor.samplers.common import Request
from tests import tiny_qwen21
from tests import workflow_static as wstatic

NAME = tiny_qwen21.VARIANT
SIZE, STEPS = 64, 2
EXACT = 1e-5  # fp32, same weights, same seed: our run vs diffusers' pipeline called directly


@pytest.fixture(autouse=True)
def roots(model_roots):
    yield model_roots


def picture(w: int, h: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, len(mode)), dtype=np.uint8).squeeze(), mode)


def run(task: str = "t2i", images=(), **kw) -> sampler.Result:
    kw = {"prompt": "a red fox sitting in fresh snow", "seed": 5, "steps": STEPS, "width": SIZE, "height": SIZE, **kw}
    return sampler.run(loader.load_handle(NAME, None), task, Request(images=list(images), **kw))


def test_detected_from_files():
    h = loader.load_handle(NAME, None)
    assert (h.variant, h.info_dict["task"], h.info_dict["layers"]) == ("qwen-image-2.1", loader21.TASK, "2")
    assert NAME in loader.list_models()


def test_wrong_text_encoder_is_named(tmp_path, model_roots):
    import shutil

    bad = model_roots["qwen_image"] / "tiny-21-bad-encoder"
    shutil.copytree(model_roots["qwen_image"] / NAME, bad)
    try:
        cfg = bad / "text_encoder" / "config.json"
        cfg.write_text(cfg.read_text().replace('"qwen3_vl"', '"qwen2_5_vl"'))
        with pytest.raises(ModelFolderError, match="not a Qwen3-VL model"):
            loader.load_handle(bad.name, None)
    finally:
        shutil.rmtree(bad)


def test_t2i_matches_diffusers_pipeline_rgba_to_image_and_mask():
    ours = run()
    import diffusers

    path = loader.resolve_model_folder("Qwen-Image", "model_name", NAME, loader.FOLDER_KEYS)
    pipe = diffusers.QwenImage21Pipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe("a red fox sitting in fresh snow", num_inference_steps=STEPS, width=SIZE, height=SIZE,
               generator=torch.Generator().manual_seed(5), output_type="pt").images
    assert ref.shape == (1, 4, SIZE, SIZE), "the 2.1 VAE outputs RGBA"
    want_rgb = ref[:, :3].permute(0, 2, 3, 1)
    want_mask = 1.0 - ref[:, 3]  # ComfyUI's MASK: 1 = transparent
    assert ours.image.shape == (1, SIZE, SIZE, 3) and ours.mask.shape == (1, SIZE, SIZE)
    assert float((ours.image - want_rgb).abs().max()) < EXACT
    assert float((ours.mask - want_mask).abs().max()) < EXACT
    assert "steps=2" in ours.text and "true_cfg=1.0" in ours.text and "alpha=yes" in ours.text
    from gentor.loaders.cache import CACHE
    from gentor.modeling.qwen_image.vae import still_image_vae21

    # ... with the VAE class that decodes still images without the video frame caches (same output, above)
    assert [type(e.value) for e in CACHE.entries("autoencoder_kl_qwen_image21")] == [still_image_vae21()]


def test_defaults_40_steps_no_cfg_1024():
    job, _ = sampler21.plan_job("t2i", Request(prompt="x"), None)
    assert (job.steps, job.true_cfg, job.width, job.height) == (40, 1.0, 1024, 1024)
    sigmas = (1.0, 0.8, 0.5)
    job, _ = sampler21.plan_job("t2i", Request(prompt="x"), sigmas)
    assert job.steps == 3 and job.sigmas == list(sigmas), "a folder's sample_sigmas are its default schedule"
    job, _ = sampler21.plan_job("t2i", Request(prompt="x", steps=4), sigmas)
    assert job.steps == 4 and job.sigmas == pytest.approx([1.0, 0.75, 0.5, 0.25])
    # edits are sized from the last reference (~1 MP at its aspect, multiples of 32)
    job, _ = sampler21.plan_job("edit", Request(prompt="x", images=[picture(40, 40, 1), picture(80, 40, 2)]), None)
    assert (job.width, job.height) == (1440, 736)


def test_edit_with_ten_references_and_rgba_input():
    refs = [picture(32 + 16 * (k % 3), 32, k) for k in range(9)] + [picture(48, 32, 9, "RGBA")]
    out = run("edit", refs, steps=STEPS)
    assert out.image.shape == (1, SIZE, SIZE, 3) and torch.isfinite(out.image).all()
    assert "references=10" in out.text
    fewer = run("edit", refs[:2], steps=STEPS)
    assert not torch.equal(out.image, fewer.image), "the references condition the result"


def test_more_references_than_the_model_takes():
    refs = [picture(32, 32, k) for k in range(11)]
    with pytest.raises(InputError, match=r"image_11: too many reference images for Qwen-Image 2.1 \(got 11, "
                                         r"expected at most 10\)"):
        run("edit", refs)
    with pytest.raises(InputError, match="expected at most 4"):
        sampler.run(loader.load_handle("tiny-qwen-image-edit-2511", None), "edit",
                    Request(prompt="x", steps=STEPS, width=32, height=32, images=refs[:5]))


def test_text_encoder_shared_with_the_prompt_enhancer_kind():
    CACHE.unload()
    run()
    kinds = {e.kind: e.source for e in CACHE.entries()}
    assert kinds.get("qwen3_vl", "").endswith("text_encoder"), kinds
    from gentor.loaders import vlm

    assert loader21.KINDS["text_encoder"] == vlm.ARCHITECTURES["qwen3_vl"].kind


def test_edit_node_inputs_reach_the_largest_maximum():
    assert registry.get("qwen_image").max_references == loader21.MAX_REFERENCES
    assert wstatic.static_constant("nodes/common.py", "EDIT_IMAGE_INPUTS") == registry.max_references()
    specs = wstatic.static_specs()
    assert [t for _, t in specs["GentorEditImage"].outputs] == ["IMAGE", "STRING", "MASK"], "MASK appended last"
