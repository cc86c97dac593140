"""Gentor's routes on ComfyUI's own server, all under ``/gentor/``: the route table and the small
handlers.

    GET  /gentor/models         what the shared model cache holds (one object per component)
    POST /gentor/unload         {"id": "<entry id>"} or {"all": true}
    GET  /gentor/summary        ?folder=<model folder key>&name=<name in that folder>: a loader summary
                                (summary.py)
    GET  /gentor/backends       the registered backends (the web extension maps loader nodes with it)
    POST /gentor/generate       one call -> images (generate.py)
    GET  /gentor/openapi.json   the OpenAPI description of all of the above (openapi.py)
"""
from __future__ import annotations

from aiohttp import hdrs, web

from .common import PREFIX, Handler, RouteError, Services, json_errors, read_json_object, shown
from .generate import GenerateRoute
from .summary import memory_options, summary

UNLOAD_BODY_LIMIT = 64 * 1024  # an unload request is a tiny JSON object


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


def backends_payload(services: Services) -> list[dict]:
    return [{"id": b.id, "display_name": b.display_name, "folder_keys": list(b.folder_keys),
             "loader_node": b.loader_node, "tasks": list(b.tasks), "max_references": b.max_references}
            for b in services.backends()]


# ----------------------------------------------------------------------------- installation
def handlers(services: Services, generate: GenerateRoute | None = None) -> list[tuple[str, str, Handler]]:
    """(method, path, handler) of every route; ``generate`` is the /gentor/generate route when wanted."""

    async def get_models(_request: web.Request) -> web.Response:
        return web.json_response(models_payload(services))

    async def post_unload(request: web.Request) -> web.Response:
        body = await read_json_object(request, UNLOAD_BODY_LIMIT, "unload",
                                      '{"id": "<id>"} or {"all": true}')
        return web.json_response(do_unload(services, unload_target(body)))

    async def get_summary(request: web.Request) -> web.Response:
        key, name = request.query.get("folder", ""), request.query.get("name", "")
        return web.json_response(summary(services, key, name, memory_options(request.query)))

    async def get_backends(_request: web.Request) -> web.Response:
        return web.json_response(backends_payload(services))

    async def get_openapi(request: web.Request) -> web.Response:
        from .openapi import openapi  # noqa: PLC0415 - only built when asked for

        return web.json_response(openapi(await generate.settings_schemas(request) if generate else None))

    table = [("GET", f"{PREFIX}/models", get_models), ("POST", f"{PREFIX}/unload", post_unload),
             ("GET", f"{PREFIX}/summary", get_summary), ("GET", f"{PREFIX}/backends", get_backends),
             ("GET", f"{PREFIX}/openapi.json", get_openapi)]
    if generate is not None:
        table.append(("POST", f"{PREFIX}/generate", generate.handle))
    return [(m, p, json_errors(h)) for m, p, h in table]


def wrong_method(path: str, allowed: list[str]) -> Handler:
    """The answer for any other method on a Gentor path: 405 naming the allowed ones (without it ComfyUI's
    static file route catches a GET on a POST-only path and answers an empty 404)."""

    async def refuse(request: web.Request) -> web.Response:
        return web.json_response(
            {"error": f"Gentor {path}: method not allowed (got {request.method}, expected {' or '.join(allowed)}). "
                      "See /gentor/openapi.json.", "input": "method"},
            status=405, headers={"Allow": ", ".join(allowed)})

    return refuse


def install(routes: web.RouteTableDef | web.Application, services: Services, generate: bool = True) -> None:
    """Add every Gentor route to a RouteTableDef (ComfyUI's ``PromptServer.instance.routes``) or an app,
    each path followed by its wrong-method answer. A GET route answers HEAD too (aiohttp's add_get adds it,
    also when ComfyUI registers a RouteTableDef's GET route)."""
    gen = GenerateRoute(services) if generate else None
    by_path: dict[str, list[tuple[str, Handler]]] = {}
    for method, path, handler in handlers(services, gen):
        by_path.setdefault(path, []).append((method, handler))
    for path, methods in by_path.items():
        allowed = [m for m, _ in methods] + (["HEAD"] if any(m == "GET" for m, _ in methods) else [])
        for method, handler in [*methods, (hdrs.METH_ANY, wrong_method(path, allowed))]:
            if not isinstance(routes, web.Application):
                routes.route(method, path)(handler)
            elif method == "GET":
                routes.router.add_get(path, handler)
            else:
                routes.router.add_route(method, path, handler)
