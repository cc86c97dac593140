"""The pack inside a real ComfyUI (DESIGN.md §8): skipped unless COMFYUI_DIR points at a usable checkout.

    COMFYUI_DIR=/path/to/ComfyUI .venv/bin/python -m pytest -q tests/test_server.py

One server for the whole session (the ``comfy_server`` fixture in tests/conftest.py, started by
tests/comfy_server.py): ``main.py --cpu`` on a free loopback port, the pack linked into a private
custom_nodes/, every backend's tiny models (plus decoys and symlinked copies) as its model folders, the
example input images in its input/. Everything here reads the registry and discovers workflows/*.json;
backend-specific server checks live in tests/test_server_<backend>.py. Assertions hold for ComfyUI 0.3.64
and 0.8.0 alike (e.g. a bad model name may be refused by ComfyUI's validation or by the loader). Tests
that leave the server in a special state (interrupt, /free) come last.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from gentor import registry
from tests import workflow_check as wc
from tests import workflow_files as wf
from tests import workflow_specs as wspec
from tests import workflow_static as wstatic
from tests.comfy_server import (DECOYS, LINK_PREFIX, PACK_LINK_NAME, ComfyServer, PromptRejected, describe, messages,
                                refusal, status_of)

pytestmark = pytest.mark.server
RUN_TIMEOUT_S = 180.0
INTERRUPT_STEPS = 200
CORE_NODES = sorted(wspec.CORE_SPECS)
BAD_MODEL_NAMES = ("../../etc", "no-such-model")


# ----------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def server(comfy_server: ComfyServer) -> ComfyServer:
    return comfy_server


@pytest.fixture(scope="module")
def object_info(server: ComfyServer) -> dict:
    return server.object_info()


@pytest.fixture(scope="module")
def gentor_static() -> dict[str, wspec.NodeSpec]:
    return wstatic.static_specs()


@pytest.fixture(scope="module")
def live_specs(object_info, gentor_static) -> dict[str, wspec.NodeSpec]:
    names = [n for n in list(gentor_static) + CORE_NODES if n in object_info]
    return wspec.specs_from_object_info(object_info, names)


def disabled_reason(server: ComfyServer, backend: registry.BackendSpec) -> str | None:
    """The pack's log line when ``backend`` was skipped for a missing optional dependency on this server."""
    marker = f"Gentor: {backend.display_name} nodes disabled: "
    return next((ln.strip() for ln in server.log_text().splitlines() if marker in ln), None)


# Loaders whose examples run in a server of their own, with ComfyUI's own model folders filled.
OWN_SERVER_LOADERS = ("GentorLoadQwenImageFiles",)


def runnable_or_skip(server: ComfyServer, object_info: dict, name: str) -> None:
    """Skip a workflow whose backend this server disabled (missing optional dependency, said in its log);
    a node missing for any other reason is a failure of the test that runs it."""
    for node in wf.load_json(wf.API_DIR / f"{name}.json").values():
        if node["class_type"] in OWN_SERVER_LOADERS:
            pytest.skip(f"{name}: needs ComfyUI's own model folders filled (tests/test_server_qwen_image_files.py)")
        if node["class_type"] in object_info:
            continue
        backend = next((b for b in registry.BACKENDS if b.loader_node == node["class_type"]), None)
        reason = disabled_reason(server, backend) if backend else None
        if reason:
            pytest.skip(f"{name}: {reason}")


def workflow_with(*class_types: str, object_info: dict | None = None, steps: bool = False) -> str:
    """The first example workflow (by name) using every one of ``class_types`` whose nodes the server has
    (and, with ``steps``, whose backend has denoising steps); skip when there is none."""
    for name in wf.workflow_names():
        api = wf.load_json(wf.API_DIR / f"{name}.json")
        kinds = {n["class_type"] for n in api.values()}
        if not set(class_types) <= kinds or (object_info is not None and not kinds <= set(object_info)):
            continue
        backends = [b for b in registry.BACKENDS if b.loader_node in kinds]
        if steps and not all(b.defaults is not None and b.defaults.steps for b in backends):
            continue
        return name
    pytest.skip(f"no example workflow uses {', '.join(class_types)} with nodes this server has")


def is_placeholder(value: object) -> bool:
    """A dropdown entry that is not a folder, such as Emu3.5's '(model folder)'."""
    return isinstance(value, str) and value.startswith("(") and value.endswith(")")


