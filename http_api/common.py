"""What every Gentor route shares: the error a route raises (JSON answer with the request input it is
about), the services the handlers get from the running process, and the JSON request body reader.

Plain aiohttp and the pack's own modules, no ComfyUI import: everything ComfyUI-specific (is a prompt
running?) comes in through ``Services``, so the handlers are tested with aiohttp's test client.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

from .. import glue, registry
from ..errors import GentorError

log = logging.getLogger(__name__)

PREFIX = "/gentor"
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
    # variant detection and estimates: (backend, path, memory options) -> what the summary shows
    describe: Callable[[registry.BackendSpec, Path, Any], dict | None] | None = None


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
