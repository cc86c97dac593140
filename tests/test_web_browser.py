"""The web extension in a real browser against a real ComfyUI (skipped unless all of these are there):

- ``COMFYUI_DIR``: a ComfyUI checkout whose Python has the pack's requirements (tests/comfy_server.py);
- ``node``, Debian's Chromium and npm's ``playwright-core``, found as tests/browser_tools.py says
  (``GENTOR_PLAYWRIGHT_CORE``, as the README documents, or ``NODE_PATH``; no browser is downloaded).

tests/web_browser_check.mjs opens the page headless, queues the tiny T2I workflow as the Run button does,
checks the loader's summary line and the sampler's text, opens the "Gentor models" panel, sees the model
with its size, unloads every row with its button and sees the panel and the server's cache empty, then
stops the server (the panel says "disconnected") and restarts it on the same port (the panel recovers).
The panel screenshot is saved as ``$GENTOR_ARTIFACTS/panel.png`` (default: the test's tmp folder).
No console error or uncaught exception may come from the extension.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests import browser_tools, comfy_server, tiny_models

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).with_name("web_browser_check.mjs")
WORKFLOW = ROOT / "workflows" / "qwen_image_t2i.json"
COMFYUI_DIR = os.environ.get("COMFYUI_DIR", "")
RUN_TIMEOUT_S = 600
GB, MB, KB = 1e9, 1e6, 1e3


def skip_reason() -> str | None:
    if not COMFYUI_DIR:
        return "COMFYUI_DIR is not set: the browser test needs a real ComfyUI"
    return browser_tools.missing()


pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


def size_text(n: int) -> str:
    """The panel's size format, written out independently of web/gentor_panel.js."""
    if n <= 0:
        return "—"
    return f"{n / GB:.2f} GB" if n >= GB else f"{n / MB:.1f} MB" if n >= MB else f"{n / KB:.1f} kB"


def test_panel_lists_unloads_and_survives_a_restart(tiny_root: Path, tmp_path: Path, monkeypatch):
    models = tmp_path / "models"
    shutil.copytree(Path(tiny_root) / tiny_models.QWEN_IMAGE_FOLDER / tiny_models.QWEN_IMAGE_T2I,
                    models / "qwen_image" / tiny_models.QWEN_IMAGE_T2I)
    artifacts = Path(os.environ.get("GENTOR_ARTIFACTS") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = artifacts / "panel.png"
    comfy_dir = comfy_server.comfy_dir_or_skip()
    base = tmp_path / "base"
    srv = comfy_server.ComfyServer(comfy_dir, base, models).start()
    steps: dict[str, dict] = {}
    proc = subprocess.Popen([browser_tools.node(), str(SCRIPT), browser_tools.playwright_core(), srv.url,
                             str(WORKFLOW), str(shot), browser_tools.chromium()], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    listed_before: dict = {}
    try:
        for line in proc.stdout:
            if not line.startswith("{"):
                continue
            msg = json.loads(line)
            steps[msg["step"]] = msg
            if msg["step"] == "ran":
                listed_before = srv.get_json("/gentor/models")
            elif msg["step"] == "unloaded":
                assert srv.get_json("/gentor/models")["models"] == [], "the server's cache is not empty"
            elif msg["step"] == "stop_server":
                port = srv.port
                srv.stop()
            elif msg["step"] == "disconnected_shown":
                # Same port, so the open page reconnects to the new server by itself.
                monkeypatch.setattr(comfy_server, "free_port", lambda: port)
                srv = comfy_server.ComfyServer(comfy_dir, base, models).start()
                proc.stdin.write("restarted\n")
                proc.stdin.flush()
        proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        srv.stop()
    assert "failed" not in steps, f"{steps['failed']['error']}\nserver log:\n{srv.log_tail()}"
    assert "done" in steps, f"browser script stopped early: {sorted(steps)}"

    assert any("steps=2" in t for t in steps["ran"]["nodeText"])  # the sampler's notes on the node
    assert any(t.startswith("qwen-image · ") and "· loaded " in t for t in steps["ran"]["summary"])
    rows = steps["panel"]["rows"]
    assert steps["panel"]["sidebar"], "the frontend offers a sidebar tab API: the panel must be a tab"
    server_rows = {e["id"]: e for e in listed_before["models"]}
    assert {r["id"] for r in rows} == set(server_rows) and rows
    for row in rows:  # each row shows its component with the size the server reports
        assert row["kind"] == server_rows[row["id"]]["kind"]
        assert row["size"] == size_text(server_rows[row["id"]]["bytes"])
    assert steps["unloaded"]["empty"] == "Nothing loaded."
    assert "recovered" in steps
    ours = [e for e in steps["done"]["errors"] if "gentor" in (e["text"] + e["url"]).lower()]
    assert not ours, f"console errors from the extension: {ours}"
    assert shot.is_file() and shot.stat().st_size > 0
