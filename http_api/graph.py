"""The graph /gentor/generate queues, built from ComfyUI's own node definitions (/object_info), and the way
back: ComfyUI's refusals and run errors as JSON errors naming the request field they came from."""
from __future__ import annotations

import re
from typing import Any

from .common import RouteError, shown
from .request import FIELDS, Job

LOADER, MEMORY, TASK, OUTPUT, TEXT = "gentor_loader", "gentor_memory", "gentor_task", "gentor_output", "gentor_text"
SETTINGS = "gentor_settings"
# Core's text preview (0.3.64 and later): an output node, so the task's text comes back from /history even when
# ComfyUI answers the task from its cache (0.8.0 records no UI of cached intermediate nodes).
TEXT_NODE = "PreviewAny"
IMAGE_NODE = "gentor_image_{}"
T2I_NODE, EDIT_NODE, MEMORY_NODE = "GentorTextToImage", "GentorEditImage", "GentorMemoryOptions"
NODE_ERROR_STATUS = {"InputError": 400, "ModelFolderError": 400, "MemoryEstimateError": 507,
                     "MissingDependencyError": 501}
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN")  # inputs a request sets as plain values (not sockets)
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