def model_inputs(api: dict, static: dict[str, wspec.NodeSpec]) -> list[tuple[str, str, str]]:
    """(node id, input, value) of every loader dropdown filled from the model folders at run time."""
    loaders = {b.loader_node for b in registry.BACKENDS}
    found = []
    for nid, node in api.items():
        spec = static.get(node["class_type"])
        if node["class_type"] not in loaders or spec is None:
            continue
        for name, value in node["inputs"].items():
            ispec = spec.input(name)
            if (ispec is not None and ispec.type == "COMBO" and ispec.options is wspec.UNKNOWN
                    and not is_placeholder(value)):
                found.append((nid, name, value))
    return found


def backend_workflows() -> list[tuple[str, str]]:
    """(backend id, first example workflow using its loader) for each backend that has one."""
    pairs = []
    for spec in registry.BACKENDS:
        name = next((n for n in wf.workflow_names()
                     if any(v["class_type"] == spec.loader_node for v in wf.load_json(wf.API_DIR / f"{n}.json")
                            .values())), None)
        if name:
            pairs.append((spec.id, name))
    return pairs


def ok(server: ComfyServer, prompt: dict, timeout: float = RUN_TIMEOUT_S) -> dict:
    entry = server.run(prompt, timeout)
    assert status_of(entry) == "success", describe(entry)
    return entry


def cached(server: ComfyServer) -> list:
    """What GET /gentor/models says the cache holds (a list, or {"models": [...], ...})."""
    body = server.get_json("/gentor/models")
    return body["models"] if isinstance(body, dict) else body


def combo_options(raw: list) -> list:
    """A combo's options as /object_info shows them (V3: ["COMBO", {"options": [...]}]; V1: [[...]])."""
    return raw[1]["options"] if raw[0] == "COMBO" else raw[0]


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
        assert info["output_node"] == spec.output_node, node_id
        assert spec.category == "Gentor" or spec.category.startswith("Gentor/"), spec.category


def test_every_backend_with_nodes_has_its_loader(server, object_info):
    """Registered, or skipped with the one log line naming the missing pip package (DESIGN.md §2)."""
    landed = [b for b in registry.BACKENDS if (wf.NODES_DIR / f"{b.id}.py").is_file()]
    assert landed, "no backend's node file found"
    for spec in landed:
        assert spec.loader_node in object_info or disabled_reason(server, spec), \
            f"{spec.display_name}: {spec.loader_node} not registered and no 'nodes disabled' line in the log"


def test_static_schemas_match_object_info(gentor_static, live_specs):
    """Exact input names, types, required vs optional, widget order (incl. control_after_generate), output
    types (their names differ between versions: 0.3.64 reports the type, 0.8.0 the output id)."""
    for node_id, spec in gentor_static.items():
        live = live_specs[node_id]
        assert spec.signature() == live.signature(), node_id
        for slot, (_, name) in enumerate(zip(spec.outputs, live.output_ids)):
            assert name in spec.output_names(slot), (node_id, slot, name)
        for s_in, l_in in zip(spec.inputs, live.inputs):
            if isinstance(s_in.options, tuple):
                assert s_in.options == l_in.options, (node_id, s_in.name)
            for bound in ("min", "max"):
                if getattr(s_in, bound) is not None:
                    assert getattr(s_in, bound) == getattr(l_in, bound), (node_id, s_in.name, bound)


def test_core_allow_list_matches_object_info(live_specs):
    for name in CORE_NODES:
        assert name in live_specs, f"core node {name} missing from /object_info"
        assert wspec.CORE_SPECS[name].signature() == live_specs[name].signature(), name


def test_loaders_list_models_not_decoys(object_info, gentor_static, server_models: Path):
    """Every model dropdown lists only folders of the registered model folders (tiny models and their
    symlinked copies; a loader may offer another backend's folders, e.g. the prompt enhancer a Qwen-Image
    pipeline's text encoder), never a decoy or a stray file."""
    keys = {key for spec in registry.BACKENDS for key in spec.folder_keys}
    present = {p.name for key in keys if (server_models / key).is_dir() for p in (server_models / key).iterdir()}
    for spec in registry.BACKENDS:
        if spec.loader_node not in object_info:
            continue
        static = gentor_static[spec.loader_node]
        for ispec in static.inputs:
            if ispec.type != "COMBO" or ispec.options is not wspec.UNKNOWN:
                continue
            section = "optional" if ispec.optional else "required"
            options = combo_options(object_info[spec.loader_node]["input"][section][ispec.name])
            top = {o.split("/")[0] for o in options if not is_placeholder(o)}
            assert options and top <= present, (spec.loader_node, ispec.name, options)
            assert not top & set(DECOYS), (spec.loader_node, ispec.name, options)


