"""What each Emu3.5 example workflow shows, and that it runs on the tiny models (without ComfyUI: the
API copy's inputs go through the real loader and sampler, as the nodes pass them)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

pytest.importorskip("tiktoken", reason="the Emu3.5 tokenizer needs tiktoken (pip install tiktoken)")

from gentor import glue  # noqa: E402
from gentor.loaders import emu35 as loader  # noqa: E402
from gentor.samplers import emu35 as sampler  # noqa: E402
from tests import tiny_emu35  # noqa: E402
from tests import workflow_files as wf  # noqa: E402
from tests.workflow_runs import Backend, run_api as run_workflow  # noqa: E402

EXAMPLES = ("emu35_t2i", "emu35_edit", "emu35_edit_3refs")
EMU35 = Backend("GentorLoadEmu35", loader.load_handle, sampler.run, "GentorEmu35Settings", sampler.make_settings,
                ("max_new_tokens", "image_area", "image_top_k", "text_top_k", "text_top_p", "aspect", "vq_type"))


@pytest.fixture(scope="module")
def emu_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("emu_wf")
    tiny_emu35.write(root)
    glue.set_fallback_roots("emu35", [root / tiny_emu35.FOLDER])
    return root


def run_api(api: dict):
    """Run an API workflow's Gentor part the way the nodes do (loader -> settings -> task)."""
    tasks = wf.by_class(api, "GentorTextToImage") + wf.by_class(api, "GentorEditImage")
    assert len(tasks) == 1, tasks
    return run_workflow(api, EMU35).result


def test_examples_present_and_name_the_tiny_models():
    assert set(EXAMPLES) <= set(wf.workflow_names())
    for name in EXAMPLES:
        _, api = wf.load_pair(name)
        (_, load), = wf.by_class(api, "GentorLoadEmu35")
        assert load["inputs"]["model_name"] == tiny_emu35.MODEL and load["inputs"]["vision_tokenizer"] == tiny_emu35.IBQ


def test_edit_examples_wire_one_and_three_references():
    for name, count in (("emu35_edit", 1), ("emu35_edit_3refs", 3)):
        _, api = wf.load_pair(name)
        (_, edit), = wf.by_class(api, "GentorEditImage")
        assert [k for k in edit["inputs"] if k.startswith("image_")] == [f"image_{i}" for i in range(1, count + 1)]


@pytest.mark.parametrize("name,size", [("emu35_t2i", (32, 48)), ("emu35_edit", None), ("emu35_edit_3refs", None)])
def test_examples_run_on_the_tiny_models(emu_root, name, size):
    _, api = wf.load_pair(name)
    out = run_api(api)
    assert out.image.ndim == 4 and torch.isfinite(out.image).all()
    if size:
        assert tuple(out.image.shape[1:3]) == size
    else:  # the output follows the last reference at the settings' image_area
        edit = wf.by_class(api, "GentorEditImage")[0][1]["inputs"]
        last = max(k for k in range(1, 5) if edit.get(f"image_{k}"))
        ref = api[edit[f"image_{last}"][0]]["inputs"]["image"]
        area = wf.by_class(api, "GentorEmu35Settings")[0][1]["inputs"]["image_area"]
        with Image.open(wf.INPUTS_DIR / ref) as img:
            from gentor.modeling.emu35.image_tokens import smart_resize  # noqa: PLC0415

            want = smart_resize(img.convert("RGB"), area).size
        assert (out.image.shape[2], out.image.shape[1]) == want
