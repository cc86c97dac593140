"""Gentor's HTTP routes on ComfyUI's own server, all under ``/gentor/``.

    GET  /gentor/models         what the shared model cache holds (one object per component)
    POST /gentor/unload         {"id": "<entry id>"} or {"all": true}
    GET  /gentor/summary        ?folder=<model folder key>&name=<name in that folder>: a loader summary
    GET  /gentor/backends       the registered backends (the web extension maps loader nodes with it)
    POST /gentor/generate       one call -> images (routes_generate.py)
    GET  /gentor/openapi.json   the OpenAPI description of all of the above

Plain aiohttp and the pack's own modules, no ComfyUI import: everything ComfyUI-specific (is a prompt
running?) comes in through ``Services``, so the handlers are tested with aiohttp's test client.
``glue.register_routes`` installs them on ComfyUI's server.
"""
from __future__ import annotations

import importlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

from . import glue, registry
from .errors import GentorError
from .loaders.files import safe_name_parts

log = logging.getLogger(__name__)

PREFIX = "/gentor"
UNLOAD_BODY_LIMIT = 64 * 1024  # an unload request is a tiny JSON object
MAX_NAME_CHARS = 1024
BYTES_PER_GB = 1e9
BYTES_PER_MB = 1e6
SHOWN_MAX = 200  # characters of a bad value repeated in an error message

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class RouteError(GentorError):
    """A request the routes refuse: carries the HTTP status and the request input it is about."""

    def __init__(self, status: int, input_name: str | None, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.input_name = input_name
        self.extra = extra

    def response(self) -> web.Response:
        body = {"error": str(self), "input": self.input_name, **self.extra}
        return web.json_response(body, status=self.status)


def shown(value: Any) -> str:
    """A bad value as repeated in an error message: repr, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= SHOWN_MAX else text[:SHOWN_MAX] + "..."


@dataclass
class Services:
    """What the routes need from the running process (the real cache and ComfyUI, or fakes in tests)."""

    inspect: Callable[[], list[dict]]
    unload: Callable[[str | None], int]  # an entry id, or None for every unpinned entry; returns the count
    busy: Callable[[], bool] = lambda: False  # a prompt is executing right now
    roots: Callable[[str], list[str]] = glue.model_roots  # folder key -> registered root folders
    backends: Callable[[], list[registry.BackendSpec]] = registry.available
    describe: Callable[[registry.BackendSpec, Path], dict | None] | None = None  # variant detection


def json_errors(handler: Handler) -> Handler:
    """Turn RouteError (and any GentorError) raised by a handler into its JSON response; anything else is
    logged and answered as a JSON 500."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except RouteError as exc:
            return exc.response()
        except GentorError as exc:
            return web.json_response({"error": str(exc), "input": None}, status=400)
        except web.HTTPException:
            raise
        except Exception as exc:  # noqa: BLE001 - an API answers JSON even for our own bugs; logged in full
            log.exception("Gentor route %s failed", request.path)
            return web.json_response({"error": f"Gentor {request.path}: internal error ({type(exc).__name__}: "
                                               f"{exc}). See ComfyUI's log.", "input": None}, status=500)

    wrapped.__name__ = getattr(handler, "__name__", "handler")
    return wrapped


# ----------------------------------------------------------------------------- request bodies
async def read_json_object(request: web.Request, limit: int, what: str, example: str) -> dict:
    """The request body as a JSON object; 413 above ``limit`` bytes, 400 for anything but an object."""
    if request.content_length is not None and request.content_length > limit:
        raise RouteError(413, "body", f"Gentor {what} body: too large (got {request.content_length} bytes, expected "
                                      f"at most {limit}). Send a smaller request.")
    raw = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        raw.extend(chunk)
        if len(raw) > limit:  # chunked uploads carry no Content-Length: count while reading
            raise RouteError(413, "body", f"Gentor {what} body: too large (got more than {limit} bytes, expected "
                                          f"at most {limit}). Send a smaller request.")
    try:
        body = json.loads(bytes(raw).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RouteError(400, "body", f"Gentor {what} body: not valid JSON (got {shown(bytes(raw[:80]))}: {exc}, "
                                      f"expected {example}). Send a JSON object.") from exc
    if not isinstance(body, dict):
        raise RouteError(400, "body", f"Gentor {what} body: not a JSON object (got a {type(body).__name__}, "
                                      f"expected {example}). Send a JSON object.")
    return body


# ----------------------------------------------------------------------------- cache
def models_payload(services: Services) -> dict:
    entries = services.inspect()
    return {"models": entries, "count": len(entries), "total_bytes": sum(int(e.get("bytes", 0)) for e in entries),
            "busy": bool(services.busy())}


def unload_target(body: dict) -> str | None:
    """The entry id an unload body names, or None for ``{"all": true}``; RouteError when malformed."""
    example = '{"id": "<id from /gentor/models>"} or {"all": true}'
    if "all" in body:
        if body["all"] is not True or len(body) != 1:
            raise RouteError(400, "all", f"Gentor unload all: malformed (got {shown(body)}, expected exactly "
                                         '{"all": true}). Send {"all": true} alone, or one id.')
        return None
    # "key" is the field name of the first version of this route; "id" is the documented one.
    names = [k for k in ("id", "key") if k in body]
    if len(names) != 1 or len(body) != 1:
        raise RouteError(400, "id", f"Gentor unload id: malformed body (got keys {sorted(body)}, expected "
                                    f"{example}). Send one id or all.")
    value = body[names[0]]
    if not isinstance(value, str):
        raise RouteError(400, "id", f"Gentor unload id: not a string (got {shown(value)}, expected {example}). "
                                    "Send the id string from /gentor/models.")
    if not value.strip():
        raise RouteError(400, "id", f"Gentor unload id: empty (got {shown(value)}, expected {example}). Send the "
                                    "id string from /gentor/models, or {\"all\": true}.")
    return value


def do_unload(services: Services, target: str | None) -> dict:
    if services.busy():
        # Never free weights under a running prompt: its sampler may be reading them right now.
        raise RouteError(409, "id" if target else "all",
                         "Gentor unload: refused while a prompt is running (got a request during a run, expected an "
                         "idle queue). Wait for the run to finish or cancel it, then unload.")
    entries = {e["id"]: e for e in services.inspect() if "id" in e}
    if target is not None:
        entry = entries.get(target)
        if entry is None:
            known = sorted(entries)[:8]
            raise RouteError(404, "id", f"Gentor unload id: no such cache entry (got {shown(target)}, expected one "
                                        f"of {known}). Refresh /gentor/models; it may already be unloaded.")
        if entry.get("in_use"):
            raise RouteError(409, "id", f"Gentor unload id: {target} is in use by a run (got in_use=true, expected "
                                        "an idle entry). Wait for the run to finish, then unload.")
    count = services.unload(target)
    left = {e.get("id") for e in services.inspect()}
    return {"unloaded": count, "all": target is None, "ids": sorted(set(entries) - left)}


# ----------------------------------------------------------------------------- loader summaries
def folder_keys(services: Services) -> list[str]:
    keys: list[str] = []
    for spec in services.backends():
        keys.extend(k for k in spec.folder_keys if k not in keys)
    return keys


def resolve_name(services: Services, key: str, name: str) -> Path:
    """A name inside one of ``key``'s registered roots (first root wins), as the loaders resolve it.

    The NAME is confined (no absolute path, '..' or empty part: clients can send any string); a symlink
    inside a root is followed, as the loaders do (models kept on another disk)."""
    parts = safe_name_parts(name) if name and len(name) <= MAX_NAME_CHARS else None
    roots = [Path(r) for r in services.roots(key)]
    if parts is None:
        raise RouteError(400, "name", f"Gentor summary name: outside the model folders (got {shown(name)}, expected "
                                      f"a name relative to models/{key}/, no absolute path or '..'). Pick a name "
                                      "from the loader's list.")
    for root in roots:
        cand = root.joinpath(*parts)
        if cand.exists():
            return cand.resolve()
    raise RouteError(404, "name", f"Gentor summary name: not found (got {shown(name)}, expected a file or folder "
                                  f"inside {', '.join(map(str, roots)) or f'models/{key}/'}). Refresh the node list.")


def disk_bytes(path: Path) -> tuple[int, int]:
    """(bytes, files) of a file or of everything below a folder."""
    if path.is_file():
        return path.stat().st_size, 1
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def default_describe(spec: registry.BackendSpec, path: Path) -> dict | None:
    """Variant by the backend's own loader check (``inspect_folder``, which raises GentorError for another
    layout), then sizes and the peak-VRAM estimate from loaders/inspect.py (headers only, no weights)."""
    info: dict[str, Any] = {}
    module = importlib.import_module(f"{__package__}.loaders.{spec.id}")
    inspect_folder = getattr(module, "inspect_folder", None)
    if inspect_folder is not None and path.is_dir():
        info["variant"] = getattr(inspect_folder(path), "variant", None)
    from .loaders import inspect as model_inspect  # noqa: PLC0415 - reads headers; imports torch
    from .loaders.memory import MemoryOptions  # noqa: PLC0415

    report = model_inspect.inspect_path(path)
    if report.backend != spec.id:
        return info or None
    est = model_inspect.estimate(report, MemoryOptions())
    info.update(variant=info.get("variant") or report.variant, params=report.params,
                resting_bytes=est.resting_bytes, peak_vram_bytes=est.peak_vram,
                estimate_for=f"{est.options.weight_dtype}, offload {est.options.offload}")
    return info


def summary(services: Services, key: str, name: str) -> dict:
    """What a loader node shows under its model choice: variant, size on disk, what is loaded."""
    keys = folder_keys(services)
    if key not in keys:
        raise RouteError(404, "folder", f"Gentor summary folder: unknown model folder (got {shown(key)}, expected "
                                        f"one of {keys}). Use a folder key of an installed backend.")
    path = resolve_name(services, key, name)
    size, files = disk_bytes(path)
    out: dict[str, Any] = {"folder": key, "name": name, "path": str(path), "disk_bytes": size, "files": files,
                           "backend": None, "variant": None}
    problems = []
    for spec in services.backends():
        if key not in spec.folder_keys:
            continue
        out["backend"] = out["backend"] or spec.id
        describe = services.describe or default_describe
        try:
            info = describe(spec, path)
        except (GentorError, OSError, ValueError) as exc:  # not this backend's layout: say so, try the next one
            problems.append(str(exc))
            continue
        if info:
            out.update({k: v for k, v in info.items() if k not in out or out[k] is None})
            out["backend"] = spec.id
            problems = []
            break
    loaded = [e for e in services.inspect() if _below(e.get("source", ""), path)]
    out["loaded_bytes"] = sum(int(e.get("bytes", 0)) for e in loaded)
    out["placements"] = sorted({str(e.get("placement")) for e in loaded})
    out["problem"] = problems[0] if problems else None
    out["line"] = summary_line(out)
    return out


def _below(source: str, path: Path) -> bool:
    try:
        return bool(source) and Path(source).resolve().is_relative_to(path)
    except (OSError, ValueError):
        return False


def size_text(n: int) -> str:
    return f"{n / BYTES_PER_GB:.2f} GB" if n >= BYTES_PER_GB else f"{n / BYTES_PER_MB:.1f} MB"


def count_text(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def summary_line(s: dict) -> str:
    """One line for the node: 'qwen-image-edit · 1.23 GB on disk · loaded 1.10 GB (cpu)'."""
    parts = [str(s.get("variant") or s.get("backend") or s["folder"])]
    if s.get("params"):
        parts.append(f"{count_text(s['params'])} params")
    parts.append(f"{size_text(s['disk_bytes'])} on disk")
    if s.get("loaded_bytes"):
        parts.append(f"loaded {size_text(s['loaded_bytes'])} ({', '.join(s['placements'])})")
    else:
        parts.append("not loaded")
    if s.get("peak_vram_bytes"):
        parts.append(f"peak VRAM ~{size_text(s['peak_vram_bytes'])} ({s.get('estimate_for', 'default options')})")
    if s.get("problem"):
        parts.append("not usable: " + s["problem"])
    return " · ".join(parts)


def backends_payload(services: Services) -> list[dict]:
    return [{"id": b.id, "display_name": b.display_name, "folder_keys": list(b.folder_keys),
             "loader_node": b.loader_node, "tasks": list(b.tasks), "max_references": b.max_references}
            for b in services.backends()]


# ----------------------------------------------------------------------------- installation
def handlers(services: Services, generate: Handler | None = None) -> list[tuple[str, str, Handler]]:
    """(method, path, handler) of every route; ``generate`` is routes_generate's handler when wanted."""

    async def get_models(_request: web.Request) -> web.Response:
        return web.json_response(models_payload(services))

    async def post_unload(request: web.Request) -> web.Response:
        body = await read_json_object(request, UNLOAD_BODY_LIMIT, "unload",
                                      '{"id": "<id>"} or {"all": true}')
        return web.json_response(do_unload(services, unload_target(body)))

    async def get_summary(request: web.Request) -> web.Response:
        key, name = request.query.get("folder", ""), request.query.get("name", "")
        return web.json_response(summary(services, key, name))

    async def get_backends(_request: web.Request) -> web.Response:
        return web.json_response(backends_payload(services))

    async def get_openapi(_request: web.Request) -> web.Response:
        from .routes_openapi import openapi  # noqa: PLC0415 - only built when asked for

        return web.json_response(openapi())

    table = [("GET", f"{PREFIX}/models", get_models), ("POST", f"{PREFIX}/unload", post_unload),
             ("GET", f"{PREFIX}/summary", get_summary), ("GET", f"{PREFIX}/backends", get_backends),
             ("GET", f"{PREFIX}/openapi.json", get_openapi)]
    if generate is not None:
        table.append(("POST", f"{PREFIX}/generate", generate))
    return [(m, p, json_errors(h)) for m, p, h in table]


def install(routes: web.RouteTableDef | web.Application, services: Services, generate: bool = True) -> None:
    """Add every Gentor route to a RouteTableDef (ComfyUI's ``PromptServer.instance.routes``) or an app."""
    gen = None
    if generate:
        from .routes_generate import GenerateRoute  # noqa: PLC0415

        gen = GenerateRoute(services).handle
    for method, path, handler in handlers(services, gen):
        if isinstance(routes, web.Application):
            routes.router.add_route(method, path, handler)
        else:
            routes.route(method, path)(handler)
