"""The pack inside a real ComfyUI (DESIGN.md §8): skipped unless COMFYUI_DIR points at a ComfyUI checkout.

    COMFYUI_DIR=/path/to/ComfyUI python -m pytest -q tests/test_server.py -p no:cacheprovider --import-mode=importlib

One server for the whole module (tests/comfy_server.py): `main.py --cpu` on a free loopback port, the pack
linked into a private custom_nodes/, the tiny models (plus decoy folders that are not Qwen-Image pipelines)
as its qwen_image folder, the example input images in its input/. ComfyUI's Python is
$COMFYUI_DIR/.venv/bin/python when that exists. Tests that leave the server in a special state (interrupt,
/free) come last.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests import tiny_models
from tests import workflow_check as wc
from tests.comfy_server import PACK_LINK_NAME, ComfyServer, PromptRejected, describe, messages, status_of

COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
pytestmark = pytest.mark.skipif(
    not COMFYUI_DIR, reason="COMFYUI_DIR is not set: these tests start a real ComfyUI (set COMFYUI_DIR to a "
                            "ComfyUI checkout whose Python has the pack's requirements)")

RUN_TIMEOUT_S = 180.0
INTERRUPT_STEPS = 200
DECOY_PLAIN = "decoy-not-a-pipeline"  # a folder without model_index.json
DECOY_OTHER = "decoy-other-pipeline"  # a model_index.json of another pipeline family
TINY_PIPELINES = sorted(tiny_models.QWEN_IMAGE_VARIANTS)
CORE_NODES = sorted(wc.CORE_SPECS)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def models_dir(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny Qwen-Image models plus decoys the loader's dropdown must not list."""
    root = tmp_path_factory.mktemp("comfy_models")
    src = Path(tiny_root) / tiny_models.QWEN_IMAGE_FOLDER
    dst = root / tiny_models.QWEN_IMAGE_FOLDER
    dst.mkdir()
    for name in TINY_PIPELINES:
        shutil.copytree(src / name, dst / name)
    plain = dst / DECOY_PLAIN
    (plain / "transformer").mkdir(parents=True)
    (plain / "transformer" / "config.json").write_text('{"_class_name": "QwenImageTransformer2DModel"}')
    (plain / "README.md").write_text("not a pipeline\n")
    other = dst / DECOY_OTHER
    other.mkdir()
    (other / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    (dst / "stray-file.safetensors").write_bytes(b"\0" * 16)
    return root


@pytest.fixture(scope="module")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    comfy_dir = Path(COMFYUI_DIR)
    assert (comfy_dir / "main.py").is_file(), f"COMFYUI_DIR={comfy_dir} is not a ComfyUI checkout (no main.py)"
    srv = ComfyServer(comfy_dir, tmp_path_factory.mktemp("comfy_base"), models_dir,
                      sorted(wc.INPUTS_DIR.glob("*.png")))
    srv.start()
    print(f"\nComfyUI listening after {srv.start_seconds:.1f} s on {srv.url}; log {srv.log_path}")
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def object_info(server: ComfyServer) -> dict:
    return server.object_info()


@pytest.fixture(scope="module")
def gentor_static() -> dict[str, wc.NodeSpec]:
    return wc.static_specs()


@pytest.fixture(scope="module")
def live_specs(object_info, gentor_static) -> dict[str, wc.NodeSpec]:
    names = [n for n in list(gentor_static) + CORE_NODES if n in object_info]
    return wc.specs_from_object_info(object_info, names)


def api_workflow(name: str) -> dict:
    return copy.deepcopy(wc.load_json(wc.API_DIR / f"{name}.json"))


def node_of(api: dict, class_type: str) -> tuple[str, dict]:
    return next((nid, n) for nid, n in api.items() if n["class_type"] == class_type)


def ok(server: ComfyServer, prompt: dict, timeout: float = RUN_TIMEOUT_S) -> dict:
    entry = server.run(prompt, timeout)
    assert status_of(entry) == "success", describe(entry)
    return entry


# ----------------------------------------------------------------------------- registration
def test_server_starts_and_pack_imports(server):
    assert server.alive()
    assert server.import_failures() == [], server.log_tail()
    assert any(PACK_LINK_NAME in ln for ln in server.log_text().splitlines()), "the pack was not loaded at all"


def test_gentor_nodes_registered_with_categories(object_info, gentor_static):
    live = sorted(k for k in object_info if k.startswith("Gentor"))
    assert live == sorted(gentor_static), "static parse of nodes/*.py and the live server disagree on node ids"
    for node_id, spec in gentor_static.items():
        info = object_info[node_id]
        assert info["category"] == spec.category, node_id
        assert info["display_name"] == spec.display_name, node_id
        assert PACK_LINK_NAME in info["python_module"], info["python_module"]
        assert info["output_node"] == (node_id == "GentorInspectModel"), node_id
    assert {object_info[n]["category"] for n in gentor_static} <= {"Gentor", "Gentor/Qwen-Image"}


def test_static_schemas_match_object_info(gentor_static, live_specs):
    """Exact input names, types, required vs optional, widget order (incl. control_after_generate)."""
    for node_id, spec in gentor_static.items():
        live = live_specs[node_id]
        assert spec.signature() == live.signature(), node_id
        for s_in, l_in in zip(spec.inputs, live.inputs):
            if isinstance(s_in.options, tuple):
                assert s_in.options == l_in.options, (node_id, s_in.name)
            for bound in ("min", "max"):
                if getattr(s_in, bound) is not None:
                    assert getattr(s_in, bound) == getattr(l_in, bound), (node_id, s_in.name, bound)


def test_core_allow_list_matches_object_info(live_specs):
    for name in CORE_NODES:
        assert name in live_specs, f"core node {name} missing from /object_info"
        assert wc.CORE_SPECS[name].signature() == live_specs[name].signature(), name


def test_loader_lists_exactly_the_tiny_pipelines(object_info):
    raw = object_info["GentorLoadQwenImage"]["input"]["required"]["model_name"]
    options = raw[1]["options"] if raw[0] == "COMBO" else raw[0]
    assert options == TINY_PIPELINES, f"expected only the pipeline folders, not decoys: {options}"
    assert DECOY_PLAIN not in options and DECOY_OTHER not in options


def test_examples_listed_as_templates(server):
    listed = server.get_json("/api/workflow_templates")
    assert sorted(listed.get(PACK_LINK_NAME, [])) == wc.workflow_names(), listed
    status, body = server.request("GET", f"/api/workflow_templates/{PACK_LINK_NAME}/qwen_image_t2i.json")
    assert status == 200 and json.loads(body) == wc.load_json(wc.WORKFLOWS_DIR / "qwen_image_t2i.json")


@pytest.mark.parametrize("name", wc.workflow_names())
def test_workflow_agrees_with_object_info(name, live_specs):
    ui, api = wc.load_pair(name)
    assert wc.check_ui(ui, live_specs) == []
    assert wc.check_api(api, live_specs) == []  # incl. model names / image names in the live dropdowns
    assert wc.compare_pair(ui, api, live_specs) == []


# ----------------------------------------------------------------------------- running the examples
@pytest.mark.parametrize("name", sorted(p.stem for p in wc.API_DIR.glob("*.json")))
def test_run_api_workflow(server, name):
    api = api_workflow(name)
    t0 = time.monotonic()
    entry = ok(server, api)
    seconds = time.monotonic() - t0
    save_id, _ = node_of(api, "SaveImage")
    _, sampler = wc.sampler_of(api)
    want = (sampler["inputs"]["width"], sampler["inputs"]["height"])
    images = server.output_images(entry, save_id)
    assert len(images) == sampler["inputs"].get("batch_size", 1), entry.get("outputs")
    for img in images:
        assert img.size == want and img.mode == "RGB"
    assert entry["outputs"][save_id]["images"][0]["subfolder"] == "gentor"
    print(f"{name}: {seconds:.1f} s")


# ----------------------------------------------------------------------------- errors name node and input
@pytest.mark.parametrize("model_name, expect", [
    ("../../etc", "refused"),
    (DECOY_PLAIN, "not a Qwen-Image pipeline"),
    (DECOY_OTHER, "StableDiffusionPipeline"),
])
def test_bad_model_name_fails_the_loader(server, model_name, expect):
    api = api_workflow("qwen_image_t2i")
    loader_id, loader = node_of(api, "GentorLoadQwenImage")
    loader["inputs"]["model_name"] = model_name
    entry = server.run(api, RUN_TIMEOUT_S)
    assert status_of(entry) == "error", describe(entry)
    (err,) = messages(entry, "execution_error")
    assert err["node_id"] == loader_id and err["node_type"] == "GentorLoadQwenImage", err
    assert "model_name" in err["exception_message"] and expect in err["exception_message"], err["exception_message"]
    assert not entry.get("outputs", {}).get(node_of(api, "SaveImage")[0]), "nothing may be saved"


@pytest.mark.parametrize("change, input_name, error_type", [
    ("drop", "prompt", "required_input_missing"),
    ("too_big", "steps", "value_bigger_than_max"),
])
def test_invalid_prompt_rejected_with_node_errors(server, change, input_name, error_type):
    api = api_workflow("qwen_image_t2i")
    t2i_id, t2i = node_of(api, "GentorTextToImage")
    if change == "drop":
        del t2i["inputs"][input_name]
    else:
        t2i["inputs"][input_name] = 10_000
    with pytest.raises(PromptRejected) as info:
        server.queue(api)
    rejected = info.value
    assert rejected.status == 400, rejected
    node_errors = rejected.body["node_errors"]
    assert t2i_id in node_errors and node_errors[t2i_id]["class_type"] == "GentorTextToImage", node_errors
    errs = node_errors[t2i_id]["errors"]
    assert any(e["type"] == error_type and e.get("extra_info", {}).get("input_name") == input_name for e in errs), errs


# ----------------------------------------------------------------------------- interrupt
def test_interrupt_stops_the_run_then_a_normal_run_works(server):
    websocket = pytest.importorskip("websocket", reason="websocket-client is needed to watch progress")
    api = api_workflow("qwen_image_t2i")
    _, t2i = node_of(api, "GentorTextToImage")
    t2i["inputs"].update(steps=INTERRUPT_STEPS, seed=987_654)
    ws = websocket.create_connection(server.ws_url, timeout=RUN_TIMEOUT_S)
    try:
        prompt_id = server.queue(api)
        deadline = time.monotonic() + RUN_TIMEOUT_S
        progress: list[int] = []
        interrupted_at = None
        while time.monotonic() < deadline:
            raw = ws.recv()
            if isinstance(raw, bytes):  # preview images
                continue
            msg = json.loads(raw)
            data = msg.get("data") or {}
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if msg["type"] == "progress":
                progress.append(data["value"])
                if interrupted_at is None:
                    assert data["max"] == INTERRUPT_STEPS, data
                    status, _ = server.request("POST", "/interrupt", {})
                    assert status == 200
                    interrupted_at = time.monotonic()
            if msg["type"] in ("execution_interrupted", "execution_error", "execution_success"):
                break
    finally:
        ws.close()
    assert interrupted_at is not None, "no progress message arrived (Gentor ticks a ProgressBar per step)"
    entry = server.wait(prompt_id, 60)
    assert status_of(entry) == "error", describe(entry)
    (stopped,) = messages(entry, "execution_interrupted")
    assert stopped["node_type"] == "GentorTextToImage"
    assert not messages(entry, "execution_error"), describe(entry)
    assert max(progress) < INTERRUPT_STEPS // 2, f"ran on to step {max(progress)} of {INTERRUPT_STEPS}"
    assert time.monotonic() - interrupted_at < 30
    t2i["inputs"].update(steps=2, seed=987_655)
    ok(server, api)


def test_progress_and_previews_over_websocket(server):
    """Every step ticks a progress message; preview_every=1 sends a preview image (binary frame) per step."""
    websocket = pytest.importorskip("websocket", reason="websocket-client is needed to watch progress")
    api = api_workflow("qwen_image_t2i")
    settings_id, settings = node_of(api, "GentorQwenImageSettings")
    _, t2i = node_of(api, "GentorTextToImage")
    settings["inputs"]["preview_every"] = 1
    t2i["inputs"].update(steps=4, seed=24_680)
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
            if msg["type"] == "progress" and data.get("max") == 4:
                progress.append(data["value"])
            if msg["type"] in ("execution_error", "execution_success", "execution_interrupted"):
                break
    finally:
        ws.close()
    assert progress == [1, 2, 3, 4], progress
    # Steps 1-3 carry a latent preview (none on the last step); each frame holds a JPEG.
    assert len(previews) >= 3 and all(b"\xff\xd8" in p[:64] for p in previews), [p[:16] for p in previews]


def test_inspect_node_reports_the_cache(server):
    api = api_workflow("qwen_image_t2i")
    loader_id, _ = node_of(api, "GentorLoadQwenImage")
    api["99"] = {"class_type": "GentorInspectModel", "inputs": {"model": [loader_id, 0]}}
    entry = ok(server, api)
    (text,) = entry["outputs"]["99"]["text"]
    assert text.startswith("model: qwen_image/qwen-image at ") and "qwen_image/transformer" in text, text


# ----------------------------------------------------------------------------- unloading (last: /free resets)
def test_gentor_unload_route(server):
    api = api_workflow("qwen_image_t2i")
    node_of(api, "GentorTextToImage")[1]["inputs"]["seed"] = 555
    ok(server, api)
    assert server.get_json("/gentor/models"), "nothing cached after a run"
    status, body = server.post_json("/gentor/unload", {})
    assert status == 200 and body["unloaded"] > 0, body
    assert server.get_json("/gentor/models") == []
    node_of(api, "GentorTextToImage")[1]["inputs"]["seed"] = 556
    ok(server, api)  # a stale handle reloads transparently
    assert server.get_json("/gentor/models")


def test_free_unloads_gentor_models_and_next_run_works(server):
    api = api_workflow("qwen_image_t2i")
    node_of(api, "GentorTextToImage")[1]["inputs"]["seed"] = 777
    ok(server, api)
    assert server.get_json("/gentor/models"), "nothing cached after a run"
    status, _ = server.request("POST", "/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    deadline = time.monotonic() + 30
    models = server.get_json("/gentor/models")
    crashed = False
    while models and not crashed and time.monotonic() < deadline:  # ComfyUI handles /free between prompts
        time.sleep(0.25)
        models = server.get_json("/gentor/models")
        crashed = "Exception in thread" in server.log_text()
    assert models == [] and not crashed, (
        f"/free left {len(models)} Gentor entries; ComfyUI worker thread crashed: {crashed}\n{server.log_tail()}")
    node_of(api, "GentorTextToImage")[1]["inputs"]["seed"] = 778
    ok(server, api, timeout=120)
    assert server.get_json("/gentor/models")
