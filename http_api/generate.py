"""POST /gentor/generate: one JSON call -> images, through ComfyUI's own queue.

The request is checked, reference images are uploaded (``/upload/image``, type temp), a graph of the
pack's own nodes is built (loader [+ memory options] -> task node -> PreviewImage + PreviewAny for its
text) and queued with
``/prompt`` on the same server, so it shares the model cache, the memory manager, progress and Cancel
with the UI and never runs beside another prompt. The end of the run is seen on ComfyUI's websocket
(``/ws``), the result read from ``/history`` and ``/view``. Everything goes over ComfyUI's public HTTP
API (loopback to the listener that received the call), so the same code works on every ComfyUI version
and is tested against a fake server with aiohttp's test client. The body's checks are request.py, the
graph and the mapping of ComfyUI's answers back to request fields graph.py.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import re
import time
import uuid
from typing import Any

import aiohttp
from aiohttp import web

from .. import registry
from .common import RouteError, Services, read_json_object, shown
from .graph import (EDIT_NODE, MEMORY_NODE, OUTPUT, T2I_NODE, TASK, TEXT, build_graph, check_inputs, combo_options,
                    input_spec, model_input, node_schema, rejected, run_failure)
from .request import EXAMPLE, Job, Limits, check_body

UPLOAD_SUBFOLDER = "gentor_api"
END_EVENTS = ("execution_success", "execution_error", "execution_interrupted")
FIRST_POLL_S, MAX_POLL_S, WS_IDLE_S = 0.002, 0.05, 1.0


def self_url(request: web.Request) -> str:
    """The listener that received this call: the loopback target for ComfyUI's own endpoints."""
    sock = request.transport.get_extra_info("sockname") if request.transport else None
    if not isinstance(sock, tuple):
        raise RouteError(500, None, "Gentor generate: cannot reach ComfyUI's own API (got a non-TCP listener, "
                                    "expected a host and port). Start ComfyUI with --listen.")
    host = sock[0]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"{request.scheme}://{f'[{host}]' if ':' in host else host}:{sock[1]}"


