"""The example workflows, checked without ComfyUI: node schemas are read from nodes/*.py with ``ast``.

Every UI workflow (workflows/*.json, discovered) has an API copy (workflows/api/) equal to what the pack's
one converter (gentor_headless.convert) makes of it; every node is a Gentor node the pack registers or an
allow-listed core node; every input exists; widget values sit in schema order (seed followed by its
control_after_generate value) and within the schema's limits. Backends come from the registry; what a
particular example shows is tested in tests/test_workflows_<backend>.py.
"""
from __future__ import annotations

import copy
import json

import pytest

from gentor import registry
from tests import workflow_check as wc
from tests import workflow_files as wf
from tests import workflow_specs as wspec
from tests import workflow_static as wstatic

SHARED_NODES = ("GentorMemoryOptions", "GentorSpeedOptions", "GentorTextToImage", "GentorEditImage", "GentorInspectModel")
TASK_NODES = ("GentorTextToImage", "GentorEditImage")
MIN_EDIT_IMAGE_INPUTS = 4  # DESIGN.md §3: image_1..image_N, N = the largest maximum of the backends, >= 4
TINY_PREFIX = "tiny-"  # the tiny kit writes DIR/<folder key>/tiny-<variant>/ (DESIGN.md §8)
MAX_INPUT_IMAGE_BYTES = 20_000
MAX_EXAMPLE_STEPS = 8  # a distilled 8-step example runs its real step count; the tiny models keep it fast


# Loaders of files in ComfyUI's own folders: their examples name the published files (the kit uses those names).
PUBLISHED_NAME_LOADERS = ("GentorLoadQwenImageFiles",)


def loader_nodes() -> list[str]:
    return [b.loader_node for b in registry.BACKENDS if b.loader_node] + list(PUBLISHED_NAME_LOADERS)


def is_placeholder(value: str) -> bool:
    """A dropdown entry that is not a folder, such as Emu3.5's '(model folder)'."""
    return value.startswith("(") and value.endswith(")")


def landed() -> list[registry.BackendSpec]:
    """Registered backends whose node file exists (a backend lands its registry entry and nodes together;
    while one is half-way, the shared checks leave it to its own tests)."""
    return [b for b in registry.BACKENDS if (wf.NODES_DIR / f"{b.id}.py").is_file()]


def first_with(*class_types: str) -> str:
    """The first example workflow (by name) that uses every one of ``class_types``."""
    for name in wf.workflow_names():
        kinds = {n["class_type"] for n in wf.load_pair(name)[1].values()}
        if set(class_types) <= kinds:
            return name
    pytest.skip(f"no example workflow uses {', '.join(class_types)}")


@pytest.fixture(scope="module")
def gentor_specs() -> dict[str, wspec.NodeSpec]:
    return wstatic.static_specs()


@pytest.fixture(scope="module")
def specs(gentor_specs) -> dict[str, wspec.NodeSpec]:
    return wspec.allowed_specs(gentor_specs)


# ----------------------------------------------------------------------------- the static schema reader
def test_static_parse_finds_the_contract_nodes(gentor_specs):
    assert set(SHARED_NODES) | {b.loader_node for b in landed()} <= set(gentor_specs), sorted(gentor_specs)
    for spec in gentor_specs.values():
        assert spec.node_id.startswith("Gentor") and spec.display_name.startswith("Gentor ")
        assert spec.category == "Gentor" or spec.category.startswith("Gentor/"), spec.category


def test_static_parse_follows_helpers_and_loops(gentor_specs):
    n_images = wstatic.static_constant("nodes/common.py", "EDIT_IMAGE_INPUTS")
    assert n_images == max(MIN_EDIT_IMAGE_INPUTS, registry.max_references()), n_images
    t2i, edit = gentor_specs["GentorTextToImage"], gentor_specs["GentorEditImage"]
    common = ["model", "prompt", "negative", "seed", "steps", "cfg", "width", "height"]
    assert [i.name for i in t2i.inputs] == common + ["batch_size", "settings", "speed"]
    assert [i.name for i in edit.inputs] == common + [f"image_{k}" for k in range(1, n_images + 1)] + ["settings", "speed"]
    seed = t2i.input("seed")
    assert seed.type == "INT" and seed.control_after_generate and not seed.optional
    assert edit.input("image_1").optional and edit.input("image_1").type == "IMAGE"
    assert t2i.input("settings").type == "GENTOR_SETTINGS" and t2i.input("settings").optional
    assert t2i.widget_slots()[2:4] == [("seed", "value"), ("seed", "control")]
    assert t2i.outputs[:2] == [("IMAGE", "IMAGE"), ("STRING", "STRING")] and t2i.output_ids[:2] == ["image", "text"]
    mem = gentor_specs["GentorMemoryOptions"]
    assert "fp8_e4m3fn" in mem.input("weight_dtype").options and "block" in mem.input("offload").options


