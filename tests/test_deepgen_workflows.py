"""What each DeepGen example workflow shows, and that it runs on the tiny models (without ComfyUI: the API
copy's inputs go through the real loader and sampler, as the nodes pass them)."""
from __future__ import annotations

from pathlib import Path

import pytest

from gentor import glue
from gentor.loaders import deepgen as loader
from gentor.samplers import deepgen as sampler
from tests import tiny_deepgen as tiny
from tests import workflow_files as wf
from tests.workflow_runs import Backend, run_api as run_workflow
from tests.deepgen_helpers import deepgen_models

EXAMPLES = {"deepgen_t2i": 0, "deepgen_edit": 1, "deepgen_edit_2refs": 2}
DEEPGEN = Backend("GentorLoadDeepGen", loader.load_handle, sampler.run, "GentorDeepGenSettings", sampler.make_settings,
                  ("reference_resize", "edit_negative", "lora", "preview_every"), image_mode="RGBA")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> Path:
    root = deepgen_models(tmp_path_factory)
    glue.set_fallback_roots("deepgen", [root / tiny.DEEPGEN_FOLDER])
    glue.set_fallback_roots("vlm", [root / tiny.VLM_FOLDER])
    return root


def run_api(api: dict):
    run = run_workflow(api, DEEPGEN)
    return run.result, run.request.images


# Both distribution forms: the diffusers folder with its own vlm/ (T2I, two references), model.pt with a
# diffusion folder and models/vlm/ (one reference).
DIFFUSERS = (tiny.DIFFUSERS_FOLDER, loader.SAME_FOLDER, f"{tiny.DIFFUSERS_FOLDER}/vlm")
LOADERS = {"deepgen_t2i": DIFFUSERS, "deepgen_edit_2refs": DIFFUSERS,
           "deepgen_edit": (f"{tiny.CHECKPOINT_FOLDER}/{tiny.CHECKPOINT_FILE}", tiny.CHECKPOINT_FOLDER, tiny.VLM_NAME)}


def test_examples_present_and_name_the_tiny_models():
    assert set(EXAMPLES) <= set(wf.workflow_names())
    for name in EXAMPLES:
        _, api = wf.load_pair(name)
        (_, load), = wf.by_class(api, "GentorLoadDeepGen")
        li = load["inputs"]
        assert (li["checkpoint"], li["diffusion"], li["vlm"]) == LOADERS[name]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples_run_on_the_tiny_models(models, name):
    _, api = wf.load_pair(name)
    out, images = run_api(api)
    assert len(images) == EXAMPLES[name]
    _, task = wf.sampler_of(api)
    assert out.image.shape == (1, task["inputs"]["height"], task["inputs"]["width"], 3)
    assert f"references={EXAMPLES[name]}" in out.text
