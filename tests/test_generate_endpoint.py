"""POST /gentor/generate.

Without ComfyUI: the route against tests/fake_comfyui.py (ComfyUI's /prompt, /ws, /history, /view and
/upload/image answers) with aiohttp's test client — graph built, images uploaded and returned, every bad
input answered with JSON naming it. With COMFYUI_DIR: the same route on a real ComfyUI with the tiny
Qwen-Image models, compared with the same graph queued through /prompt.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import struct
import urllib.request
import zlib
from typing import Any, Awaitable, Callable

import pytest

aiohttp = pytest.importorskip("aiohttp", reason="aiohttp (ComfyUI's web server library) is not installed")
from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402
from PIL import Image  # noqa: E402

from gentor import registry  # noqa: E402
from gentor.http_api.common import Services, json_errors  # noqa: E402
from gentor.http_api.generate import GenerateRoute  # noqa: E402
from gentor.http_api.request import Limits  # noqa: E402
from tests.fake_comfyui import FakeComfy, color_of  # noqa: E402

SMALL = Limits(body_bytes=200_000, image_bytes=20_000, image_pixels=100 * 100, timeout_s=5.0)


def png(w: int, h: int, color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def png_claiming(w: int, h: int) -> bytes:
    """A small PNG whose header claims ``w`` x ``h`` pixels (what a decompression-bomb file looks like)."""
    raw = bytearray(png(1, 1))
    ihdr = 8 + 4 + 4  # signature, chunk length, chunk type
    raw[ihdr:ihdr + 8] = struct.pack(">II", w, h)
    raw[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr - 4:ihdr + 13])))
    return bytes(raw)


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def with_fake(fake: FakeComfy, check: Callable[[TestClient], Awaitable[Any]], limits: Limits = SMALL) -> Any:
    async def main() -> Any:
        app = web.Application()
        fake.install(app)
        services = Services(inspect=lambda: [], unload=lambda _k: 0, backends=lambda: [registry.get("qwen_image")])
        app.router.add_post("/gentor/generate", json_errors(GenerateRoute(services, limits).handle))
        async with TestClient(TestServer(app)) as client:
            return await check(client)

    return asyncio.run(main())


async def generate(client: TestClient, body: Any, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else json.dumps(body).encode()
    resp = await client.post("/gentor/generate", data=data, headers={"Content-Type": "application/json"})
    return resp.status, await resp.json()


# ----------------------------------------------------------------------------- against the fake server
def test_text_to_image_builds_the_graph_and_returns_pngs():
    fake = FakeComfy()

    async def check(client: TestClient) -> None:
        status, body = await generate(client, {"model": "tiny-qwen-image", "prompt": "a fox", "seed": 5,
                                               "steps": 2, "width": 48, "height": 32, "batch_size": 2})
        assert status == 200, body
        assert (body["width"], body["height"], body["seed"], body["steps"]) == (48, 32, 5, 2)
        assert body["text"].startswith("model=tiny") and len(body["images"]) == 2
        for i, data in enumerate(body["images"]):
            img = Image.open(io.BytesIO(base64.b64decode(data)))
            assert img.format == "PNG" and img.size == (48, 32)
            assert img.getpixel((0, 0)) == color_of(5 + i)

    with_fake(fake, check)
    graph = fake.prompts[0]
    assert {n["class_type"] for n in graph.values()} == {"GentorLoadQwenImage", "GentorTextToImage", "PreviewImage",
                                                         "PreviewAny"}
    assert graph["gentor_text"]["inputs"] == {"source": ["gentor_task", 1]}
    task = graph["gentor_task"]["inputs"]
    assert task["model"] == ["gentor_loader", 0] and graph["gentor_output"]["inputs"]["images"] == ["gentor_task", 0]
    assert (task["prompt"], task["negative"], task["cfg"], task["batch_size"]) == ("a fox", "", 0.0, 2)
    assert graph["gentor_loader"]["inputs"] == {"model_name": "tiny-qwen-image"}


def test_defaults_random_seed_and_reported_steps():
    fake = FakeComfy()

    async def check(client: TestClient) -> None:
        status, body = await generate(client, {"model": "tiny-qwen-image", "prompt": ""})
        assert status == 200, body
        assert body["steps"] == 50  # what the run's notes say it used, not the 0 that was sent
        assert 0 <= body["seed"] <= 2**53 - 1 and (body["width"], body["height"]) == (64, 64)
        return body["seed"]

    seed = with_fake(fake, check)
    assert fake.prompts[0]["gentor_task"]["inputs"]["seed"] == seed
    assert fake.prompts[0]["gentor_task"]["inputs"]["steps"] == 0


def test_edit_uploads_base64_images_and_passes_names_through():
    fake = FakeComfy()
    raw = png(20, 10)
    fake.uploads["mine.png"] = png(4, 4)

    async def check(client: TestClient) -> None:
        status, body = await generate(client, {"model": "tiny-qwen-image", "prompt": "make it blue",
                                               "images": [b64(raw), "data:image/png;base64," + b64(raw),
                                                          "mine.png"]})
        assert status == 200, body

    with_fake(fake, check)
    expected = f"gentor_api/{hashlib.sha256(raw).hexdigest()[:32]}.png"
    assert fake.uploads[expected] == raw  # stored once, content-named
    graph = fake.prompts[0]
    assert graph["gentor_task"]["class_type"] == "GentorEditImage" and "batch_size" not in graph["gentor_task"]["inputs"]
    assert [graph[f"gentor_image_{i}"]["inputs"]["image"] for i in (1, 2, 3)] == \
        [f"{expected} [temp]", f"{expected} [temp]", "mine.png"]
    assert [graph["gentor_task"]["inputs"][f"image_{i}"] for i in (1, 2, 3)] == \
        [[f"gentor_image_{i}", 0] for i in (1, 2, 3)]


def section_round_trip(section: str, good: dict, typo: str) -> tuple[dict, tuple[int, dict]]:
    """POST ``good`` under a request ``section`` (must be accepted), then ``typo`` as its only key: the first
    queued graph and the answer to the typo."""
    fake, refused = FakeComfy(), []

    async def check(client: TestClient) -> None:
        status, body = await generate(client, {"model": "tiny-qwen-image", "prompt": "x", section: good})
        assert status == 200, body
        refused.append(await generate(client, {"model": "tiny-qwen-image", "prompt": "x", section: {typo: "x"}}))

    with_fake(fake, check)
    assert len(fake.prompts) == 1  # the refused request never reached the queue
    return fake.prompts[0], refused[0]


def test_memory_options_fill_the_node_defaults():
    graph, (status, body) = section_round_trip("memory", {"weight_dtype": "fp8_e4m3fn"}, "wd")
    assert status == 400 and body["input"] == "memory.wd" and "weight_dtype" in body["error"]
    assert graph["gentor_memory"]["inputs"] == {"weight_dtype": "fp8_e4m3fn", "compute_dtype": "auto",
                                                "offload": "none", "vram_budget_gb": 0.0}
    assert graph["gentor_loader"]["inputs"]["memory"] == ["gentor_memory", 0]


BIG = b64(png(101, 100))  # 10,100 pixels > SMALL.image_pixels


@pytest.mark.parametrize("body, status, field", [
    ({"prompt": "x"}, 400, "model"),
    ({"model": "tiny-qwen-image"}, 400, "prompt"),
    ({"model": "", "prompt": "x"}, 400, "model"),
    ({"model": 3, "prompt": "x"}, 400, "model"),
    ({"model": "tiny-qwen-image", "prompt": "x", "steps": "2"}, 400, "steps"),
    ({"model": "tiny-qwen-image", "prompt": "x", "steps": True}, 400, "steps"),
    ({"model": "tiny-qwen-image", "prompt": "x", "steps": 2.5}, 400, "steps"),
    ({"model": "tiny-qwen-image", "prompt": "x", "cfg": "high"}, 400, "cfg"),
    ({"model": "tiny-qwen-image", "prompt": "x", "step": 2}, 400, "step"),
    ({"model": "tiny-qwen-image", "prompt": "x", "images": "abc"}, 400, "images"),
    ({"model": "tiny-qwen-image", "prompt": "x", "images": [b64(png(8, 8))] * 5}, 413, "images"),
    ({"model": "tiny-qwen-image", "prompt": "x", "images": [5]}, 400, "images[0]"),
    ({"model": "tiny-qwen-image", "prompt": "x", "images": ["@@notbase64@@"]}, 400, "images[0]"),
    ({"model": "tiny-qwen-image", "prompt": "x", "images": [b64(b"plain text, not an image")]}, 400, "images[0]"),
    ({"model": "tiny-qwen-image", "prompt": "x", "images": [BIG]}, 413, "images[0]"),
    ({"model": "tiny-qwen-image", "prompt": "x", "images": [b64(b"\0" * 30_000)]}, 413, "images[0]"),
    ({"model": "tiny-qwen-image", "prompt": "x", "images": ["../../etc/passwd.png"]}, 400, "images[0]"),
    ({"model": "tiny-qwen-image", "prompt": "x", "images": ["/etc/x.png"]}, 400, "images[0]"),
    ({"model": "tiny-qwen-image", "prompt": "x", "images": [b64(png(8, 8))], "batch_size": 2}, 400, "batch_size"),
    ({"model": "tiny-qwen-image", "prompt": "x", "memory": {"offload": ["none"]}}, 400, "memory.offload"),
    ({"model": "tiny-qwen-image", "prompt": "x", "loader": {"engin": "diffusers"}}, 400, "loader.engin"),
    ({"model": "tiny-qwen-image", "prompt": "x", "settings": {"max_sequence_length": 5000}}, 400,
     "settings.max_sequence_length"),
    ({"model": "tiny-qwen-image", "prompt": "x", "settings": {"schedule": ["lightning"]}}, 400, "settings.schedule"),
    ({"model": "tiny-qwen-image", "prompt": "x", "loader": {"model_name": "other"}}, 400, "loader.model_name"),
    ({"model": "tiny-qwen-image", "prompt": "x", "loader": {"memory": "x"}}, 400, "loader.memory"),
    ({"model": "tiny-qwen-image", "prompt": "x", "images": ["data:image/png;base64"]}, 400, "images[0]"),
    ({"model": "tiny-qwen-image", "prompt": "x", "images": [b64(png_claiming(30_000, 30_000))]}, 413, "images[0]"),
    ({"model": "missing-model", "prompt": "x"}, 400, "model"),
    ({"model": "tiny-qwen-image", "prompt": "x", "backend": "bogus"}, 400, "backend"),
    ({"model": "tiny-qwen-image", "prompt": "x", "steps": 999}, 400, "steps"),  # ComfyUI's range check, mapped
    ({"model": "tiny-qwen-image", "prompt": "x", "images": ["never-uploaded.png"]}, 400, "images[0]"),
])
def test_bad_input_is_json_naming_the_field(body, status, field):
    fake = FakeComfy()

    async def check(client: TestClient) -> None:
        got, answer = await generate(client, body)
        assert got == status, answer
        assert answer["input"] == field and "(got " in answer["error"] and "expected" in answer["error"]

    with_fake(fake, check)
    assert fake.prompts == []  # nothing ran


@pytest.mark.parametrize("raw, status", [(b"{not json", 400), (b"[1]", 400), (b"x" * 300_000, 413)])
def test_malformed_or_oversized_body(raw, status):
    async def check(client: TestClient) -> None:
        got, answer = await generate(client, None, raw=raw)
        assert got == status and answer["input"] == "body"

    with_fake(FakeComfy(), check)


@pytest.mark.parametrize("message, field, status", [
    ("Qwen-Image width: 40 is below the minimum (got 40, expected >= 64). Raise width.", "width", 400),
    ("Gentor Edit Image image_2: unreadable (got x, expected y). Fix it.", "images[1]", 400),
    ("Qwen-Image model: an edit model cannot generate from text alone (got a, expected b). Use c.", "model", 400),
])
def test_run_errors_name_the_field(message, field, status):
    fake = FakeComfy(fail={"node_id": "gentor_task", "node_type": "GentorTextToImage", "exception_message": message,
                           "exception_type": "gentor.errors.InputError", "traceback": []})

    async def check(client: TestClient) -> None:
        got, answer = await generate(client, {"model": "tiny-qwen-image", "prompt": "x"})
        assert got == status and answer["input"] == field and answer["error"] == message
        assert answer["node"] == "GentorTextToImage" and answer["prompt_id"]

    with_fake(fake, check)


def test_loader_inputs_pass_through_and_unknown_ones_name_the_choices():
    graph, (status, body) = section_round_trip("loader", {"engine": "diffsynth-or-diffusers"}, "engin")
    assert status == 400 and body["input"] == "loader.engin" and "expected one of ['engine']" in body["error"]
    assert graph["gentor_loader"]["inputs"]["engine"] == "diffsynth-or-diffusers"


def test_backend_settings_go_through_its_settings_node():
    graph, (status, body) = section_round_trip("settings", {"schedule": "lightning"}, "shedule")
    assert status == 400 and body["input"] == "settings.shedule" and "'schedule'" in body["error"]
    assert graph["gentor_settings"] == {"class_type": "GentorQwenImageSettings",
                                        "inputs": {"schedule": "lightning", "max_sequence_length": 1024}}
    assert graph["gentor_task"]["inputs"]["settings"] == ["gentor_settings", 0]


def test_every_settings_node_in_the_registry_is_a_pack_node():
    from tests import workflow_check as wc

    named = {b.settings_node for b in registry.BACKENDS if b.settings_node}
    assert named and named <= set(wc.static_specs())


def test_too_many_images_for_the_model_says_what_to_send():
    """The node's refusal tells a UI user to disconnect inputs; a REST caller hears about its images list."""
    message = ("Qwen-Image image_1..image_4: too many reference images for this model (got 4, expected at most 3). "
               "Disconnect 1 of them.")
    fake = FakeComfy(fail={"node_id": "gentor_task", "node_type": "GentorEditImage", "exception_message": message,
                           "exception_type": "gentor.errors.InputError", "traceback": []})

    async def check(client: TestClient) -> None:
        got, answer = await generate(client, {"model": "tiny-qwen-image", "prompt": "x",
                                              "images": [b64(png(8, 8, (i, 0, 0))) for i in range(4)]})
        assert got == 400 and answer["input"] == "images", answer
        assert "(got 4, expected at most 3)" in answer["error"] and "Disconnect" not in answer["error"]
        assert answer["error"].endswith("Send at most 3 images in the request's images list.")

    with_fake(fake, check)


