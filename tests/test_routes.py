"""The /gentor/ routes (http_api/) with aiohttp's test client: no ComfyUI needed.

Cache listing and unload (fake services for the HTTP rules, the real ModelCache for "memory really
freed"), loader summaries confined to the registered model folders, the OpenAPI description.
"""
from __future__ import annotations

import asyncio
import gc
import json
import os
import weakref
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest

aiohttp = pytest.importorskip("aiohttp", reason="aiohttp (ComfyUI's web server library) is not installed")
from aiohttp import web  # noqa: E402
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402

from gentor import registry  # noqa: E402
from gentor.http_api import routes  # noqa: E402
from gentor.loaders import estimates  # noqa: E402
from gentor.loaders import inspect as inspection  # noqa: E402
from gentor.loaders.memory import MemoryOptions  # noqa: E402
from tests import tiny_models  # noqa: E402

QWEN = registry.get("qwen_image")


def serve(services: routes.Services, check: Callable[[TestClient], Awaitable[Any]], generate: bool = False) -> Any:
    """Run ``check(client)`` against an app holding only the Gentor routes."""

    async def main() -> Any:
        app = web.Application()
        routes.install(app, services, generate=generate)
        async with TestClient(TestServer(app)) as client:
            return await check(client)

    return asyncio.run(main())


class FakeCache:
    """inspect/unload with recorded calls; entries are plain dicts as ModelCache.inspect() returns."""

    def __init__(self, entries: list[dict]) -> None:
        self.entries = entries
        self.calls: list[str | None] = []

    def inspect(self) -> list[dict]:
        return [dict(e) for e in self.entries]

    def unload(self, key: str | None) -> int:
        self.calls.append(key)
        victims = [e for e in self.entries if not e["in_use"] and (key is None or e["id"] == key)]
        self.entries = [e for e in self.entries if e not in victims]
        return len(victims)


def entries() -> list[dict]:
    return [{"id": "aaa111", "kind": "qwen_image/transformer", "source": "/m/qwen_image/x/transformer",
             "bytes": 1000, "placement": "cpu", "in_use": False},
            {"id": "bbb222", "kind": "qwen2_5_vl", "source": "/m/qwen_image/x/text_encoder", "bytes": 234,
             "placement": "cpu", "in_use": False},
            {"id": "ccc333", "kind": "autoencoder_kl", "source": "/m/qwen_image/x/vae", "bytes": 5,
             "placement": "cpu", "in_use": True}]


def services_for(cache: FakeCache, busy: bool = False, **kw: Any) -> routes.Services:
    return routes.Services(inspect=cache.inspect, unload=cache.unload, busy=lambda: busy, **kw)


async def post_raw(client: TestClient, path: str, data: bytes) -> tuple[int, Any]:
    resp = await client.post(path, data=data, headers={"Content-Type": "application/json"})
    return resp.status, await resp.json()


# ----------------------------------------------------------------------------- listing / unload
def test_models_lists_entries_with_total():
    cache = FakeCache(entries())

    async def check(client: TestClient) -> None:
        resp = await client.get("/gentor/models")
        assert resp.status == 200
        body = await resp.json()
        assert [e["id"] for e in body["models"]] == ["aaa111", "bbb222", "ccc333"]
        assert body["total_bytes"] == 1000 + 234 + 5 and body["count"] == 3 and body["busy"] is False

    serve(services_for(cache), check)


@pytest.mark.parametrize("raw, field", [
    (b"not json", "body"), (b"[1, 2]", "body"), (b'"aaa111"', "body"), (b'{"id": 5}', "id"),
    (b'{"id": null}', "id"), (b'{"id": ""}', "id"), (b'{"id": "   "}', "id"), (b'{"id": ["aaa111"]}', "id"),
    (b"{}", "id"), (b'{"id": "aaa111", "extra": 1}', "id"), (b'{"all": false}', "all"), (b'{"all": "yes"}', "all"),
    (b'{"all": true, "id": "aaa111"}', "all"), (b"\xff\xfe", "body"),
])
def test_unload_malformed_bodies_are_400_json(raw, field):
    cache = FakeCache(entries())

    async def check(client: TestClient) -> None:
        status, body = await post_raw(client, "/gentor/unload", raw)
        assert status == 400, body
        assert body["input"] == field and body["error"].startswith("Gentor unload")
        assert "(got " in body["error"] and "expected" in body["error"]

    serve(services_for(cache), check)
    assert cache.calls == [] and len(cache.entries) == 3  # nothing freed on a bad request


