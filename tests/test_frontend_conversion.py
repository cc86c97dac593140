"""The API copies in workflows/api/ against a second, independent conversion: ComfyUI's own frontend (served
by the session's real ComfyUI) driven in headless Chromium, doing exactly what the Run button posts.

Needs COMFYUI_DIR (as every server test), ``node``, Debian's ``chromium`` and npm's ``playwright-core``
(only a driver: no browser is downloaded), found as tests/browser_tools.py says (``GENTOR_PLAYWRIGHT_CORE``
or ``NODE_PATH``). Skipped with the reason when any of them is missing.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests import browser_tools
from tests import workflow_files as wf
from tests.comfy_server import ComfyServer

pytestmark = pytest.mark.server
HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "frontend_convert.cjs"
CONVERT_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def tools() -> tuple[str, str, str]:
    reason = browser_tools.missing()
    if reason:
        pytest.skip(reason)
    return browser_tools.node(), browser_tools.chromium(), browser_tools.playwright_core()


@pytest.fixture(scope="module")
def frontend_output(comfy_server: ComfyServer, tools, tmp_path_factory) -> dict:
    node, chromium, driver = tools
    info = comfy_server.object_info()
    names = [n for n in wf.workflow_names()
             if {v["class_type"] for v in wf.load_json(wf.API_DIR / f"{n}.json").values()} <= set(info)]
    out = tmp_path_factory.mktemp("frontend") / "converted.json"
    files = [str(wf.WORKFLOWS_DIR / f"{n}.json") for n in names]
    run = subprocess.run([node, str(SCRIPT), driver, chromium, comfy_server.url, str(out), *files],
                         capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S)
    assert run.returncode == 0, f"frontend conversion failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", wf.workflow_names())
def test_api_copy_equals_the_frontends_conversion(frontend_output, name):
    results = frontend_output["results"]
    if name not in results:
        pytest.skip(f"{name}: the server lacks one of its nodes (see tests/test_server.py)")
    frontend, ours = results[name], wf.load_json(wf.API_DIR / f"{name}.json")
    assert sorted(frontend, key=int) == sorted(ours, key=int), "node ids differ"
    for nid, node in ours.items():
        got = frontend[nid]
        assert got["class_type"] == node["class_type"], nid
        assert got["inputs"] == node["inputs"], (nid, node["class_type"])
        assert got.get("_meta", {}).get("title") == node["_meta"]["title"], nid