def test_loader_error_names_model_and_cancel_is_409():
    fake = FakeComfy(fail={"node_id": "gentor_loader", "node_type": "GentorLoadQwenImage",
                           "exception_message": "Qwen-Image model_name: broken (got a, expected b). Re-download.",
                           "exception_type": "gentor.errors.ModelFolderError"})

    async def check(client: TestClient) -> None:
        got, answer = await generate(client, {"model": "tiny-qwen-image", "prompt": "x"})
        assert got == 400 and answer["input"] == "model"
        fake.fail, fake.interrupt = None, True
        got, answer = await generate(client, {"model": "tiny-qwen-image", "prompt": "x"})
        assert got == 409 and "cancelled" in answer["error"]

    with_fake(fake, check)


def test_new_model_files_are_found_and_node_info_is_cached():
    fake = FakeComfy()

    async def check(client: TestClient) -> None:
        assert (await generate(client, {"model": "tiny-qwen-image", "prompt": "x"}))[0] == 200
        calls = fake.object_info_calls
        assert (await generate(client, {"model": "tiny-qwen-image", "prompt": "y"}))[0] == 200
        assert fake.object_info_calls == calls  # definitions kept between calls
        fake.models.append("added-later")
        status, body = await generate(client, {"model": "added-later", "prompt": "z"})
        assert status == 200, body  # an unknown name re-reads the loader's list once

    with_fake(fake, check)