def test_unload_oversized_body_is_413():
    cache = FakeCache(entries())

    async def check(client: TestClient) -> None:
        raw = json.dumps({"id": "x" * (routes.UNLOAD_BODY_LIMIT + 10)}).encode()
        status, body = await post_raw(client, "/gentor/unload", raw)
        assert status == 413 and body["input"] == "body"

    serve(services_for(cache), check)
    assert cache.calls == []


def test_unload_unknown_id_is_404_and_known_id_frees_only_it():
    cache = FakeCache(entries())

    async def check(client: TestClient) -> None:
        status, body = await post_raw(client, "/gentor/unload", b'{"id": "nope"}')
        assert status == 404 and body["input"] == "id" and "'nope'" in body["error"]
        status, body = await post_raw(client, "/gentor/unload", b'{"id": "bbb222"}')
        assert status == 200 and body == {"unloaded": 1, "all": False, "ids": ["bbb222"]}
        listed = await (await client.get("/gentor/models")).json()
        assert [e["id"] for e in listed["models"]] == ["aaa111", "ccc333"]
        # the first version's field name still works
        status, body = await post_raw(client, "/gentor/unload", b'{"key": "aaa111"}')
        assert status == 200 and body["ids"] == ["aaa111"]

    serve(services_for(cache), check)
    assert cache.calls == ["bbb222", "aaa111"]


def test_unload_in_use_entry_is_409_and_all_keeps_it():
    cache = FakeCache(entries())

    async def check(client: TestClient) -> None:
        status, body = await post_raw(client, "/gentor/unload", b'{"id": "ccc333"}')
        assert status == 409 and "in use" in body["error"]
        status, body = await post_raw(client, "/gentor/unload", b'{"all": true}')
        assert status == 200 and body["unloaded"] == 2 and body["ids"] == ["aaa111", "bbb222"] and body["all"]

    serve(services_for(cache), check)
    assert cache.calls == [None] and [e["id"] for e in cache.entries] == ["ccc333"]


def test_unload_refused_while_a_prompt_runs():
    cache = FakeCache(entries())

    async def check(client: TestClient) -> None:
        for raw in (b'{"id": "aaa111"}', b'{"all": true}'):
            status, body = await post_raw(client, "/gentor/unload", raw)
            assert status == 409 and "while a prompt is running" in body["error"]
        assert (await (await client.get("/gentor/models")).json())["busy"] is True

    serve(services_for(cache, busy=True), check)
    assert cache.calls == [] and len(cache.entries) == 3


def test_unload_frees_the_real_cache_entry():
    """Through the real ModelCache: the listed size is the module's own byte count, and after unload by
    id nothing references the weights any more."""
    import torch

    from gentor.loaders.cache import ModelCache

    cache = ModelCache(budget_bytes=1 << 30)
    module_ref: list[weakref.ref] = []
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"gentor-routes-{os.getpid()}"
    folder.mkdir(exist_ok=True)
    (folder / "w.bin").write_bytes(b"x")

    def load(*_args: Any) -> torch.nn.Module:
        m = torch.nn.Linear(16, 8)
        module_ref.append(weakref.ref(m))
        return m

    cache.get("test_linear", str(folder), load)
    expected = (16 * 8 + 8) * 4  # fp32 weight + bias, counted here by hand

    async def check(client: TestClient) -> None:
        listed = (await (await client.get("/gentor/models")).json())["models"]
        assert len(listed) == 1 and listed[0]["bytes"] == expected and listed[0]["kind"] == "test_linear"
        status, body = await post_raw(client, "/gentor/unload", json.dumps({"id": listed[0]["id"]}).encode())
        assert status == 200 and body["ids"] == [listed[0]["id"]]
        assert (await (await client.get("/gentor/models")).json())["models"] == []

    serve(routes.Services(inspect=cache.inspect, unload=cache.unload), check)
    gc.collect()
    assert module_ref[0]() is None, "unloaded weights are still referenced"