def test_input_and_output_ids_are_disjoint(gentor_specs):
    """ComfyUI 0.3.64 refuses a V3 schema whose input and output share an id, and with it the whole pack."""
    for node_id, spec in gentor_specs.items():
        shared = {i.name for i in spec.inputs} & set(spec.output_ids)
        assert not shared, f"{node_id} ({spec.source}): input and output both named {sorted(shared)}"


@pytest.mark.parametrize("backend", [b.id for b in registry.BACKENDS])
def test_every_loader_takes_memory_and_gives_a_model(backend, gentor_specs):
    spec = registry.get(backend)
    if spec not in landed():
        pytest.skip(f"{spec.display_name}: nodes/{spec.id}.py has not landed yet")
    loader = gentor_specs[spec.loader_node]
    assert loader.input("memory").type == "GENTOR_MEMORY" and loader.input("memory").optional
    assert [t for _, t in loader.outputs] == ["GENTOR_MODEL"]
    assert loader.category.startswith("Gentor/"), loader.category
    # model dropdowns are filled from the model folders at run time
    assert any(i.type == "COMBO" and i.options is wspec.UNKNOWN for i in loader.inputs), loader.inputs


# ----------------------------------------------------------------------------- files present
def test_every_backend_has_examples_and_api_copies_exist():
    names = wf.workflow_names()
    for spec in landed():
        if {registry.TASK_T2I, registry.TASK_EDIT} & set(spec.tasks):
            assert any(n.startswith(f"{spec.id}_") for n in names), f"no workflows/{spec.id}_*.json example"
    ui_names = set(wf.workflow_names())
    api_names = {p.stem for p in wf.API_DIR.glob("*.json")}
    assert ui_names == api_names, f"UI without API copy: {ui_names - api_names}; API without UI: {api_names - ui_names}"


# ----------------------------------------------------------------------------- each workflow
@pytest.fixture(params=sorted(p.stem for p in wf.WORKFLOWS_DIR.glob("*.json")))
def pair(request):
    ui, api = wf.load_pair(request.param)
    return request.param, ui, api


def test_ui_workflow_valid(pair, specs):
    name, ui, _ = pair
    assert wc.check_ui(ui, specs) == [], name


def test_api_workflow_valid(pair, specs):
    name, _, api = pair
    assert wc.check_api(api, specs) == [], name


def test_ui_and_api_agree(pair, specs):
    name, ui, api = pair
    assert wc.compare_pair(ui, api, specs) == [], name


def test_api_file_is_what_the_converter_makes(pair, specs):
    """workflows/api/*.json equals what `python -m tests.workflow_check --write-api` writes (the headless
    client's converter); tests/test_frontend_conversion.py checks it against ComfyUI's own frontend."""
    name, ui, api = pair
    assert api == wc.ui_to_api(ui, specs), name


def test_saves_under_gentor_prefix_and_runs_tiny(pair, specs):
    """Image workflows end in one Save Image under gentor/<name>, at a tiny size and few steps; text
    workflows (understanding, prompt enhancement) end in a Gentor output node instead."""
    name, _, api = pair
    saves = [n for n in api.values() if n["class_type"] == "SaveImage"]
    if not saves:
        outputs = [n["class_type"] for n in api.values() if specs[n["class_type"]].output_node]
        assert outputs and all(c.startswith("Gentor") for c in outputs), (name, outputs)
    else:
        assert [s["inputs"]["filename_prefix"] for s in saves] == [f"gentor/{name}"]
        _, sampler = wf.sampler_of(api)
        assert sampler["class_type"] in TASK_NODES
        ins = sampler["inputs"]
        backends = [b for b in registry.BACKENDS if any(n["class_type"] == b.loader_node for n in api.values())]
        # runnable with the tiny kit in seconds: few steps (where the backend has steps; autoregressive ones
        # ignore them), small explicit size on the 16-px grid
        if all(b.defaults is not None and b.defaults.steps for b in backends):
            assert 2 <= ins["steps"] <= MAX_EXAMPLE_STEPS, ins["steps"]
        for side in ("width", "height"):  # 0 = the backend's size rule (e.g. from a small reference image)
            assert ins[side] == 0 or (16 <= ins[side] <= 128 and ins[side] % 16 == 0), (side, ins[side])
    loaders = [n for n in api.values() if n["class_type"] in loader_nodes()]
    assert loaders, f"{name}: no Gentor loader"
    for loader in loaders:  # every model dropdown names a tiny kit folder
        if loader["class_type"] in PUBLISHED_NAME_LOADERS:
            continue  # ComfyUI's own file names, which tests/tiny_comfy.py writes (tests/test_workflows_qwen_image.py)
        spec = specs[loader["class_type"]]
        picked = [v for k, v in loader["inputs"].items() if spec.input(k).type == "COMBO"
                  and spec.input(k).options is wspec.UNKNOWN and not is_placeholder(v)]
        assert picked and all(v.startswith(TINY_PREFIX) for v in picked), (name, picked)


