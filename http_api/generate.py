"""POST /gentor/generate: one JSON call -> images, through ComfyUI's own queue.

The request is checked, reference images are uploaded (``/upload/image``, type temp), a graph of the
pack's own nodes is built (loader [+ memory options] -> task node -> PreviewImage + PreviewAny for its
text) and queued with
``/prompt`` on the same server, so it shares the model cache, the memory manager, progress and Cancel
with the UI and never runs beside another prompt. The end of the run is seen on ComfyUI's websocket
(``/ws``), the result read from ``/history`` and ``/view``. Everything goes over ComfyUI's public HTTP
API (loopback to the listener that received the call), so the same code works on every ComfyUI version
and is tested against a fake server with aiohttp's test client.
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import json
import re
import secrets
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from .. import registry
from .common import RouteError, Services, read_json_object, shown

MIB = 1024 * 1024
LOADER, MEMORY, TASK, OUTPUT, TEXT = "gentor_loader", "gentor_memory", "gentor_task", "gentor_output", "gentor_text"
SETTINGS = "gentor_settings"
# Core's text preview (0.3.64 and later): an output node, so the task's text comes back from /history even when
# ComfyUI answers the task from its cache (0.8.0 records no UI of cached intermediate nodes).
TEXT_NODE = "PreviewAny"
IMAGE_NODE = "gentor_image_{}"
T2I_NODE, EDIT_NODE, MEMORY_NODE = "GentorTextToImage", "GentorEditImage", "GentorMemoryOptions"
UPLOAD_SUBFOLDER = "gentor_api"
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
MAX_JS_SEED = 2**53 - 1  # seeds we pick stay exact in JavaScript clients
END_EVENTS = ("execution_success", "execution_error", "execution_interrupted")
FIRST_POLL_S, MAX_POLL_S, WS_IDLE_S = 0.002, 0.05, 1.0
EXAMPLE = '{"model": "<name in the loader list>", "prompt": "a red fox"}'
FIELDS = {  # request field -> (JSON types accepted, what it is)
    "model": ((str,), "a model name from the loader's list"),
    "backend": ((str,), "a backend id, e.g. qwen_image (default: the backend whose list holds the model)"),
    "prompt": ((str,), "the prompt or edit instruction"),
    "negative": ((str,), "the negative prompt"),
    "steps": ((int,), "an integer (0 = the backend's default)"),
    "cfg": ((int, float), "a number (0 = the backend's default)"),
    "width": ((int,), "an integer (0 = the backend's size rule)"),
    "height": ((int,), "an integer (0 = the backend's size rule)"),
    "seed": ((int,), "a non-negative integer"),
    "batch_size": ((int,), "an integer (text-to-image only)"),
    "images": ((list,), "a list of base64 images or uploaded file names"),
    "memory": ((dict,), "Gentor Memory Options inputs, e.g. {\"weight_dtype\": \"fp8_e4m3fn\"}"),
    "loader": ((dict,), "extra inputs of the backend's loader node"),
    "settings": ((dict,), "inputs of the backend's settings node (Gentor BAGEL / DeepGen / Emu3.5 / Qwen-Image "
                          "Settings), e.g. {\"think\": true} for BAGEL"),
}
NODE_ERROR_STATUS = {"InputError": 400, "ModelFolderError": 400, "MemoryEstimateError": 507,
                     "MissingDependencyError": 501}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")  # inputs a request sets as plain values (not sockets)
SAFE_NAME = re.compile(r"^[^\\\x00]+$")


@dataclass(frozen=True)
class Limits:
    body_bytes: int = 64 * MIB  # the whole JSON body, base64 images included
    image_bytes: int = 16 * MIB  # one decoded image file
    image_pixels: int = 8192 * 8192  # one image (width x height), checked from its header before decoding
    timeout_s: float = 6 * 3600.0  # longest wait for a run (autoregressive models can take many minutes)


@dataclass
class Job:
    """A checked request."""

    body: dict
    seed: int
    images: list[str | bytes]  # uploaded/input file names, or decoded image bytes


def check_body(body: dict, max_images: int, limits: Limits) -> Job:
    """Types, unknown fields and image sizes; ranges are ComfyUI's own validation (errors are mapped back)."""
    unknown = sorted(set(body) - set(FIELDS))
    if unknown:
        raise RouteError(400, unknown[0], f"Gentor generate {unknown[0]}: unknown field (got {shown(unknown)}, "
                                          f"expected only {sorted(FIELDS)}). Remove or rename it.")
    for name in ("model", "prompt"):
        if name not in body:
            raise RouteError(400, name, f"Gentor generate {name}: missing (got no {name}, expected {FIELDS[name][1]}; "
                                        f"e.g. {EXAMPLE}). Add it to the request.")
    for name, value in body.items():
        types, what = FIELDS[name]
        ok = isinstance(value, types) and not isinstance(value, bool)
        if not ok and int in types and isinstance(value, float) and value.is_integer():
            body[name], ok = int(value), True
        if not ok:
            raise RouteError(400, name, f"Gentor generate {name}: wrong type (got {shown(value)}, expected {what}). "
                                        f"Send {name} as {what}.")
    if not body["model"].strip():
        raise RouteError(400, "model", f"Gentor generate model: empty (got {shown(body['model'])}, expected "
                                       f"{FIELDS['model'][1]}). Name a model.")
    for name in ("memory", "loader", "settings"):
        for key, value in body.get(name, {}).items():
            if not isinstance(value, (str, int, float, bool)):
                raise RouteError(400, f"{name}.{key}", f"Gentor generate {name}.{key}: not a plain value (got "
                                                       f"{shown(value)}, expected a string, number or boolean). "
                                                       "Send a plain value.")
    seed = body.get("seed")
    if seed is None:
        seed = secrets.randbelow(MAX_JS_SEED + 1)  # reported back so the image can be reproduced
    images = body.get("images", [])
    if len(images) > max_images:
        raise RouteError(413, "images", f"Gentor generate images: too many (got {len(images)}, expected at most "
                                        f"{max_images}). Send fewer reference images.")
    if images and "batch_size" in body:
        raise RouteError(400, "batch_size", "Gentor generate batch_size: applies to text-to-image only (got "
                                            f"{body['batch_size']} with {len(images)} images, expected no batch_size "
                                            "for an edit). Remove batch_size.")
    return Job(body, seed, [decode_image(v, i, limits) for i, v in enumerate(images)])