# ----------------------------------------------------------------------------- summaries
@pytest.fixture()
def summary_services(tiny_root: Path, tmp_path: Path) -> tuple[routes.Services, Path]:
    root = Path(tiny_root) / tiny_models.QWEN_IMAGE_FOLDER
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.safetensors").write_bytes(b"\0" * 10)
    link = tmp_path / "linkroot"
    link.mkdir()
    (link / "escape").symlink_to(outside, target_is_directory=True)
    roots = {"qwen_image": [str(root), str(link)], "diffusers": []}
    svc = routes.Services(inspect=lambda: [], unload=lambda _k: 0, roots=lambda key: roots.get(key, []),
                          backends=lambda: [QWEN])
    return svc, root


def folder_size(path: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


def header_params(folder: Path) -> int:
    """Parameters of the weighted components, counted from the safetensors headers here."""
    total = 0
    for role in ("transformer", "text_encoder", "vae"):
        for f in sorted((folder / role).glob("*.safetensors")):
            with f.open("rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n))
            for key, value in header.items():
                if key != "__metadata__":
                    count = 1
                    for d in value["shape"]:
                        count *= d
                    total += count
    return total


def test_summary_reports_variant_and_disk_size(summary_services):
    svc, root = summary_services

    async def check(client: TestClient) -> None:
        for name, variant in ((tiny_models.QWEN_IMAGE_T2I, "qwen-image"),
                              (tiny_models.QWEN_IMAGE_EDIT_2511, "qwen-image-edit-2511")):
            resp = await client.get("/gentor/summary", params={"folder": "qwen_image", "name": name})
            body = await resp.json()
            assert resp.status == 200, body
            assert body["variant"] == variant and body["backend"] == "qwen_image"
            assert body["disk_bytes"] == folder_size(root / name)
            assert body["params"] == header_params(root / name) and body["peak_vram_bytes"] > 0
            assert body["line"].startswith(f"{variant} · ") and "not loaded" in body["line"]
            assert "peak VRAM ~" in body["line"]

    serve(svc, check)


def test_summary_shows_what_is_loaded(summary_services):
    svc, root = summary_services
    source = str(root / tiny_models.QWEN_IMAGE_T2I / "transformer")
    svc.inspect = lambda: [{"id": "x", "source": source, "bytes": 2_500_000_000, "placement": "cpu"},
                           {"id": "y", "source": "/elsewhere/vae", "bytes": 7, "placement": "cuda:0"}]

    async def check(client: TestClient) -> None:
        body = await (await client.get("/gentor/summary", params={"folder": "qwen_image",
                                                                  "name": tiny_models.QWEN_IMAGE_T2I})).json()
        assert body["loaded_bytes"] == 2_500_000_000 and body["placements"] == ["cpu"]
        assert "loaded 2.50 GB (cpu)" in body["line"]

    serve(svc, check)


@pytest.mark.parametrize("params, status, field", [
    ({"folder": "qwen_image", "name": "../outside"}, 400, "name"),
    ({"folder": "qwen_image", "name": "/etc"}, 400, "name"),
    ({"folder": "qwen_image", "name": "x/../../outside"}, 400, "name"),
    ({"folder": "qwen_image", "name": "C:/Windows"}, 400, "name"),
    ({"folder": "qwen_image", "name": ""}, 400, "name"),
    ({"folder": "qwen_image", "name": "."}, 400, "name"),
    ({"folder": "qwen_image", "name": "no-such-model"}, 404, "name"),
    ({"folder": "checkpoints", "name": "x"}, 404, "folder"),
    ({"name": "x"}, 404, "folder"),
])
def test_summary_refuses_names_outside_the_model_folders(summary_services, params, status, field):
    svc, _root = summary_services

    async def check(client: TestClient) -> None:
        resp = await client.get("/gentor/summary", params=params)
        body = await resp.json()
        assert resp.status == status, body
        assert body["input"] == field and "(got " in body["error"] and "path" not in body

    serve(svc, check)


def test_summary_follows_a_symlink_inside_a_root(summary_services, tmp_path):
    """As the loaders do: the name is confined, a symlinked folder inside a root is the user's choice."""
    svc, _root = summary_services

    async def check(client: TestClient) -> None:
        resp = await client.get("/gentor/summary", params={"folder": "qwen_image", "name": "escape"})
        body = await resp.json()
        assert resp.status == 200 and body["disk_bytes"] == 10 and body["files"] == 1
        assert body["path"] == str((tmp_path / "outside").resolve())

    serve(svc, check)


def test_summary_of_a_folder_of_another_kind_says_so(summary_services, tmp_path):
    svc, root = summary_services
    bad = root / "not-a-pipeline-routes-test"
    bad.mkdir(exist_ok=True)
    (bad / "README.md").write_text("hello")

    async def check(client: TestClient) -> None:
        body = await (await client.get("/gentor/summary", params={"folder": "qwen_image",
                                                                  "name": bad.name})).json()
        assert body["variant"] is None and "not a Qwen-Image pipeline folder" in body["problem"]
        assert "not usable:" in body["line"] and body["disk_bytes"] == 5

    try:
        serve(svc, check)
    finally:
        (bad / "README.md").unlink()
        bad.rmdir()


def test_an_unexpected_failure_is_a_json_500():
    def broken() -> list[dict]:
        raise RuntimeError("boom")

    async def check(client: TestClient) -> None:
        resp = await client.get("/gentor/models")
        body = await resp.json()
        assert resp.status == 500 and "RuntimeError: boom" in body["error"] and body["input"] is None

    serve(routes.Services(inspect=broken, unload=lambda _k: 0), check)


# ----------------------------------------------------------------------------- backends / OpenAPI
def test_backends_and_openapi_cover_every_route():
    cache = FakeCache([])

    async def check(client: TestClient) -> None:
        backends = await (await client.get("/gentor/backends")).json()
        assert {b["id"] for b in backends} == {b.id for b in registry.available()}
        assert all(b["loader_node"].startswith("GentorLoad") for b in backends)
        spec = await (await client.get("/gentor/openapi.json")).json()
        assert spec["openapi"].startswith("3.")
        # HEAD (answered by each GET handler) and "*" (the 405 answer) are not operations of their own.
        served = {(r.method, r.resource.canonical) for r in client.app.router.routes() if r.method not in ("HEAD", "*")}
        described = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
        assert served == described
        gen = spec["paths"]["/gentor/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert set(gen["required"]) == {"model", "prompt"} and not gen["additionalProperties"]
        settings = gen["properties"]["settings"]  # no ComfyUI here: the nodes are named, not read
        assert all(f"{b.id}: {b.settings_node}" in settings["description"] for b in registry.available()
                   if b.settings_node) and "anyOf" not in settings

    serve(services_for(cache), check, generate=True)


# ----------------------------------------------------------------------------- wrong methods
def test_wrong_method_is_405_naming_the_allowed_ones():
    async def check(client: TestClient) -> None:
        for method, path, allowed in (("GET", "/gentor/generate", "POST"), ("GET", "/gentor/unload", "POST"),
                                      ("PUT", "/gentor/unload", "POST"), ("POST", "/gentor/models", "GET, HEAD"),
                                      ("DELETE", "/gentor/summary", "GET, HEAD")):
            resp = await client.request(method, path)
            body = await resp.json()
            assert resp.status == 405 and resp.headers["Allow"] == allowed, (method, path, body)
            assert body["input"] == "method" and f"(got {method}, expected" in body["error"]
        assert (await client.head("/gentor/models")).status == 200

    serve(services_for(FakeCache(entries())), check, generate=True)


# ----------------------------------------------------------------------------- unreadable weights
class RunsCode:
    """Unpickling this creates a folder: a reader that runs pickled code would leave it behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return os.mkdir, (str(self.marker),)


def bad_weights(folder: Path, marker: Path) -> dict[str, tuple[str, str]]:
    """name -> (folder key, what the summary must say was found) for files no summary may choke on."""
    import torch

    (folder / "deepgen").mkdir(parents=True)
    (folder / "deepgen" / "random.pt").write_bytes(os.urandom(4096))
    torch.save({"w": torch.zeros(2, 2), "hook": RunsCode(marker)}, folder / "deepgen" / "code.pt")
    torch.save({"w": torch.zeros(2), "step": RunsCode(marker)}, folder / "deepgen" / "legacy.pt",
               _use_new_zipfile_serialization=False)
    vt = folder / "emu35" / "vision-tokenizer"  # Emu3.5-VisionTokenizer's layout: config.yaml + model.ckpt
    vt.mkdir(parents=True)
    (vt / "config.yaml").write_text("model:\n  params:\n    embed_dim: 4\n")
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": RunsCode(marker)}, vt / "model.ckpt")
    return {"random.pt": ("deepgen", "not a torch checkpoint (got 4096 bytes starting"),
            "code.pt": ("deepgen", "pickles posix.mkdir besides tensors"),
            "legacy.pt": ("deepgen", "legacy torch pickle holding posix.mkdir"),
            "vision-tokenizer": ("emu35", "pickles posix.mkdir besides tensors")}


def test_summary_of_unreadable_weights_says_what_was_found_and_runs_no_code(tmp_path):
    folder, marker = tmp_path / "models", tmp_path / "pickle-ran-code"
    cases = bad_weights(folder, marker)
    backends = [b for b in registry.BACKENDS if b.id in ("deepgen", "emu35")]
    svc = routes.Services(inspect=lambda: [], unload=lambda _k: 0, roots=lambda key: [str(folder / key)],
                          backends=lambda: backends)

    async def check(client: TestClient) -> None:
        for name, (key, found) in cases.items():
            resp = await client.get("/gentor/summary", params={"folder": key, "name": name})
            body = await resp.json()
            assert resp.status == 200, (name, body)
            assert found in body["problem"] and "not usable: " in body["line"], (name, body["problem"])
            assert body["disk_bytes"] > 0 and body["backend"] == key

    serve(svc, check)
    assert not marker.exists(), "a pickle's code ran while describing it"


def test_summary_estimate_follows_the_wired_memory_options(summary_services):
    svc, root = summary_services
    name = tiny_models.QWEN_IMAGE_T2I
    report = inspection.inspect_path(root / name)

    async def get(client: TestClient, **memory: str) -> tuple[int, dict]:
        resp = await client.get("/gentor/summary", params={"folder": "qwen_image", "name": name, **memory})
        return resp.status, await resp.json()

    async def check(client: TestClient) -> None:
        _, plain = await get(client)
        status, fp8 = await get(client, weight_dtype="fp8_e4m3fn", offload="block")
        assert status == 200, fp8
        want = estimates.estimate(report, MemoryOptions(weight_dtype="fp8_e4m3fn", offload="block"))
        assert fp8["peak_vram_bytes"] == want.peak_vram < plain["peak_vram_bytes"]
        assert "(fp8_e4m3fn, offload block)" in fp8["line"]
        for params, field in (({"weight_dtype": "fp4"}, "weight_dtype"), ({"vram_budget_gb": "nan"}, "vram_budget_gb"),
                              ({"offlaod": "block"}, "offlaod")):
            status, body = await get(client, **params)
            assert status == 400 and body["input"] == field and "(got " in body["error"], body

    serve(svc, check)
