"""Qwen-Image inside a real ComfyUI: its dropdown, its loader's messages, its previews (the shared server
checks are in tests/test_server.py; same session server, skipped unless COMFYUI_DIR is set)."""
from __future__ import annotations

import json
import time

import pytest

from tests import tiny_models
from tests import workflow_files as wf
from tests.comfy_server import DECOY_OTHER, DECOY_PLAIN, DECOYS, ComfyServer, refusal

pytestmark = pytest.mark.server
RUN_TIMEOUT_S = 180.0
LOADER = "GentorLoadQwenImage"
T2I_WORKFLOW = "qwen_image_t2i"
PREVIEW_STEPS = 4


@pytest.fixture(scope="module")
def server(comfy_server: ComfyServer) -> ComfyServer:
    return comfy_server


def test_dropdown_lists_exactly_the_pipelines(server, server_models):
    """Every tiny pipeline of the kit and its symlinked copy; no decoy, no stray file."""
    raw = server.object_info()[LOADER]["input"]["required"]["model_name"]
    options = raw[1]["options"] if raw[0] == "COMBO" else raw[0]
    folder = server_models / tiny_models.QWEN_IMAGE_FOLDER
    pipelines = sorted(p.name for p in folder.iterdir() if (p / "model_index.json").is_file()
                       and p.name not in DECOYS)
    assert set(tiny_models.QWEN_IMAGE_VARIANTS) <= set(pipelines)
    assert options == pipelines, options


@pytest.mark.parametrize("model_name, expect", [
    ("../../etc", "refused"),
    (DECOY_PLAIN, "not a Qwen-Image pipeline"),
    (DECOY_OTHER, "StableDiffusionPipeline"),
])
def test_bad_folder_refused_naming_model_name(server, model_name, expect):
    """0.3.64 lets any string reach the loader, which says what is wrong; 0.8.0 refuses a value outside
    the dropdown with HTTP 400 naming model_name before the loader runs."""
    api = wf.load_api(T2I_WORKFLOW)
    loader_id, loader = wf.first_of(api, LOADER)
    loader["inputs"]["model_name"] = model_name
    how, node_id, text = refusal(server, api, RUN_TIMEOUT_S)
    assert node_id == loader_id and "model_name" in text, (how, text)
    if how == "execution":
        assert text.startswith("Qwen-Image model_name: ") and expect in text, text


def test_progress_and_previews_over_websocket(server):
    """Every step ticks a progress message; preview_every=1 sends a preview image (binary frame) per step."""
    websocket = pytest.importorskip("websocket", reason="websocket-client is needed to watch progress")
    api = wf.load_api(T2I_WORKFLOW)
    _, settings = wf.first_of(api, "GentorQwenImageSettings")
    _, t2i = wf.first_of(api, "GentorTextToImage")
    settings["inputs"]["preview_every"] = 1
    t2i["inputs"].update(steps=PREVIEW_STEPS, seed=24_680)
    ws = websocket.create_connection(server.ws_url, timeout=RUN_TIMEOUT_S)
    progress, previews = [], []
    try:
        prompt_id = server.queue(api)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while time.monotonic() < deadline:
            raw = ws.recv()
            if isinstance(raw, bytes):
                previews.append(raw)
                continue
            msg = json.loads(raw)
            data = msg.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if msg["type"] == "progress" and data.get("max") == PREVIEW_STEPS:
                progress.append(data["value"])
            if msg["type"] in ("execution_error", "execution_success", "execution_interrupted"):
                break
    finally:
        ws.close()
    assert progress == list(range(1, PREVIEW_STEPS + 1)), progress
    # Steps 1-3 carry a latent preview (none on the last step); each frame holds a JPEG.
    assert len(previews) >= PREVIEW_STEPS - 1 and all(b"\xff\xd8" in p[:64] for p in previews), \
        [p[:16] for p in previews]


def test_diffsynth_engine_runs_in_comfyui_or_says_why_not(server):
    """The DiffSynth example in a real ComfyUI: DiffSynth runs when ComfyUI's Python has diffsynth, otherwise
    the run falls back (engine diffsynth-or-diffusers) and the text output says so; engine = diffsynth without
    the package fails naming the input and the pip command."""
    api = wf.load_api("qwen_image_t2i_diffsynth")
    t2i_id, _ = wf.first_of(api, "GentorTextToImage")
    entry = server.run(api, RUN_TIMEOUT_S)
    assert entry.get("status", {}).get("status_str") == "success", entry.get("status")
    text = "\n".join(entry["outputs"][t2i_id]["text"])
    installed = server.python_has("diffsynth")
    not_installed = "fell back to diffusers because diffsynth is not installed (pip install "
    assert ("engine=diffsynth" in text) if installed else (not_installed in text), text
    if not installed:
        _, loader = wf.first_of(api, LOADER)
        loader["inputs"]["engine"] = "diffsynth"
        how, node_id, message = refusal(server, api, RUN_TIMEOUT_S)
        assert "engine" in message and "pip install" in message, (how, message)


def test_qwen_image21_multiref_runs_on_the_diffsynth_engine_in_comfyui(server):
    """Qwen-Image 2.1's three-reference example with the loader's engine switched to DiffSynth (falling back,
    and saying so, where ComfyUI's Python has no diffsynth): IMAGE and MASK come out, the text names the engine."""
    api = wf.load_api("qwen_image21_multiref")
    _, loader = wf.first_of(api, LOADER)
    loader["inputs"]["engine"] = "diffsynth-or-diffusers"
    edit_id, _ = wf.first_of(api, "GentorEditImage")
    entry = server.run(api, RUN_TIMEOUT_S)
    assert entry.get("status", {}).get("status_str") == "success", entry.get("status")
    text = "\n".join(entry["outputs"][edit_id]["text"])
    assert "references=3" in text, text
    if server.python_has("diffsynth"):
        assert "engine=diffsynth" in text and "DiffSynth VRAM management" in text, text
    else:
        assert "fell back to diffusers because diffsynth is not installed (pip install " in text, text