def decode_image(value: Any, index: int, limits: Limits) -> str | bytes:
    """An uploaded file name (kept) or base64 / data-URL image bytes (decoded and checked)."""
    field = f"images[{index}]"
    if not isinstance(value, str) or not value:
        raise RouteError(400, field, f"Gentor generate {field}: not an image (got {shown(value)}, expected base64 "
                                     "image data or an uploaded file name). Send a string.")
    if not value.startswith("data:") and "." in value:
        # Base64 has no '.', file names have an extension: this is a name in ComfyUI's input folder.
        parts = value.replace(" [input]", "").replace(" [temp]", "").split("/")
        if not SAFE_NAME.match(value) or value.startswith("/") or ".." in parts:
            raise RouteError(400, field, f"Gentor generate {field}: file name leaves the input folder (got "
                                         f"{shown(value)}, expected a name returned by /upload/image). Upload "
                                         "the image first or send it as base64.")
        return value
    if value.startswith("data:"):
        header, comma, data = value.partition(",")
        if not comma:
            raise RouteError(400, field, f"Gentor generate {field}: data URL without data (got {shown(value[:60])}, "
                                         "expected 'data:image/png;base64,<base64 data>'). Put a comma between the "
                                         "media type and the base64 data.")
    else:
        data = value
    if len(data) * 3 // 4 > limits.image_bytes:
        raise RouteError(413, field, f"Gentor generate {field}: image too large (got about {len(data) * 3 // 4} "
                                     f"bytes, expected at most {limits.image_bytes}). Send a smaller file.")
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RouteError(400, field, f"Gentor generate {field}: not valid base64 (got "
                                     f"{shown(value[:40])}: {exc}, expected base64 PNG/JPEG/WebP data or a file "
                                     "name). Encode the image file with base64.") from exc
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    try:
        with warnings.catch_warnings():
            # Our own pixel limit below decides; PIL's bomb warning would only add noise to the log.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(raw)) as img:  # reads the header only: no decompression bomb
                fmt, (w, h) = img.format, img.size
    except Image.DecompressionBombError as exc:  # PIL refuses headers claiming > 2x its MAX_IMAGE_PIXELS
        raise RouteError(413, field, f"Gentor generate {field}: too many pixels (got a header claiming more than "
                                     f"{2 * Image.MAX_IMAGE_PIXELS} pixels: {exc}, expected at most "
                                     f"{limits.image_pixels} pixels). Downscale the image.") from exc
    except (UnidentifiedImageError, OSError) as exc:
        raise RouteError(400, field, f"Gentor generate {field}: not an image file (got {len(raw)} bytes that no "
                                     f"image reader knows, expected one of {', '.join(IMAGE_FORMATS)}). Send a "
                                     "PNG, JPEG or WebP file.") from exc
    if fmt not in IMAGE_FORMATS:
        raise RouteError(400, field, f"Gentor generate {field}: unsupported format (got {fmt}, expected one of "
                                     f"{', '.join(IMAGE_FORMATS)}). Convert it to PNG.")
    if w * h > limits.image_pixels:
        raise RouteError(413, field, f"Gentor generate {field}: too many pixels (got {w}x{h}, expected at most "
                                     f"{limits.image_pixels} pixels). Downscale the image.")
    return raw


