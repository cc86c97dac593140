"""Hostile API values through a real ComfyUI (skipped unless COMFYUI_DIR is set): NaN in every float input
of every Gentor node an example workflow uses, and a plain string in every Gentor socket, are refused
naming the node and the input, never an AttributeError or a run with NaN. Unit twins (every node, without
ComfyUI): tests/test_input_checks.py."""
from __future__ import annotations

import copy
import math

import pytest

from tests import workflow_files as wf
from tests import workflow_static as wstatic
from tests.comfy_server import ComfyServer, refusal

pytestmark = pytest.mark.server
RUN_TIMEOUT_S = 180.0
SOCKET_TYPES = ("GENTOR_MODEL", "GENTOR_MEMORY", "GENTOR_SETTINGS")


def cases(types: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(workflow, node id, input) for each Gentor node input of ``types``, in the first example using it."""
    specs, found, seen = wstatic.static_specs(), [], set()
    for name in wf.workflow_names():
        for nid, node in wf.load_json(wf.API_DIR / f"{name}.json").items():
            spec = specs.get(node["class_type"])
            for item in spec.inputs if spec else ():
                key = (node["class_type"], item.name)
                if item.type in types and key not in seen:
                    seen.add(key)
                    found.append((name, nid, item.name))
    return found


@pytest.fixture(scope="module")
def server(comfy_server: ComfyServer) -> ComfyServer:
    return comfy_server


def refused(server: ComfyServer, name: str, node_id: str, input_name: str, value: object) -> str:
    api = copy.deepcopy(wf.load_json(wf.API_DIR / f"{name}.json"))
    if api[node_id]["class_type"] not in server.get_json("/object_info"):
        pytest.skip(f"{api[node_id]['class_type']} is not on this server")
    api[node_id]["inputs"][input_name] = value
    how, where, text = refusal(server, api, RUN_TIMEOUT_S)
    if how == "validation" and "value_not_in_list" in text and f"{input_name}:" not in text:
        # The workflow's model files (e.g. ComfyUI-format single files) are not among the test server's models.
        pytest.skip(f"{name}: this server lacks its model files ({text[:200]})")
    assert where == node_id and input_name in text, (how, where, text)
    assert "AttributeError" not in text and "Traceback" not in text, text
    return text


FLOATS = cases(("FLOAT",))


@pytest.mark.parametrize("name, node_id, input_name", FLOATS, ids=[f"{n}:{i}" for n, _, i in FLOATS])
def test_nan_in_every_float_input_is_refused_naming_it(server, name, node_id, input_name):
    text = refused(server, name, node_id, input_name, math.nan)
    assert "not a finite number" in text or "nan" in text.lower(), text


SOCKETS = cases(SOCKET_TYPES)


@pytest.mark.parametrize("name, node_id, input_name", SOCKETS, ids=[f"{n}:{i}" for n, _, i in SOCKETS])
def test_a_string_in_every_gentor_socket_is_refused_naming_what_to_connect(server, name, node_id, input_name):
    text = refused(server, name, node_id, input_name, "tiny-qwen-image")
    assert "Connect " in text and "got str" in text, text


def test_a_megabyte_prompt_to_the_enhancer_is_refused_at_once(server):
    name = "vlm_enhance_t2i"
    node_id = next(nid for nid, n in wf.load_json(wf.API_DIR / f"{name}.json").items()
                   if n["class_type"] == "GentorEnhancePrompt")
    text = refused(server, name, node_id, "prompt", "a cat " * 170_000)
    assert "too long (got 1,020,000 characters" in text, text


@pytest.mark.parametrize("bad", ["a\x00b", "cat \ud83d dog"])
def test_text_no_tokenizer_takes_is_refused_naming_the_input(server, bad):
    name = "vlm_enhance_t2i"
    node_id = next(nid for nid, n in wf.load_json(wf.API_DIR / f"{name}.json").items()
                   if n["class_type"] == "GentorEnhancePrompt")
    text = refused(server, name, node_id, "prompt", bad)
    assert "contains a" in text, text
