"""UI-format workflow -> API format, using the server's /object_info for widget order.

Follows what the ComfyUI frontend's ``graphToPrompt`` does: widget values in input order (skipping the
``control_after_generate`` and upload-button values the editor stores), links followed through Reroutes
and bypassed nodes, muted nodes and Notes dropped, PrimitiveNode values taken from the target widget.
Anything it cannot reproduce faithfully (subgraphs, group nodes, nodes the server lacks, widget lists
that do not match the node definition) is refused with a message saying what to do instead.
"""
from __future__ import annotations

from typing import Any

from .errors import ConversionError
from .workflow import SEED_INPUTS, Workflow

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize", "increment-wrap")
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")
VIRTUAL = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")
MODE_NEVER, MODE_BYPASS = 2, 4
EXPORT_HINT = ("Open the workflow in the ComfyUI editor and save it with File > Export (API), "
               "then pass that file.")


def _links(ui: dict[str, Any]) -> dict[int, tuple[str, int, str, int, Any]]:
    """link id -> (origin id, origin slot, target id, target slot, type); both schema 0.4 and 1.0."""
    table = {}
    for link in ui.get("links") or []:
        try:
            if isinstance(link, dict):
                lid, o, os_, t, ts, ty = (link[k] for k in
                                          ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type"))
            else:
                lid, o, os_, t, ts, ty = link[:6]
            table[int(lid)] = (str(o), int(os_), str(t), int(ts), ty)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConversionError(f"link {link!r} of the UI workflow is malformed ({exc}); expected "
                                  f"[id, origin_id, origin_slot, target_id, target_slot, type]. {EXPORT_HINT}") from exc
    return table


def widget_layout(info: dict[str, Any]) -> list[tuple[str, bool, bool]]:
    """Widgets of a node definition in editor order: (name, may store a control value, has upload value)."""
    inputs = info.get("input") or {}
    order = info.get("input_order") or {}
    layout = []
    for section in ("required", "optional"):
        defs = inputs.get(section) or {}
        for name in order.get(section) or list(defs):
            spec = defs.get(name)
            if not spec:
                continue
            kind = spec[0]
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            is_widget = isinstance(kind, list) or kind in WIDGET_TYPES
            if not is_widget or opts.get("forceInput"):
                continue
            control = bool(opts.get("control_after_generate")) or (kind == "INT" and name in SEED_INPUTS)
            upload = any(opts.get(flag) for flag in UPLOAD_FLAGS)
            layout.append((name, control, upload))
    return layout


def _widget_values(node: dict[str, Any], info: dict[str, Any], label: str) -> dict[str, Any]:
    values = node.get("widgets_values")
    layout = widget_layout(info)
    if values is None:
        values = []
    if isinstance(values, dict):
        return {name: values[name] for name, _, _ in layout if name in values}
    out: dict[str, Any] = {}
    pos = 0
    for name, control, upload in layout:
        if pos >= len(values):
            break
        out[name] = values[pos]
        pos += 1
        if control and pos < len(values) and values[pos] in CONTROL_VALUES:
            pos += 1
        if upload and pos < len(values) and values[pos] in ("image", "video", "audio", None, ""):
            pos += 1
    # A workflow saved before a node gained optional widgets (appended at the end) stores fewer values: the
    # editor fills those widgets with their defaults, and the server does the same for a missing optional input.
    missing = [name for name, _, _ in layout if name not in out]
    optional = set((info.get("input") or {}).get("optional") or {})
    appended = pos == len(values) and all(name in optional for name in missing)
    if (len(out) != len(layout) and not appended) or pos != len(values):
        names = ", ".join(n for n, _, _ in layout) or "(none)"
        raise ConversionError(
            f"node {label}: the workflow stores {len(values)} widget values {values!r}, but the server's "
            f"definition has the widgets {names}; the node changed since the workflow was saved, so "
            f"its values cannot be matched faithfully. {EXPORT_HINT}")
    return out


def ui_to_api(ui: dict[str, Any], object_info: dict[str, Any], server: str = "the server") -> Workflow:
    """Convert a UI workflow to an API prompt, or raise ConversionError naming what blocks it."""
    subgraphs = {str(s.get("id")) for s in (ui.get("definitions") or {}).get("subgraphs") or []}
    nodes = {str(n["id"]): n for n in ui.get("nodes") or []}
    links = _links(ui)
    problems = []
    for node_id, node in nodes.items():
        kind = str(node.get("type", ""))
        if kind in subgraphs:
            problems.append(f"node {node_id} is a subgraph ({node.get('title') or kind}); "
                            f"subgraphs are not flattened by this client")
        elif kind.startswith(("workflow>", "workflow/")):
            problems.append(f"node {node_id} is a group node ({kind}); group nodes are not expanded")
        elif kind not in object_info and kind not in VIRTUAL:
            problems.append(f"node {node_id} has type {kind!r}, which {server} does not know "
                            f"(a custom node pack missing there, or a frontend-only node)")
    if problems:
        raise ConversionError("cannot convert the UI workflow to the API format:\n  - "
                              + "\n  - ".join(problems) + f"\n{EXPORT_HINT}")

    def input_link(node: dict[str, Any], slot: int) -> tuple[str, int, str, int, Any] | None:
        ins = node.get("inputs") or []
        if slot >= len(ins) or ins[slot].get("link") is None:
            return None
        return links.get(int(ins[slot]["link"]))

    prompt: Workflow = {}
    for node_id, node in nodes.items():
        kind = node["type"]
        mode = node.get("mode", 0)
        if kind in VIRTUAL or mode in (MODE_NEVER, MODE_BYPASS):
            continue
        info = object_info[kind]
        label = f"{node_id} ({kind})"
        inputs: dict[str, Any] = _widget_values(node, info, label)
        for slot, socket in enumerate(node.get("inputs") or []):
            link = input_link(node, slot)
            if link is None:
                continue
            parent = nodes.get(link[0])
            while parent is not None and (parent["type"] in VIRTUAL or parent.get("mode") == MODE_BYPASS):
                if parent["type"] in VIRTUAL:
                    link = input_link(parent, link[1]) if parent["type"] == "Reroute" else None
                else:
                    candidates = [link[1]] + list(range(len(parent.get("inputs") or [])))
                    match = next((c for c in candidates if c < len(parent.get("inputs") or [])
                                  and parent["inputs"][c].get("type") == socket.get("type")), None)
                    if match is None:
                        break
                    link = input_link(parent, match)
                if link is None:
                    break
                parent = nodes.get(link[0])
            if link is not None:
                inputs[socket["name"]] = [link[0], link[1]]
        title = node.get("title") or info.get("display_name") or kind
        prompt[node_id] = {"inputs": inputs, "class_type": kind, "_meta": {"title": title}}
    for node in prompt.values():  # inputs fed by muted/bypassed/removed nodes disappear, as in the editor
        for name, value in list(node["inputs"].items()):
            if (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
                    and value[0] in nodes and value[0] not in prompt):
                del node["inputs"][name]
    if not prompt:
        raise ConversionError(f"the UI workflow has no runnable nodes. {EXPORT_HINT}")
    return prompt
