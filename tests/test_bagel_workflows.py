"""What each BAGEL example workflow shows, and that it runs on the tiny model (without ComfyUI: the API
copy's inputs go through the real loader and sampler, as the nodes pass them)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gentor import glue, registry
from gentor.loaders import bagel as loader
from gentor.samplers import bagel as sampler
from gentor.samplers.common import Request, tensor_to_pils
from tests import tiny_bagel
from tests import workflow_files as wf
from tests.workflow_runs import Backend, run_api as run_workflow

EXAMPLES = ("bagel_t2i", "bagel_edit", "bagel_edit_2refs", "bagel_think", "bagel_understand")
BAGEL = Backend("GentorLoadBagel", loader.load_handle, sampler.run, "GentorBagelSettings", sampler.make_settings,
                ("cfg_img_scale", "cfg_interval_start", "cfg_interval_end", "cfg_renorm_type", "cfg_renorm_min",
                 "timestep_shift", "think", "think_max_tokens", "think_temperature", "image_max_side",
                 "image_min_side", "preview_every"))


@pytest.fixture(scope="module")
def bagel_root(tmp_path_factory) -> Path:
    folder = tiny_bagel.session_folder(tmp_path_factory)
    glue.set_fallback_roots("bagel", [folder.parent])
    return folder.parent


def run_api(api: dict):
    """Run an API workflow's Gentor part the way the nodes do: loader -> settings -> task (-> describe)."""
    task_id, _ = wf.sampler_of(api)
    run = run_workflow(api, BAGEL)
    out = run.result
    answers = []
    for _, describe in wf.by_class(api, "GentorDescribeImage"):
        d = describe["inputs"]
        assert d["image_1"][0] == task_id  # describes the generated image
        pics = tensor_to_pils(out.image, "image_1", "test")
        answers.append(sampler.run(run.handle, registry.TASK_UNDERSTAND,
                                   Request(prompt=d["question"], seed=d["seed"], steps=d["max_new_tokens"],
                                           images=pics, settings=run.settings)))
    return out, answers


def test_examples_present_and_name_the_tiny_model():
    assert set(EXAMPLES) <= set(wf.workflow_names())
    for name in EXAMPLES:
        _, api = wf.load_pair(name)
        (_, load), = wf.by_class(api, "GentorLoadBagel")
        assert load["inputs"]["model_name"] == tiny_bagel.FOLDER


def test_edit_examples_wire_one_and_two_references():
    for name, count in (("bagel_edit", 1), ("bagel_edit_2refs", 2)):
        _, api = wf.load_pair(name)
        (_, edit), = wf.by_class(api, "GentorEditImage")
        assert [k for k in edit["inputs"] if k.startswith("image_")] == [f"image_{i}" for i in range(1, count + 1)]


@pytest.mark.parametrize("name", EXAMPLES)
def test_examples_run_on_the_tiny_model(bagel_root, name):
    _, api = wf.load_pair(name)
    out, answers = run_api(api)
    assert out.image.ndim == 4 and torch.isfinite(out.image).all()
    if name == "bagel_think":
        assert "think text cut" in out.text or out.text.split("\n\nmodel=")[0]
    if name == "bagel_understand":
        assert len(answers) == 1 and answers[0].image is None and answers[0].text
    task = wf.sampler_of(api)[1]["inputs"]
    assert tuple(out.image.shape[1:3]) == (task["height"], task["width"])  # explicit sizes are used