# ----------------------------------------------------------------------------- node definitions
def input_spec(info: dict, name: str) -> tuple[str, dict] | None:
    """(type, options) of one input of an /object_info node definition, or None."""
    for group in ("required", "optional"):
        spec = info.get("input", {}).get(group, {}).get(name)
        if spec is not None:
            return spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    return None


def combo_options(kind: Any, opts: dict) -> list | None:
    """The choices of a combo input in either /object_info form (V1 list or V3 'COMBO' + options)."""
    if isinstance(kind, list):
        return kind
    if kind == "COMBO":
        return list(opts.get("options", []))
    return None


def default_value(kind: Any, opts: dict) -> Any:
    if "default" in opts:
        return opts["default"]
    choices = combo_options(kind, opts)
    if choices:
        return choices[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind)


def fill_required(info: dict, given: dict, skip: set[str]) -> dict:
    """``given`` plus the default of every required widget input not given (nodes may gain inputs)."""
    out = dict(given)
    for name, spec in info.get("input", {}).get("required", {}).items():
        if name in out or name in skip:
            continue
        value = default_value(spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
        if value is not None:
            out[name] = value
    return out


JSON_TYPES = {"INT": "integer", "FLOAT": "number", "STRING": "string", "BOOLEAN": "boolean"}


def node_schema(info: dict) -> dict:
    """A JSON schema of a node's widget inputs from its /object_info definition (type, range, default)."""
    props: dict[str, dict] = {}
    for group in ("required", "optional"):
        for name, spec in info.get("input", {}).get(group, {}).items():
            kind, opts = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            choices = combo_options(kind, opts)
            if choices is not None:
                prop: dict[str, Any] = {"enum": choices}
            elif kind in JSON_TYPES:
                prop = {"type": JSON_TYPES[kind]}
                prop.update({k: opts[v] for k, v in (("minimum", "min"), ("maximum", "max")) if v in opts})
            else:
                continue  # a socket, not a value
            prop.update({k: opts[k] for k in ("default",) if k in opts})
            if opts.get("tooltip"):
                prop["description"] = opts["tooltip"]
            props[name] = prop
    return {"type": "object", "additionalProperties": False, "properties": props}


def check_inputs(section: str, given: dict, info: dict, taken: set[str]) -> None:
    """Refuse a key of a request section that is not a widget input of its node (a typo never silently does
    nothing); ``taken`` are inputs the request fills from other fields."""
    known = sorted(n for group in ("required", "optional") for n, spec in info.get("input", {}).get(group, {}).items()
                   if n not in taken and isinstance(spec, (list, tuple)) and spec
                   and (combo_options(spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
                        is not None or spec[0] in WIDGET_TYPES))
    for key in given:
        if key not in known:
            node = info.get("display_name") or info.get("name") or "the node"
            raise RouteError(400, f"{section}.{key}", f"Gentor generate {section}.{key}: unknown option (got "
                                                      f"{shown(key)}, expected one of {known}). Use {node}'s "
                                                      "input names.")


def model_input(info: dict) -> str:
    """The loader input that names the model: ``model_name`` by convention, else its first combo."""
    required = info.get("input", {}).get("required", {})
    if "model_name" in required:
        return "model_name"
    for name, spec in required.items():
        if combo_options(spec[0], spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}) is not None:
            return name
    return "model_name"


def build_graph(job: Job, loader_node: str, loader_info: dict, memory_info: dict | None, task_info: dict,
                image_names: list[str], settings: tuple[str, dict] | None = None) -> dict:
    """The API-format prompt: loader [+ memory] -> task node [+ settings] -> PreviewImage; ``settings`` is the
    backend's settings node and its definition when the request has settings."""
    body = job.body
    model_key = model_input(loader_info)
    loader_inputs = fill_required(loader_info, {model_key: body["model"], **body.get("loader", {})}, set())
    graph: dict[str, dict] = {}
    if "memory" in body:
        graph[MEMORY] = {"class_type": MEMORY_NODE, "inputs": fill_required(memory_info or {}, body["memory"], set())}
        loader_inputs["memory"] = [MEMORY, 0]
    graph[LOADER] = {"class_type": loader_node, "inputs": loader_inputs}
    task = {"model": [LOADER, 0], "prompt": body["prompt"], "negative": body.get("negative", ""),
            "seed": job.seed, "steps": body.get("steps", 0), "cfg": float(body.get("cfg", 0.0)),
            "width": body.get("width", 0), "height": body.get("height", 0)}
    if image_names:
        for i, name in enumerate(image_names, start=1):
            graph[IMAGE_NODE.format(i)] = {"class_type": "LoadImage", "inputs": {"image": name}}
            task[f"image_{i}"] = [IMAGE_NODE.format(i), 0]
    else:
        task["batch_size"] = body.get("batch_size", 1)
    if settings is not None:
        # The backend's own settings node checks the values (ComfyUI's ranges, then the node's checks).
        graph[SETTINGS] = {"class_type": settings[0], "inputs": fill_required(settings[1], body["settings"], set())}
        task["settings"] = [SETTINGS, 0]
    graph[TASK] = {"class_type": EDIT_NODE if image_names else T2I_NODE,
                   "inputs": fill_required(task_info, task, set())}
    graph[OUTPUT] = {"class_type": "PreviewImage", "inputs": {"images": [TASK, 0]}}
    graph[TEXT] = {"class_type": TEXT_NODE, "inputs": {"source": [TASK, 1]}}
    return graph


def request_field(node_id: str, input_name: str | None) -> str | None:
    """Which request field a graph node's input came from (for errors)."""
    if node_id == LOADER:
        return "model" if input_name in (None, "model_name") else f"loader.{input_name}"
    if node_id == MEMORY:
        return f"memory.{input_name}" if input_name else "memory"
    if node_id == SETTINGS:
        return f"settings.{input_name}" if input_name else "settings"
    if node_id.startswith(IMAGE_NODE.format("")):
        return f"images[{int(node_id.rsplit('_', 1)[1]) - 1}]"
    if node_id == TASK and input_name:
        match = re.fullmatch(r"image_(\d+)", input_name)
        return f"images[{int(match.group(1)) - 1}]" if match else ("model" if input_name == "model" else input_name)
    return None


def field_from_message(node_id: str, message: str) -> str | None:
    """Our error messages start '<Backend> <input>: ...': map that input to a request field."""
    word = message.split(":", 1)[0].rsplit(" ", 1)[-1] if ":" in message else ""
    if node_id == TASK and re.fullmatch(r"image_\d+\.\.image_\d+", word):
        return "images"  # a refusal about all reference inputs together
    if node_id == TASK and (word in FIELDS or re.fullmatch(r"image_\d+", word)):
        return request_field(TASK, word)
    if node_id in (MEMORY, SETTINGS) and re.fullmatch(r"[a-z_0-9]+", word):
        return request_field(node_id, word)
    return request_field(node_id, None)


def rejected(status: int, body: Any) -> RouteError:
    """A /prompt refusal (validation) as our JSON error naming the request field."""
    node_errors = body.get("node_errors", {}) if isinstance(body, dict) else {}
    for node_id, info in node_errors.items():
        for err in info.get("errors", []):
            name = (err.get("extra_info") or {}).get("input_name")
            field = request_field(node_id, name) or node_id
            got = (err.get("extra_info") or {}).get("received_value", err.get("details", ""))
            return RouteError(400, field, f"Gentor generate {field}: {err.get('message', 'rejected')} (got "
                                          f"{shown(got)}, expected a value the node accepts: {err.get('details', '')}"
                                          f"). Fix {field}.", node=info.get("class_type"), comfyui=body)
    err = body.get("error", {}) if isinstance(body, dict) else {}
    message = err.get("message", str(body)) if isinstance(err, dict) else str(err)
    return RouteError(400 if status < 500 else 502, None, f"Gentor generate: ComfyUI refused the graph ({message}; "
                                                          f"got HTTP {status}, expected a queued prompt). "
                                                          "See 'comfyui' for its answer.", comfyui=body)


def images_advice(message: str) -> str:
    """A node's refusal of too many reference images ends with what to do in the graph ("Disconnect ..."): a
    REST caller is told what to send in ``images`` instead."""
    head, sep, _todo = message.rpartition(").")
    most = re.search(r"expected at most (\d+)", head)
    if not sep or not most:
        return message
    return f"{head}). Send at most {most.group(1)} images in the request's images list."


def run_failure(entry: dict, prompt_id: str) -> RouteError:
    """A finished run without images (node error, Cancel) as our JSON error."""
    for name, data in entry.get("status", {}).get("messages", []):
        if name == "execution_interrupted":
            return RouteError(409, None, "Gentor generate: cancelled (got an interrupt while running, expected a "
                                         "finished run). Send the request again.", prompt_id=prompt_id)
        if name == "execution_error":
            node_id, msg = str(data.get("node_id")), str(data.get("exception_message", "")).strip()
            kind = str(data.get("exception_type", "")).rsplit(".", 1)[-1]
            field = field_from_message(node_id, msg)
            if field and field.startswith("images"):
                msg = images_advice(msg)
            return RouteError(NODE_ERROR_STATUS.get(kind, 500), field, msg or f"Gentor generate: {kind}",
                              node=data.get("node_type"), exception_type=data.get("exception_type"),
                              prompt_id=prompt_id)
    return RouteError(500, None, "Gentor generate: the run produced no image (got no output images, expected at "
                                 "least one). See ComfyUI's log.", prompt_id=prompt_id)


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
