"""Gentor's HTTP API on ComfyUI's own server, all under ``/gentor/``.

    common.py    what every route shares: RouteError (JSON errors naming the input), Services, body reading
    routes.py    the route table (405 for a wrong method), GET /gentor/models, POST /gentor/unload,
                 GET /gentor/backends
    summary.py   GET /gentor/summary: a loader's one-line summary of a model, from headers only
    generate.py  POST /gentor/generate: one call -> images, through ComfyUI's queue
    request.py   its body: fields, limits, checks, reference images
    graph.py     its graph of Gentor nodes, and ComfyUI's answers mapped back to request fields
    openapi.py   GET /gentor/openapi.json

Installed once from the pack's entry point (``install_on_server``); nothing else in the pack imports
this package. ComfyUI itself is reached only through glue.py (its route table, whether a prompt runs).
"""
from __future__ import annotations

from typing import Any

from .. import glue
from .common import Services
from .routes import install

_installed = False


def install_on_server(cache: Any) -> bool:
    """Add the /gentor/ routes to ComfyUI's server, once; ``cache`` is the shared model cache (its
    ``inspect`` and ``unload``). False outside ComfyUI (no server to add them to)."""
    global _installed
    table = glue.server_routes()
    if table is None:
        return False
    if not _installed:
        install(table, Services(inspect=cache.inspect, unload=cache.unload, busy=glue.prompt_running))
        _installed = True
    return True