class GenerateRoute:
    """The /gentor/generate handler; node definitions are read once from /object_info and kept."""

    def __init__(self, services: Services, limits: Limits = Limits()) -> None:
        self.services = services
        self.limits = limits
        self._info: dict[str, dict] = {}

    async def handle(self, request: web.Request) -> web.Response:
        body = await read_json_object(request, self.limits.body_bytes, "generate", EXAMPLE)
        async with aiohttp.ClientSession(self_url(request), timeout=aiohttp.ClientTimeout(total=None)) as client:
            edit_info = await self.node_info(client, EDIT_NODE)
            max_images = sum(1 for n in edit_info.get("input", {}).get("optional", {}) if re.fullmatch(r"image_\d+", n))
            job = check_body(body, max_images or registry.max_references(), self.limits)
            return web.json_response(await self.run(client, job))

    async def node_info(self, client: aiohttp.ClientSession, node: str, refresh: bool = False) -> dict:
        if refresh or node not in self._info:
            async with client.get(f"/object_info/{node}") as resp:
                data = await resp.json() if resp.status == 200 else {}
            if node not in data:
                raise RouteError(500, None, f"Gentor generate: node {node} is not registered (got no /object_info "
                                            f"entry, expected the Gentor nodes). Check ComfyUI's log for import errors.")
            self._info[node] = data[node]
        return self._info[node]

    async def pick_loader(self, client: aiohttp.ClientSession, job: Job) -> tuple[str, dict]:
        """The loader node whose model list holds ``model`` (re-reading the lists once for new files)."""
        task = registry.TASK_EDIT if job.images else registry.TASK_T2I
        specs = [b for b in self.services.backends() if b.loader_node and task in b.tasks]
        wanted = job.body.get("backend")
        if wanted is not None:
            specs = [b for b in specs if b.id == wanted]
            if not specs:
                known = [b.id for b in self.services.backends() if task in b.tasks]
                raise RouteError(400, "backend", f"Gentor generate backend: unknown, not installed or without "
                                                 f"{task} (got {shown(wanted)}, expected one of {known}). Use a "
                                                 "listed backend.")
        name, choices = job.body["model"], []
        for refresh in (False, True):
            choices = []
            for spec in specs:
                try:
                    info = await self.node_info(client, spec.loader_node, refresh)
                except RouteError:
                    continue  # a backend whose nodes did not register (see ComfyUI's log) holds no model here
                kind, opts = input_spec(info, model_input(info)) or (None, {})
                options = combo_options(kind, opts) or []
                if name in options:
                    return spec.loader_node, info
                choices.extend(options)
        raise RouteError(400, "model", f"Gentor generate model: not found (got {shown(name)}, expected one of "
                                       f"{choices[:12]}). Put the model into its models/ folder and use its name "
                                       "as the loader lists it.")

    async def settings_node(self, client: aiohttp.ClientSession, spec: registry.BackendSpec) -> tuple[str, dict]:
        """(node id, definition) of a backend's settings node; RouteError when it has none."""
        if not spec.settings_node:
            with_settings = [b.id for b in self.services.backends() if b.settings_node]
            raise RouteError(400, "settings", f"Gentor generate settings: {spec.display_name} has no settings node "
                                              f"(got settings for {spec.id}, expected them only for "
                                              f"{with_settings}). Remove settings.")
        return spec.settings_node, await self.node_info(client, spec.settings_node)

    async def settings_schemas(self, request: web.Request) -> dict[str, dict]:
        """Backend id -> JSON schema of its settings node's inputs, read from ComfyUI's /object_info (for the
        OpenAPI document); backends whose node is not registered, or no reachable API, give none."""
        out: dict[str, dict] = {}
        try:
            async with aiohttp.ClientSession(self_url(request), timeout=aiohttp.ClientTimeout(total=30)) as client:
                for spec in self.services.backends():
                    if spec.settings_node:
                        try:
                            out[spec.id] = node_schema(await self.node_info(client, spec.settings_node))
                        except RouteError:
                            continue  # this backend's nodes did not register (see ComfyUI's log)
        except (aiohttp.ClientError, RouteError, OSError, asyncio.TimeoutError):
            return out  # the description then names the settings nodes without their inputs
        return out

    async def upload(self, client: aiohttp.ClientSession, raw: bytes) -> str:
        """Upload bytes to ComfyUI's temp folder (content-named, so repeats reuse one file)."""
        name = hashlib.sha256(raw).hexdigest()[:32] + ".png"
        form = aiohttp.FormData()
        form.add_field("image", raw, filename=name, content_type="application/octet-stream")
        form.add_field("type", "temp")
        form.add_field("subfolder", UPLOAD_SUBFOLDER)
        form.add_field("overwrite", "true")
        async with client.post("/upload/image", data=form) as resp:
            data = await resp.json(content_type=None) if resp.status == 200 else None
        if not isinstance(data, dict) or "name" not in data:
            raise RouteError(502, "images", f"Gentor generate images: upload failed (got HTTP {resp.status}, "
                                            "expected the stored name). See ComfyUI's log.")
        sub = data.get("subfolder") or ""
        return f"{sub}/{data['name']}".lstrip("/") + f" [{data.get('type', 'temp')}]"

    async def run(self, client: aiohttp.ClientSession, job: Job) -> dict:
        loader_node, loader_info = await self.pick_loader(client, job)
        spec = next(b for b in self.services.backends() if b.loader_node == loader_node)
        if len(job.images) > spec.max_references:
            raise RouteError(413, "images", f"Gentor generate images: too many for {spec.display_name} (got "
                                            f"{len(job.images)}, expected at most {spec.max_references}). Send at "
                                            f"most {spec.max_references} images in the request's images list.")
        names = [v if isinstance(v, str) else await self.upload(client, v) for v in job.images]
        task_info = await self.node_info(client, EDIT_NODE if names else T2I_NODE)
        memory_info = await self.node_info(client, MEMORY_NODE) if "memory" in job.body else None
        if memory_info is not None:
            check_inputs("memory", job.body["memory"], memory_info, set())
        # The loader's model input comes from "model", its memory socket from "memory".
        check_inputs("loader", job.body.get("loader", {}), loader_info, {model_input(loader_info), "memory"})
        settings = await self.settings_node(client, spec) if "settings" in job.body else None
        if settings is not None:
            check_inputs("settings", job.body["settings"], settings[1], set())
        graph = build_graph(job, loader_node, loader_info, memory_info, task_info, names, settings)
        client_id = uuid.uuid4().hex
        ws = await client.ws_connect(f"/ws?clientId={client_id}", autoping=True)
        try:
            async with client.post("/prompt", json={"prompt": graph, "client_id": client_id}) as resp:
                answer = await resp.json(content_type=None)
                if resp.status != 200 or not isinstance(answer, dict) or "prompt_id" not in answer:
                    raise rejected(resp.status, answer)
            prompt_id = answer["prompt_id"]
            try:
                entry = await self.wait(client, ws, prompt_id)
            except asyncio.CancelledError:
                await self.abandon(client, prompt_id)  # the caller went away: do not keep the queue busy
                raise
        finally:
            await ws.close()
        return await self.collect(client, job, entry, prompt_id)

    async def wait(self, client: aiohttp.ClientSession, ws: Any, prompt_id: str) -> dict:
        """Block until /history has the finished prompt; websocket events wake us, polling backs them up."""
        deadline = time.monotonic() + self.limits.timeout_s
        delay, ended = FIRST_POLL_S, False
        while time.monotonic() < deadline:
            if ended or ws.closed:
                entry = await self.history(client, prompt_id)
                if entry is not None:
                    return entry
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_POLL_S)
                continue
            try:
                msg = await ws.receive(timeout=WS_IDLE_S)
            except asyncio.TimeoutError:
                ended = await self.history(client, prompt_id) is not None
                continue
            if msg.type == aiohttp.WSMsgType.TEXT:
                data = json.loads(msg.data)
                payload = data.get("data") or {}
                if payload.get("prompt_id") == prompt_id and (
                        data.get("type") in END_EVENTS or (data.get("type") == "executing" and payload.get("node") is None)):
                    ended = True  # /history is written just after these events: poll it briefly
        await self.abandon(client, prompt_id)
        raise RouteError(504, None, f"Gentor generate: timed out (got no result within {self.limits.timeout_s:.0f} s, "
                                    "expected a finished run). The prompt was removed; try fewer steps.")

    async def history(self, client: aiohttp.ClientSession, prompt_id: str) -> dict | None:
        async with client.get(f"/history/{prompt_id}") as resp:
            data = await resp.json(content_type=None) if resp.status == 200 else {}
        entry = data.get(prompt_id) if isinstance(data, dict) else None
        status = (entry or {}).get("status") or {}
        return entry if entry is not None and (status.get("completed") or status.get("status_str")) else None

    async def abandon(self, client: aiohttp.ClientSession, prompt_id: str) -> None:
        """Remove a pending prompt from the queue, or interrupt it if it is the one running."""
        async with client.post("/queue", json={"delete": [prompt_id]}):
            pass
        async with client.post("/interrupt", json={"prompt_id": prompt_id}):
            pass

    async def collect(self, client: aiohttp.ClientSession, job: Job, entry: dict, prompt_id: str) -> dict:
        from PIL import Image  # noqa: PLC0415

        outputs = entry.get("outputs", {})
        refs = outputs.get(OUTPUT, {}).get("images", [])
        if not refs:
            raise run_failure(entry, prompt_id)
        images, size = [], (0, 0)
        for ref in refs:
            params = {k: ref.get(k, "") for k in ("filename", "subfolder", "type")}
            async with client.get("/view", params=params) as resp:
                raw = await resp.read()
            with Image.open(io.BytesIO(raw)) as img:
                size = img.size
            images.append(base64.b64encode(raw).decode("ascii"))
        texts = outputs.get(TEXT, {}).get("text") or outputs.get(TASK, {}).get("text", [])
        text = "\n".join(str(t) for t in texts)
        steps = re.search(r"\bsteps=(\d+)", text)  # the samplers' notes say which steps they used
        return {"images": images, "width": size[0], "height": size[1], "seed": job.seed,
                "steps": int(steps.group(1)) if steps else job.body.get("steps", 0), "text": text,
                "prompt_id": prompt_id}