def test_examples_listed_as_templates(server):
    listed = server.get_json("/api/workflow_templates")
    assert sorted(listed.get(PACK_LINK_NAME, [])) == wf.workflow_names(), listed
    first = wf.workflow_names()[0]
    status, body = server.request("GET", f"/api/workflow_templates/{PACK_LINK_NAME}/{first}.json")
    assert status == 200 and json.loads(body) == wf.load_json(wf.WORKFLOWS_DIR / f"{first}.json")


@pytest.mark.parametrize("name", wf.workflow_names())
def test_workflow_agrees_with_object_info(server, object_info, name, live_specs):
    runnable_or_skip(server, object_info, name)
    ui, api = wf.load_pair(name)
    assert wc.check_ui(ui, live_specs) == []
    assert wc.check_api(api, live_specs) == []  # incl. model names / image names in the live dropdowns
    assert wc.compare_pair(ui, api, live_specs) == []


# ----------------------------------------------------------------------------- running the examples
@pytest.mark.parametrize("name", wf.workflow_names())
def test_run_api_workflow(server, object_info, name):
    runnable_or_skip(server, object_info, name)
    api = wf.load_api(name)
    t0 = time.monotonic()
    entry = ok(server, api)
    seconds = time.monotonic() - t0
    saves = [nid for nid, n in api.items() if n["class_type"] == "SaveImage"]
    if not saves:  # a text workflow (understanding, prompt enhancement): its Gentor output node shows text
        shown = [nid for nid, n in api.items() if object_info[n["class_type"]]["output_node"]]
        texts = [t for nid in shown for t in entry.get("outputs", {}).get(nid, {}).get("text", [])]
        assert texts and all(isinstance(t, str) and t.strip() for t in texts), entry.get("outputs")
        print(f"{name}: {seconds:.1f} s")
        return
    save_id = saves[0]
    _, sampler = wf.sampler_of(api)
    want = (sampler["inputs"]["width"], sampler["inputs"]["height"])
    images = server.output_images(entry, save_id)
    assert len(images) == sampler["inputs"].get("batch_size", 1), entry.get("outputs")
    for img in images:  # a size of 0 is the backend's own rule (e.g. from the last reference image)
        assert img.mode == "RGB" and all(got == w or w == 0 for got, w in zip(img.size, want)), (img.size, want)
    assert entry["outputs"][save_id]["images"][0]["subfolder"] == "gentor"
    print(f"{name}: {seconds:.1f} s")


@pytest.mark.parametrize("backend, name", backend_workflows())
def test_symlinked_model_folder_runs(server, object_info, gentor_static, backend, name):
    """A model kept on another disk and linked into the models folder is listed and loads (the name is
    confined to the models folder; the link's target is the user's choice)."""
    runnable_or_skip(server, object_info, name)
    api = wf.load_api(name)
    picked = model_inputs(api, gentor_static)
    assert picked, f"{name}: no model dropdown found"
    for nid, input_name, value in picked:
        api[nid]["inputs"][input_name] = f"{LINK_PREFIX}{value}"
    ok(server, api)


# ----------------------------------------------------------------------------- errors name node and input
@pytest.mark.parametrize("bad", BAD_MODEL_NAMES)
@pytest.mark.parametrize("backend, name", backend_workflows())
def test_bad_model_name_is_refused_naming_the_input(server, object_info, gentor_static, backend, name, bad):
    """0.8.0 refuses a value outside the dropdown itself (HTTP 400 naming the input); 0.3.64 passes it to
    the loader, which must refuse it naming the input. Either way nothing runs."""
    runnable_or_skip(server, object_info, name)
    api = wf.load_api(name)
    nid, input_name, _ = model_inputs(api, gentor_static)[0]
    api[nid]["inputs"][input_name] = bad
    how, node_id, text = refusal(server, api, RUN_TIMEOUT_S)
    assert node_id == nid, (how, node_id, text)
    assert input_name in text, (how, text)
    if how == "execution":
        assert text.startswith(f"{registry.get(backend).display_name} {input_name}: "), text


@pytest.mark.parametrize("change, input_name, error_type", [
    ("drop", "prompt", "required_input_missing"),
    ("too_big", "steps", "value_bigger_than_max"),
])
def test_invalid_prompt_rejected_with_node_errors(server, object_info, change, input_name, error_type):
    api = wf.load_api(workflow_with("GentorTextToImage", object_info=object_info, steps=True))
    t2i_id, t2i = wf.first_of(api, "GentorTextToImage")
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


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_cfg_is_refused_naming_cfg(server, object_info, value):
    """NaN passes ComfyUI's min/max check (comparisons with NaN are false): the node must refuse it."""
    api = wf.load_api(workflow_with("GentorTextToImage", object_info=object_info))
    t2i_id, t2i = wf.first_of(api, "GentorTextToImage")
    t2i["inputs"]["cfg"] = value
    how, node_id, text = refusal(server, api, RUN_TIMEOUT_S)
    assert node_id == t2i_id and "cfg" in text, (how, text)
    if how == "execution":
        assert "not a finite number" in text, text


