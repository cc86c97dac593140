"""Qwen-Image 2.1 previews (samplers/vae_preview.py): its 64-channel latent has no published RGB map, so a
preview is a small decode by the model's own VAE. Checked against diffusers' pipeline: the preview of the
final latents is the pipeline's own image, and a run sends previews every ``preview_every`` steps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gentor.loaders import qwen_image as loader
from gentor.samplers import qwen_image as sampler
from gentor.samplers.common import Request
from gentor.samplers.vae_preview import PREVIEW_LATENT_SIDE, decode_preview
from tests import tiny_qwen21

NAME = tiny_qwen21.VARIANT
SIZE, STEPS = 64, 2
PROMPT = "a red fox sitting in fresh snow"


@pytest.fixture(autouse=True)
def roots(model_roots):
    from gentor.loaders.cache import CACHE

    yield model_roots
    CACHE.unload()  # later test files count the cache's entries


@pytest.fixture(scope="module")
def pipe(tiny_root):
    import diffusers

    p = diffusers.QwenImage21Pipeline.from_pretrained(tiny_root / "qwen_image" / NAME)
    p.set_progress_bar_config(disable=True)
    return p


def test_preview_of_the_final_latents_is_the_pipelines_image(pipe):
    args = dict(num_inference_steps=STEPS, width=SIZE, height=SIZE)
    latents = pipe(PROMPT, generator=torch.Generator().manual_seed(5), output_type="latent", **args).images
    image = pipe(PROMPT, generator=torch.Generator().manual_seed(5), output_type="np", **args).images[0]
    preview = decode_preview(pipe.vae, pipe._unpack_latents(latents, SIZE, SIZE, pipe.vae_scale_factor))
    want = np.round(image[..., :3] * 255.0)
    assert preview.size == (SIZE, SIZE) and preview.mode == "RGB"
    assert np.abs(np.asarray(preview, dtype=np.float64) - want).max() <= 1.0


def test_large_latents_are_shrunk_before_the_decode(pipe):
    big = torch.randn(1, pipe.vae.config.z_dim, 1, 4 * PREVIEW_LATENT_SIDE, 2 * PREVIEW_LATENT_SIDE)
    preview = decode_preview(pipe.vae, big)
    factor = pipe.vae_scale_factor
    assert preview.size == (PREVIEW_LATENT_SIDE // 2 * factor, PREVIEW_LATENT_SIDE * factor)


def test_a_21_run_sends_previews():
    seen = []
    settings = sampler.make_settings(preview_every=1)
    request = Request(prompt=PROMPT, seed=5, steps=3, width=SIZE, height=SIZE, settings=settings)
    sampler.run(loader.load_handle(NAME, None), "t2i", request,
                lambda value, total, preview: seen.append((value, total, preview)))
    previews = [(v, p) for v, _, p in seen if p is not None]
    assert [v for v, _ in previews] == [1, 2], seen  # every step but the last (the image itself comes next)
    assert all(p.size == (SIZE, SIZE) and p.mode == "RGB" for _, p in previews)


def test_the_diffsynth_engine_previews_the_same_latents(model_roots):
    """On a folder whose schedule is DiffSynth's own the two engines sample the same latents (their images agree,
    tests/test_qwen_image21_diffsynth.py): their previews, both small decodes, agree too."""
    pytest.importorskip("diffsynth", reason="the optional DiffSynth engine is not installed")
    import json
    import shutil

    from gentor.samplers import qwen_image_diffsynth as ds_sampler

    same = model_roots["qwen_image"] / "tiny-21-preview-same-schedule"
    shutil.copytree(model_roots["qwen_image"] / NAME, same)
    try:
        config = json.loads((same / "scheduler" / "scheduler_config.json").read_text())
        config.update(ds_sampler.DIFFSYNTH_SCHEDULE)
        (same / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
        previews: dict[str, list] = {}
        for engine in ("diffusers", "diffsynth"):
            seen = previews.setdefault(engine, [])
            request = Request(prompt=PROMPT, seed=5, steps=3, width=SIZE, height=SIZE, cfg=1.0,
                              settings=sampler.make_settings(preview_every=1))
            sampler.run(loader.load_handle(same.name, None, engine), "t2i", request,
                        lambda _v, _t, preview, seen=seen: seen.append(preview) if preview is not None else None)
    finally:
        shutil.rmtree(same)
    assert len(previews["diffusers"]) == len(previews["diffsynth"]) == 2
    for ours, ref in zip(previews["diffsynth"], previews["diffusers"]):
        diff = np.abs(np.asarray(ours, dtype=np.float64) - np.asarray(ref, dtype=np.float64))
        assert ours.size == ref.size == (SIZE, SIZE) and diff.max() <= 2.0, diff.max()
