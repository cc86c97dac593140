"""The HTTP API (http_api/) on a real ComfyUI: wrong methods, summaries of unreadable weights, the
exception type names users see in /history and REST errors (skipped unless COMFYUI_DIR is set).

    COMFYUI_DIR=/path/to/ComfyUI .venv/bin/python -m pytest -q tests/test_server_http_api.py
"""
from __future__ import annotations

import json
import urllib.parse
from pathlib import Path

import pytest

from tests import tiny_models
from tests.comfy_server import ComfyServer
from tests.test_generate_endpoint import b64, png, post
from tests.test_routes import bad_weights

pytestmark = pytest.mark.server


@pytest.mark.parametrize("method, path, allowed", [
    ("GET", "/gentor/generate", "POST"), ("GET", "/gentor/unload", "POST"), ("GET", "/api/gentor/generate", "POST"),
    ("POST", "/gentor/models", "GET, HEAD"),
])
def test_wrong_method_is_405_with_allow(comfy_server: ComfyServer, method, path, allowed):
    # Before: ComfyUI's static file route caught a GET on a POST-only path and answered an empty 404.
    status, raw = comfy_server.request(method, path, {} if method == "POST" else None)
    assert status == 405, (status, raw[:200])
    body = json.loads(raw)
    assert body["input"] == "method" and f"expected {' or '.join(allowed.split(', '))}" in body["error"]
    import urllib.request

    req = urllib.request.Request(comfy_server.url + path, method=method, data=b"{}" if method == "POST" else None)
    try:
        urllib.request.urlopen(req, timeout=30)
    except urllib.error.HTTPError as exc:
        assert exc.headers["Allow"] == allowed


def test_summary_of_unreadable_weights_is_200_saying_what_was_found(comfy_server: ComfyServer,
                                                                    server_models: Path, tmp_path: Path):
    marker = tmp_path / "pickle-ran-code"
    staging = tmp_path / "bad"
    cases = bad_weights(staging, marker)
    placed = []
    for name, (key, _found) in cases.items():
        target = server_models / key / f"bad-{name}"
        (staging / key / name).rename(target)
        placed.append(target)
    try:
        for name, (key, found) in cases.items():
            query = urllib.parse.urlencode({"folder": key, "name": f"bad-{name}"})
            status, raw = comfy_server.request("GET", f"/gentor/summary?{query}")
            body = json.loads(raw)
            assert status == 200, (name, body)
            assert found in body["problem"] and body["disk_bytes"] > 0, (name, body["problem"])
    finally:
        for target in placed:
            if target.is_dir():
                for f in target.iterdir():
                    f.unlink()
                target.rmdir()
            else:
                target.unlink()
    assert not marker.exists(), "a pickle's code ran inside ComfyUI while describing it"


def test_error_types_are_plain_names_in_history_and_rest(comfy_server: ComfyServer):
    """A text-to-image model given a reference image: the edit node raises InputError."""
    status, out = post(comfy_server, "/gentor/generate", {"model": tiny_models.QWEN_IMAGE_T2I, "prompt": "x",
                                                          "images": [b64(png(16, 16))], "steps": 2,
                                                          "width": 32, "height": 32})
    assert status == 400, out
    assert out["exception_type"] == "gentor.errors.InputError", out
    entry = comfy_server.history(out["prompt_id"])
    (err,) = [data for kind, data in entry["status"]["messages"] if kind == "execution_error"]
    assert err["exception_type"] == "gentor.errors.InputError"


def test_settings_through_generate_and_described_from_the_nodes(comfy_server: ComfyServer):
    spec = comfy_server.get_json("/gentor/openapi.json")
    gen = spec["paths"]["/gentor/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    by_title = {s["title"]: s for s in gen["properties"]["settings"]["anyOf"]}
    bagel = by_title["BAGEL (GentorBagelSettings)"]["properties"]
    assert set(bagel["cfg_renorm_type"]["enum"]) >= {"auto", "global", "channel", "text_channel"}
    assert bagel["think"]["type"] == "boolean" and bagel["timestep_shift"]["minimum"] > 0
    qwen = by_title["Qwen-Image (GentorQwenImageSettings)"]["properties"]
    assert "lightning" in qwen["schedule"]["enum"]

    body = {"model": tiny_models.QWEN_IMAGE_T2I, "prompt": "x", "steps": 2, "width": 32, "height": 32, "seed": 1}
    status, plain = post(comfy_server, "/gentor/generate", body)
    assert status == 200, plain
    status, out = post(comfy_server, "/gentor/generate", {**body, "settings": {"schedule": "lightning"}})
    assert status == 200, out
    assert out["images"] != plain["images"]  # the schedule reached the sampler
    for settings, field in (({"schedul": "lightning"}, "settings.schedul"),
                            ({"schedule": "fast"}, "settings.schedule"),
                            ({"preview_every": 999}, "settings.preview_every")):
        status, out = post(comfy_server, "/gentor/generate", {**body, "settings": settings})
        assert status == 400 and out["input"] == field, (settings, out)


def test_bagel_think_and_renorm_through_generate(comfy_server: ComfyServer):
    """BAGEL's settings node reached over REST: think mode puts a plan into the answer's text."""
    if "GentorBagelSettings" not in comfy_server.object_info():
        pytest.skip("BAGEL nodes are not registered on this server (see its log)")
    body = {"model": "tiny-bagel", "prompt": "a red square", "steps": 2, "width": 64, "height": 64, "seed": 5}
    status, plain = post(comfy_server, "/gentor/generate", body)
    assert status == 200, plain
    settings = {"think": True, "think_max_tokens": 8, "cfg_renorm_type": "channel"}
    status, out = post(comfy_server, "/gentor/generate", {**body, "settings": settings})
    assert status == 200, out
    assert "renorm=global" in plain["text"] and "renorm=channel" in out["text"]  # auto for T2I is global
    plan, _, notes = out["text"].partition("\n\nmodel=")
    assert plan.strip() and "think_max_tokens=8" in notes and "think" not in plain["text"]
    status, out = post(comfy_server, "/gentor/generate", {**body, "settings": {"cfg_renorm_type": "sideways"}})
    assert status == 400 and out["input"] == "settings.cfg_renorm_type", out