def test_batch_on_one_reference_input_is_refused(server, object_info):
    api = wf.load_api(workflow_with("GentorEditImage", "LoadImage", object_info=object_info))
    edit_id, edit = wf.first_of(api, "GentorEditImage")
    load_id, _ = wf.first_of(api, "LoadImage")
    api["90"] = {"class_type": "RepeatImageBatch", "inputs": {"image": [load_id, 0], "amount": 2}}
    edit["inputs"]["image_1"] = ["90", 0]
    how, node_id, text = refusal(server, api, RUN_TIMEOUT_S)
    assert (how, node_id) == ("execution", edit_id), (how, node_id, text)
    assert "image_1: a batch of 2 images on one reference input" in text, text


# ----------------------------------------------------------------------------- interrupt
def test_interrupt_stops_the_run_then_a_normal_run_works(server, object_info):
    websocket = pytest.importorskip("websocket", reason="websocket-client is needed to watch progress")
    api = wf.load_api(workflow_with("GentorTextToImage", object_info=object_info, steps=True))
    t2i_id, t2i = wf.first_of(api, "GentorTextToImage")
    t2i["inputs"].update(steps=INTERRUPT_STEPS, seed=987_654)
    ws = websocket.create_connection(server.ws_url, timeout=RUN_TIMEOUT_S)
    total = 0
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
            # the sampler's step loop (a backend may count its steps as intervals: max = steps - 1)
            if (msg["type"] == "progress" and data.get("node") in (None, t2i_id)
                    and data.get("max", 0) >= INTERRUPT_STEPS // 2):
                progress.append(data["value"])
                total = data["max"]
                if interrupted_at is None:
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
    assert max(progress) < total // 2, f"ran on to step {max(progress)} of {total}"
    assert time.monotonic() - interrupted_at < 30
    t2i["inputs"].update(steps=2, seed=987_655)
    ok(server, api)


def test_inspect_node_reports_the_cache(server, object_info):
    api = wf.load_api(workflow_with("GentorTextToImage", object_info=object_info))
    loader_id, loader = next((nid, n) for nid, n in api.items()
                             if n["class_type"] in {b.loader_node for b in registry.BACKENDS})
    backend = next(b for b in registry.BACKENDS if b.loader_node == loader["class_type"])
    api["99"] = {"class_type": "GentorInspectModel", "inputs": {"model": [loader_id, 0]}}
    entry = ok(server, api)
    (text,) = entry["outputs"]["99"]["text"]
    assert "model: " in text and backend.id in text and "cache: " in text, text


# ----------------------------------------------------------------------------- unloading (last: /free resets)
def test_gentor_unload_route(server, object_info):
    api = wf.load_api(workflow_with("GentorTextToImage", object_info=object_info))
    wf.first_of(api, "GentorTextToImage")[1]["inputs"]["seed"] = 555
    ok(server, api)
    assert cached(server), "nothing cached after a run"
    status, body = server.post_json("/gentor/unload", {"all": True})
    assert status == 200 and body["unloaded"] > 0, body
    assert cached(server) == []
    wf.first_of(api, "GentorTextToImage")[1]["inputs"]["seed"] = 556
    ok(server, api)  # a stale handle reloads transparently
    assert cached(server)


def test_free_unloads_gentor_models_and_next_run_works(server, object_info):
    api = wf.load_api(workflow_with("GentorTextToImage", object_info=object_info))
    wf.first_of(api, "GentorTextToImage")[1]["inputs"]["seed"] = 777
    ok(server, api)
    assert cached(server), "nothing cached after a run"
    status, _ = server.request("POST", "/free", {"unload_models": True, "free_memory": True})
    assert status == 200
    deadline = time.monotonic() + 30
    models = cached(server)
    crashed = False
    while models and not crashed and time.monotonic() < deadline:  # ComfyUI handles /free between prompts
        time.sleep(0.25)
        models = cached(server)
        crashed = "Exception in thread" in server.log_text()
    assert models == [] and not crashed, (
        f"/free left {len(models)} Gentor entries {json.dumps(models)[:1500]}; ComfyUI worker thread crashed: "
        f"{crashed}\n{server.log_tail()}")
    wf.first_of(api, "GentorTextToImage")[1]["inputs"]["seed"] = 778
    ok(server, api, timeout=120)
    assert cached(server)
