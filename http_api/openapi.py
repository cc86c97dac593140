"""The OpenAPI 3.1 description of Gentor's routes, served at /gentor/openapi.json."""
from __future__ import annotations

from typing import Any

from .. import registry
from .request import FIELDS, Limits
from .summary import MEMORY_PARAMS

VERSION = "1.0.0"
ERROR = {"$ref": "#/components/schemas/Error"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    words = {400: "Malformed request; `input` names the field", 404: "Unknown id, folder or name",
             409: "Refused while a prompt runs, or cancelled", 413: "Body or image too large",
             500: "The run failed; `input` names the field when known", 504: "The run did not finish in time"}
    return {str(c): _json(ERROR, words[c]) for c in codes}


def settings_schema(nodes: dict[str, dict]) -> dict:
    """The ``settings`` field: one backend's settings node inputs (``nodes``: backend id -> the schema of its
    settings node's inputs, read from ComfyUI; backends missing there are only named)."""
    specs = [b for b in registry.available() if b.settings_node]
    named = "; ".join(f"{b.id}: {b.settings_node}" for b in specs)
    schema: dict[str, Any] = {"type": "object",
                              "description": f"{FIELDS['settings'][1]}. The model's backend decides which node: "
                                             f"{named}. Checked by that node, as in a workflow."}
    read = [dict(nodes[b.id], title=f"{b.display_name} ({b.settings_node})") for b in specs if b.id in nodes]
    if read:
        schema["anyOf"] = read
    return schema


def generate_schema(settings_nodes: dict[str, dict] | None = None) -> dict:
    limits = Limits()
    props: dict[str, Any] = {
        "model": {"type": "string", "description": FIELDS["model"][1], "example": "Qwen-Image"},
        "backend": {"type": "string", "description": FIELDS["backend"][1]},
        "prompt": {"type": "string", "description": FIELDS["prompt"][1]},
        "negative": {"type": "string", "default": ""},
        "steps": {"type": "integer", "minimum": 0, "default": 0, "description": FIELDS["steps"][1]},
        "cfg": {"type": "number", "minimum": 0, "default": 0, "description": FIELDS["cfg"][1]},
        "width": {"type": "integer", "minimum": 0, "default": 0, "description": FIELDS["width"][1]},
        "height": {"type": "integer", "minimum": 0, "default": 0, "description": FIELDS["height"][1]},
        "seed": {"type": "integer", "minimum": 0, "description": "Noise seed; random (and returned) when absent."},
        "batch_size": {"type": "integer", "minimum": 1, "default": 1, "description": FIELDS["batch_size"][1]},
        "images": {"type": "array", "items": {"type": "string"},
                   "description": "Reference images for an edit (their presence picks Gentor Edit Image): base64 "
                                  "(or data: URL) PNG/JPEG/WebP of at most "
                                  f"{limits.image_bytes // (1024 * 1024)} MiB and {limits.image_pixels} pixels "
                                  "each, or names returned by ComfyUI's /upload/image."},
        "memory": {"type": "object", "description": FIELDS["memory"][1],
                   "properties": {"weight_dtype": {"type": "string"}, "compute_dtype": {"type": "string"},
                                  "offload": {"type": "string", "enum": ["none", "model", "block"]},
                                  "vram_budget_gb": {"type": "number"}}},
        "loader": {"type": "object", "description": FIELDS["loader"][1]},
        "settings": settings_schema(settings_nodes or {}),
    }
    return {"type": "object", "required": ["model", "prompt"], "additionalProperties": False, "properties": props}


def openapi(settings_nodes: dict[str, dict] | None = None) -> dict:
    """The whole description; ``settings_nodes`` (backend id -> input schema) details /gentor/generate's
    ``settings``."""
    entry = {"type": "object", "properties": {
        "id": {"type": "string"}, "kind": {"type": "string", "description": "Architecture, e.g. qwen2_5_vl"},
        "source": {"type": "string"}, "bytes": {"type": "integer"},
        "bytes_by_device": {"type": "object", "additionalProperties": {"type": "integer"}},
        "placement": {"type": "string"}, "storage_dtype": {"type": ["string", "null"]},
        "compute_dtype": {"type": ["string", "null"]}, "users": {"type": "array", "items": {"type": "string"}},
        "in_use": {"type": "boolean"}, "last_used_s_ago": {"type": "number"}}}
    generated = {"type": "object", "required": ["images", "width", "height", "seed", "steps", "text"], "properties": {
        "images": {"type": "array", "items": {"type": "string", "contentEncoding": "base64",
                                              "contentMediaType": "image/png"}},
        "width": {"type": "integer"}, "height": {"type": "integer"}, "seed": {"type": "integer"},
        "steps": {"type": "integer"}, "text": {"type": "string", "description": "The task node's notes/reasoning."},
        "prompt_id": {"type": "string"}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Gentor", "version": VERSION,
                 "description": "Gentor's routes on ComfyUI's server: the shared model cache, loader summaries and "
                                "one-call generation through ComfyUI's queue."},
        "paths": {
            "/gentor/models": {"get": {"summary": "What the shared model cache holds", "responses": {
                "200": _json({"type": "object", "properties": {
                    "models": {"type": "array", "items": entry}, "count": {"type": "integer"},
                    "total_bytes": {"type": "integer"}, "busy": {"type": "boolean"}}}, "Cache entries")}}},
            "/gentor/unload": {"post": {
                "summary": "Free one cache entry or all of them (refused while a prompt runs)",
                "requestBody": {"required": True, "content": {"application/json": {"schema": {"oneOf": [
                    {"type": "object", "required": ["id"], "properties": {"id": {"type": "string", "minLength": 1}},
                     "additionalProperties": False},
                    {"type": "object", "required": ["all"], "properties": {"all": {"const": True}},
                     "additionalProperties": False}]}}}},
                "responses": {"200": _json({"type": "object", "properties": {
                    "unloaded": {"type": "integer"}, "all": {"type": "boolean"},
                    "ids": {"type": "array", "items": {"type": "string"}}}}, "What was freed"),
                    **_errors(400, 404, 409, 413)}}},
            "/gentor/summary": {"get": {
                "summary": "A loader's one-line summary of a model (variant, size, what is loaded)",
                "parameters": [{"name": "folder", "in": "query", "required": True, "schema": {"type": "string"},
                                "description": "Model folder key, e.g. qwen_image"},
                               {"name": "name", "in": "query", "required": True, "schema": {"type": "string"},
                                "description": "Name as the loader lists it (inside that folder only)"},
                               *({"name": n, "in": "query", "required": False,
                                  "schema": {"type": "number" if n == "vram_budget_gb" else "string"},
                                  "description": f"The wired Gentor Memory Options' {n} (the peak-VRAM estimate "
                                                 "follows it; default: the node's default)"}
                                 for n in MEMORY_PARAMS)],
                "responses": {"200": _json({"type": "object", "properties": {"line": {"type": "string"}}},
                                           "Summary"), **_errors(400, 404)}}},
            "/gentor/backends": {"get": {"summary": "Installed backends and their loader nodes",
                                         "responses": {"200": _json({"type": "array"}, "Backends")}}},
            "/gentor/generate": {"post": {
                "summary": "Generate (or edit) images with one call, through ComfyUI's queue",
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": generate_schema(settings_nodes)}}},
                "responses": {"200": _json(generated, "Images as base64 PNG"),
                              **_errors(400, 409, 413, 500, 504)}}},
            "/gentor/openapi.json": {"get": {"summary": "This description",
                                             "responses": {"200": {"description": "OpenAPI 3.1"}}}},
        },
        "components": {"schemas": {"Error": {"type": "object", "required": ["error"], "properties": {
            "error": {"type": "string", "description": "<What> <input>: <what is wrong> (got X, expected Y). "
                                                       "<What to do>."},
            "input": {"type": ["string", "null"], "description": "The request field it is about"}}}}},
    }