# ----------------------------------------------------------------------------- real ComfyUI
# The session's ComfyUI (tests/conftest.py comfy_server: every tiny model; skipped with the reason when
# COMFYUI_DIR is unset or unusable).


def post(srv: Any, path: str, body: dict, timeout: float = 300) -> tuple[int, dict]:
    req = urllib.request.Request(srv.url + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_real_comfyui_generate_matches_the_same_graph_through_prompt(comfy_server):
    comfy = comfy_server
    from tests import tiny_models

    body = {"model": tiny_models.QWEN_IMAGE_T2I, "prompt": "a red circle", "seed": 3, "steps": 2,
            "width": 32, "height": 32}
    status, out = post(comfy, "/gentor/generate", body)
    assert status == 200, out
    assert (out["width"], out["height"], out["seed"], out["steps"]) == (32, 32, 3, 2)
    ours = Image.open(io.BytesIO(base64.b64decode(out["images"][0]))).convert("RGB")
    graph = {"1": {"class_type": "GentorLoadQwenImage", "inputs": {"model_name": body["model"]}},
             "2": {"class_type": "GentorTextToImage", "inputs": {
                 "model": ["1", 0], "prompt": body["prompt"], "negative": "", "seed": 3, "steps": 2, "cfg": 0.0,
                 "width": 32, "height": 32, "batch_size": 1}},
             "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "gentor/ref"}},
             "4": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}}}
    entry = comfy.run(graph)
    ref = comfy.output_images(entry, "3")[0].convert("RGB")
    assert ours.tobytes() == ref.tobytes()  # same graph, same seed: the same pixels
    assert out["text"] == "\n".join(entry["outputs"]["4"]["text"]) and "steps=2" in out["text"]
    status, again = post(comfy, "/gentor/generate", body)  # answered from ComfyUI's cache: same answer
    assert status == 200 and again["images"] == out["images"] and again["text"] == out["text"]


