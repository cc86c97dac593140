"""The example workflows as a user sees them on opening: ComfyUI's own frontend (served by the session's real
ComfyUI, headless Chromium, a 1400x900 window) loads each UI workflow; after the Gentor widgets have appeared
(the loader's summary line) every node's title bar is on the canvas (not under the sidebar or the menu, not
off the window's top or left), no two nodes overlap, every Gentor widget stays inside its node, and Gentor
Edit Image shows the connected reference inputs plus one free one, not all ten.

Needs COMFYUI_DIR, ``node``, Debian's ``chromium`` and npm's ``playwright-core`` (tests/browser_tools.py);
skipped with the reason otherwise. GENTOR_LAYOUT_SHOTS=DIR saves a screenshot of each workflow there.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests import browser_tools
from tests import workflow_check as wc
from tests.comfy_server import ComfyServer

pytestmark = pytest.mark.server
SCRIPT = Path(__file__).resolve().with_name("frontend_layout.cjs")
LAYOUT_TIMEOUT_S = 600
EDGE_PX = 1.0  # rectangles may touch
FREE_REFERENCE_INPUTS = 1
# What may be under a node's title corner: the canvas, the window's edge (right/bottom scroll), or the
# frontend's minimap (a small overlay in the bottom-right corner the user moves or closes).
VISIBLE = ("canvas", "outside", "minimap")  # Edit Image offers one unconnected image input beyond the connected ones


@pytest.fixture(scope="module")
def layout(comfy_server: ComfyServer, tmp_path_factory) -> dict:
    reason = browser_tools.missing()
    if reason:
        pytest.skip(reason)
    info = comfy_server.object_info()
    names = [n for n in wc.workflow_names()
             if {v["class_type"] for v in wc.load_json(wc.API_DIR / f"{n}.json").values()} <= set(info)]
    out = tmp_path_factory.mktemp("layout") / "layout.json"
    run = subprocess.run([browser_tools.node(), str(SCRIPT), browser_tools.playwright_core(), browser_tools.chromium(),
                          comfy_server.url, str(out), *(str(wc.WORKFLOWS_DIR / f"{n}.json") for n in names)],
                         capture_output=True, text=True, timeout=LAYOUT_TIMEOUT_S)
    assert run.returncode == 0, f"layout check failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return json.loads(out.read_text())["results"]


def _result(layout: dict, name: str) -> dict:
    if name not in layout:
        pytest.skip(f"{name}: the server lacks one of its nodes (see tests/test_server.py)")
    return layout[name]


def _overlap(a: list[float], b: list[float]) -> bool:
    return (a[0] + a[2] - EDGE_PX > b[0] and b[0] + b[2] - EDGE_PX > a[0]
            and a[1] + a[3] - EDGE_PX > b[1] and b[1] + b[3] - EDGE_PX > a[1])


def _inside(inner: list[float], outer: list[float]) -> bool:
    return (inner[0] >= outer[0] - EDGE_PX and inner[1] >= outer[1] - EDGE_PX
            and inner[0] + inner[2] <= outer[0] + outer[2] + EDGE_PX
            and inner[1] + inner[3] <= outer[1] + outer[3] + EDGE_PX)


def _label(node: dict) -> str:
    return f"{node['type']} #{node['id']}"


@pytest.mark.parametrize("name", wc.workflow_names())
def test_every_title_bar_is_on_the_canvas(layout, name):
    """Nothing opens under the sidebar, the menu or off the window's top/left edge (right/bottom may scroll)."""
    nodes = _result(layout, name)["nodes"]
    hidden = [f"{_label(n)} at {[round(v) for v in n['rect'][:2]]}: title covered by {n['title']}" for n in nodes
              if n["rect"][0] < 0 or n["rect"][1] < 0 or any(c not in VISIBLE for c in n["title"])]
    assert not hidden, "\n".join(hidden)


@pytest.mark.parametrize("name", wc.workflow_names())
def test_no_two_nodes_overlap(layout, name):
    nodes = _result(layout, name)["nodes"]
    clashes = [f"{_label(a)} {[round(v) for v in a['rect']]} overlaps {_label(b)} {[round(v) for v in b['rect']]}"
               for i, a in enumerate(nodes) for b in nodes[i + 1:] if _overlap(a["rect"], b["rect"])]
    assert not clashes, "\n".join(clashes)


@pytest.mark.parametrize("name", wc.workflow_names())
def test_gentor_widgets_stay_inside_their_node(layout, name):
    """The loader's summary line must not run into the node below it."""
    nodes = _result(layout, name)["nodes"]
    outside = [f"{_label(n)}: {w['name']} {[round(v) for v in w['rect']]} outside {[round(v) for v in n['rect']]}"
               for n in nodes for w in n["widgets"] if w["rect"][3] > 0 and not _inside(w["rect"], n["rect"])]
    assert not outside, "\n".join(outside)


@pytest.mark.parametrize("name", [n for n in wc.workflow_names()
                                  if any(v["class_type"] == "GentorEditImage"
                                         for v in wc.load_json(wc.API_DIR / f"{n}.json").values())])
def test_edit_image_offers_the_connected_references_plus_one(layout, name):
    for node in _result(layout, name)["nodes"]:
        if node["type"] != "GentorEditImage":
            continue
        shown = [i for i in node["inputs"] if i.startswith("image_")]
        connected = [i for i in node["linked"] if i.startswith("image_")]
        want = [f"image_{k}" for k in range(1, len(connected) + FREE_REFERENCE_INPUTS + 1)]
        assert connected == want[:len(connected)], (node["id"], connected)
        assert shown == want, (node["id"], shown)
        first = node["inputs"].index("image_1")  # one block, in order (slot order is what the node draws)
        assert node["inputs"][first:first + len(want)] == want, (node["id"], node["inputs"])