def test_loaded_images_are_shipped(pair):
    _, _, api = pair
    for node in api.values():
        if node["class_type"] == "LoadImage":
            path = wf.INPUTS_DIR / node["inputs"]["image"]
            assert path.is_file(), f"{path} missing"
            assert path.stat().st_size < MAX_INPUT_IMAGE_BYTES


# ----------------------------------------------------------------------------- the checker is not vacuous
def _node_of(ui: dict, node_type: str) -> dict:
    return next(n for n in ui["nodes"] if n["type"] == node_type)


@pytest.mark.parametrize("mutation, expect", [
    ("unknown_input", "does not exist"),
    ("missing_required", "required input 'prompt' missing"),
    ("foreign_class", "neither a Gentor node"),
    ("bad_combo", "is not one of"),
    ("out_of_range", "above the maximum"),
    ("socket_literal", "must be a link"),
    ("dangling_link", "links to missing node"),
])
def test_check_api_catches(mutation, expect, specs):
    _, api = wf.load_pair(first_with("GentorTextToImage", "GentorMemoryOptions"))
    api = copy.deepcopy(api)
    (_, t2i), = wf.by_class(api, "GentorTextToImage")
    (_, mem), = wf.by_class(api, "GentorMemoryOptions")
    if mutation == "unknown_input":
        t2i["inputs"]["guidance"] = 3.0
    elif mutation == "missing_required":
        del t2i["inputs"]["prompt"]
    elif mutation == "foreign_class":
        api["99"] = {"class_type": "KSampler", "inputs": {}, "_meta": {"title": "KSampler"}}
    elif mutation == "bad_combo":
        mem["inputs"]["weight_dtype"] = "fp4"
    elif mutation == "out_of_range":
        t2i["inputs"]["steps"] = 201
    elif mutation == "socket_literal":
        t2i["inputs"]["model"] = "tiny-model"
    elif mutation == "dangling_link":
        t2i["inputs"]["model"] = ["42", 0]
    errs = wc.check_api(api, specs)
    assert any(expect in e for e in errs), errs


def test_check_ui_and_compare_catch_drift(specs):
    ui, api = wf.load_pair(first_with("GentorTextToImage"))
    # a widget value dropped (e.g. the seed's control value missing): count mismatch
    broken = copy.deepcopy(ui)
    t2i = _node_of(broken, "GentorTextToImage")
    t2i["widgets_values"].remove("fixed")
    assert any("widgets_values has" in e for e in wc.check_ui(broken, specs))
    # widget values shifted by one: caught as a type / range error or as a UI/API difference
    shifted = copy.deepcopy(ui)
    vals = _node_of(shifted, "GentorTextToImage")["widgets_values"]
    vals[4], vals[5] = vals[5], vals[4]  # steps <-> cfg
    assert wc.compare_pair(shifted, api, specs) != []
    # a link in the UI that the API copy lacks
    api2 = copy.deepcopy(api)
    (_, t2i_api), = wf.by_class(api2, "GentorTextToImage")
    del t2i_api["inputs"]["settings"]
    assert any("only in UI" in e for e in wc.compare_pair(ui, api2, specs))
    # sockets: an older save may lack appended optional sockets, but a renamed or missing required one is drift
    renamed = copy.deepcopy(ui)
    sockets = [i for i in _node_of(renamed, "GentorTextToImage")["inputs"] if "widget" not in i]
    sockets[0]["name"] = "modle"
    assert any("input sockets" in e for e in wc.check_ui(renamed, specs))
    older = copy.deepcopy(ui)
    node = _node_of(older, "GentorTextToImage")
    optional = [i for i in node["inputs"] if "widget" not in i and i.get("link") is None and i.get("shape") == 7]
    if optional:  # an unlinked optional socket the file may lack
        node["inputs"].remove(optional[-1])
        assert not any("input sockets" in e for e in wc.check_ui(older, specs))
    # a link whose ends disagree
    broken = copy.deepcopy(ui)
    broken["links"][0][4] = 5
    assert any("UI link" in e or "ends at" in e for e in wc.check_ui(broken, specs))


def test_notes_are_left_out_of_the_api(pair):
    name, ui, api = pair
    notes = [n for n in ui["nodes"] if n["type"] in wc.UI_ONLY_TYPES]
    assert all(str(n["id"]) not in api for n in notes), name


def test_workflow_json_is_plain(pair):
    name, ui, api = pair
    for path in (wf.WORKFLOWS_DIR / f"{name}.json", wf.API_DIR / f"{name}.json"):
        json.loads(path.read_text(encoding="utf-8"), parse_constant=_reject)  # strict JSON: no NaN/Infinity


def _reject(token: str):
    raise ValueError(f"non-standard JSON constant {token}")