def test_real_comfyui_edit_and_errors(comfy_server):
    comfy = comfy_server
    from tests import tiny_models

    ref = png(40, 24, (10, 200, 30))
    status, out = post(comfy, "/gentor/generate", {"model": tiny_models.QWEN_IMAGE_EDIT_2511, "prompt": "blue",
                                                   "images": [b64(ref)], "steps": 2, "width": 32, "height": 32})
    assert status == 200, out
    assert len(out["images"]) == 1 and (out["width"], out["height"]) == (32, 32)
    status, out = post(comfy, "/gentor/generate", {"model": tiny_models.QWEN_IMAGE_T2I, "prompt": "x", "steps": 999})
    assert status == 400 and out["input"] == "steps"
    status, out = post(comfy, "/gentor/generate", {"model": "../../etc", "prompt": "x"})
    assert status == 400 and out["input"] == "model"
    status, out = post(comfy, "/gentor/generate", {"model": tiny_models.QWEN_IMAGE_EDIT_2511, "prompt": "x",
                                                   "steps": 2, "width": 32, "height": 32})
    assert status == 400 and out["input"] == "model", out  # an edit model cannot run text-to-image
    models = json.loads(urllib.request.urlopen(comfy.url + "/gentor/models", timeout=30).read())
    assert models["count"] > 0 and models["busy"] is False
