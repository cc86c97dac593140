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
from tests import workflow_check as wc  # noqa: E402
from tests.workflow_runs import task_request  # noqa: E402

EXAMPLES = ("emu35_t2i", "emu35_edit", "emu35_edit_3refs")
SETTINGS_KEYS = ("max_new_tokens", "image_area", "image_top_k", "text_top_k", "text_top_p", "aspect", "vq_type")


def _by_class(api: dict, class_type: str) -> list[tuple[str, dict]]:
    return [(nid, n) for nid, n in api.items() if n["class_type"] == class_type]


@pytest.fixture(scope="module")
def emu_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("emu_wf")
    tiny_emu35.write(root)
    glue.set_fallback_roots("emu35", [root / tiny_emu35.FOLDER])
    return root


def run_api(api: dict):
    """Run an API workflow's Gentor part the way the nodes do (loader -> settings -> task)."""
    (_, load), = _by_class(api, "GentorLoadEmu35")
    handle = loader.load_handle(**{k: v for k, v in load["inputs"].items() if k != "memory"})
    (_, settings), = _by_class(api, "GentorEmu35Settings")
    s = sampler.make_settings(**{k: settings["inputs"][k] for k in SETTINGS_KEYS})
    tasks = _by_class(api, "GentorTextToImage") + _by_class(api, "GentorEditImage")
    assert len(tasks) == 1, tasks
    task, req = task_request(api, s)
    return sampler.run(handle, task, req)


def test_examples_present_and_name_the_tiny_models():
    assert set(EXAMPLES) <= set(wc.workflow_names())
    for name in EXAMPLES:
        _, api = wc.load_pair(name)
        (_, load), = _by_class(api, "GentorLoadEmu35")
        assert load["inputs"]["model_name"] == tiny_emu35.MODEL and load["inputs"]["vision_tokenizer"] == tiny_emu35.IBQ


def test_edit_examples_wire_one_and_three_references():
    for name, count in (("emu35_edit", 1), ("emu35_edit_3refs", 3)):
        _, api = wc.load_pair(name)
        (_, edit), = _by_class(api, "GentorEditImage")
        assert [k for k in edit["inputs"] if k.startswith("image_")] == [f"image_{i}" for i in range(1, count + 1)]


@pytest.mark.parametrize("name,size", [("emu35_t2i", (32, 48)), ("emu35_edit", None), ("emu35_edit_3refs", None)])
def test_examples_run_on_the_tiny_models(emu_root, name, size):
    _, api = wc.load_pair(name)
    out = run_api(api)
    assert out.image.ndim == 4 and torch.isfinite(out.image).all()
    if size:
        assert tuple(out.image.shape[1:3]) == size
    else:  # the output follows the last reference at the settings' image_area
        edit = _by_class(api, "GentorEditImage")[0][1]["inputs"]
        last = max(k for k in range(1, 5) if edit.get(f"image_{k}"))
        ref = api[edit[f"image_{last}"][0]]["inputs"]["image"]
        area = _by_class(api, "GentorEmu35Settings")[0][1]["inputs"]["image_area"]
        with Image.open(wc.INPUTS_DIR / ref) as img:
            from gentor.modeling.emu35.image_tokens import smart_resize  # noqa: PLC0415

            want = smart_resize(img.convert("RGB"), area).size
        assert (out.image.shape[2], out.image.shape[1]) == want
