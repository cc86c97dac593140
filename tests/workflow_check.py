"""Checks for the example workflows (workflows/*.json UI format, workflows/api/*.json API format).

Node schemas come from one of two places, both giving the same ``NodeSpec`` shape:

- ``workflow_static.static_specs()``: the pack's node files parsed with ``ast`` (no ComfyUI import);
- ``workflow_specs.specs_from_object_info()``: a live ComfyUI's ``GET /object_info``.

This module checks a workflow against them: an API prompt (``check_api``), a UI file (``check_ui``) and
that the two agree (``compare_pair``, through the pack's one converter). Reading the files is
tests/workflow_files.py.

Core nodes the examples may use form an explicit allow-list (``CORE_SPECS``); UI-only nodes (notes) are
skipped when a UI workflow is converted, as the frontend does.

Command line (from the pack root): ``python -m tests.workflow_check`` checks every pair;
``python -m tests.workflow_check --write-api`` rewrites workflows/api/ from the UI files (after editing an
example in ComfyUI and saving it).
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

from tests.workflow_files import API_DIR, WORKFLOWS_DIR, dump_json, is_link, load_json, workflow_names
from tests.workflow_specs import CORE_SPECS, InputSpec, NodeSpec, allowed_specs, object_info_from_specs
from tests.workflow_static import static_specs

SEED_CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
UI_ONLY_TYPES = frozenset({"Note", "MarkdownNote"})  # frontend-only: never in an API prompt
UI_SCHEMA_VERSION = 0.4
UI_TOP_KEYS = ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version")
UI_NODE_KEYS = ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                "widgets_values")
OPTIONAL_SHAPE = 7  # LiteGraph slot shape the frontend saves for optional inputs


# ============================================================================ value checks
def check_widget_value(spec: InputSpec, value: Any) -> str | None:
    """Why ``value`` is not acceptable for the widget ``spec`` (None when it is)."""
    t = spec.type
    if t == "INT" and (not isinstance(value, int) or isinstance(value, bool)):
        return f"expected an int, got {value!r}"
    if t == "FLOAT" and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        return f"expected a number, got {value!r}"
    if t in ("STRING", "COMBO") and not isinstance(value, str):
        return f"expected a string, got {value!r}"
    if t == "BOOLEAN" and not isinstance(value, bool):
        return f"expected a bool, got {value!r}"
    if t == "COMBO" and isinstance(spec.options, tuple) and spec.options and value not in spec.options:
        return f"{value!r} is not one of {list(spec.options)}"
    if t in ("INT", "FLOAT"):
        if isinstance(spec.min, (int, float)) and value < spec.min:
            return f"{value!r} is below the minimum {spec.min}"
        if isinstance(spec.max, (int, float)) and value > spec.max:
            return f"{value!r} is above the maximum {spec.max}"
    return None



# ============================================================================ API format
def check_api(api: dict, specs: dict[str, NodeSpec]) -> list[str]:
    """Problems in an API-format prompt (empty list = fine)."""
    errs: list[str] = []
    if not isinstance(api, dict) or not api:
        return ["API workflow: expected a non-empty object {node id: node}"]
    for nid, node in api.items():
        where = f"API node {nid}"
        if not (isinstance(nid, str) and nid.isdigit()):
            errs.append(f"{where}: node ids must be digit strings")
        if not isinstance(node, dict) or set(node) - {"class_type", "inputs", "_meta"}:
            errs.append(f"{where}: expected keys class_type, inputs, _meta")
            continue
        ctype = node.get("class_type")
        spec = specs.get(ctype)
        if spec is None:
            errs.append(f"{where}: class_type {ctype!r} is neither a Gentor node nor an allowed core node "
                        f"({', '.join(sorted(CORE_SPECS))})")
            continue
        where = f"API node {nid} ({ctype})"
        if not isinstance(node.get("_meta", {}).get("title"), str):
            errs.append(f"{where}: _meta.title missing")
        inputs = node.get("inputs")
        if not isinstance(inputs, dict):
            errs.append(f"{where}: inputs must be an object")
            continue
        for name, value in inputs.items():
            ispec = spec.input(name)
            if ispec is None:
                errs.append(f"{where}: input {name!r} does not exist (inputs: {[i.name for i in spec.inputs]})")
                continue
            if is_link(value):
                src = api.get(value[0])
                src_spec = specs.get(src.get("class_type")) if isinstance(src, dict) else None
                if src is None:
                    errs.append(f"{where}: input {name!r} links to missing node {value[0]}")
                elif src_spec is not None:
                    if not 0 <= value[1] < len(src_spec.outputs):
                        errs.append(f"{where}: input {name!r} links to output {value[1]} of {value[0]}, which has "
                                    f"{len(src_spec.outputs)} outputs")
                    elif src_spec.outputs[value[1]][1] != ispec.type and ispec.type != "*":
                        errs.append(f"{where}: input {name!r} ({ispec.type}) linked to a "
                                    f"{src_spec.outputs[value[1]][1]} output")
            elif not ispec.is_widget:
                errs.append(f"{where}: socket input {name!r} must be a link [node id, slot], got {value!r}")
            else:
                why = check_widget_value(ispec, value)
                if why:
                    errs.append(f"{where}: input {name!r}: {why}")
        for ispec in spec.inputs:
            if not ispec.optional and ispec.name not in inputs:
                errs.append(f"{where}: required input {ispec.name!r} missing")
    if not any(specs.get(n.get("class_type")) and specs[n["class_type"]].output_node
               for n in api.values() if isinstance(n, dict)):
        errs.append("API workflow: no output node (e.g. SaveImage): ComfyUI would run nothing")
    return errs


# ============================================================================ UI format
def _ui_links(ui: dict) -> dict[int, list]:
    return {link[0]: link for link in ui.get("links", []) if isinstance(link, list) and len(link) == 6}


def _in_order(items: list, reference: list) -> bool:
    """``items`` appear in ``reference`` in the same relative order (a subsequence)."""
    it = iter(reference)
    return all(any(item == ref for ref in it) for item in items)


def check_ui(ui: dict, specs: dict[str, NodeSpec]) -> list[str]:
    """Problems in a UI (save) format workflow, schema 0.4."""
    errs: list[str] = []
    missing = [k for k in UI_TOP_KEYS if k not in ui]
    if missing:
        return [f"UI workflow: keys missing: {missing}"]
    if ui["version"] != UI_SCHEMA_VERSION:
        errs.append(f"UI workflow: version {ui['version']!r}, expected {UI_SCHEMA_VERSION}")
    nodes = {n.get("id"): n for n in ui["nodes"]}
    if len(nodes) != len(ui["nodes"]):
        errs.append("UI workflow: duplicate node ids")
    links = _ui_links(ui)
    if len(links) != len(ui["links"]):
        errs.append("UI workflow: every link must be [id, src node, src slot, dst node, dst slot, type], ids unique")
    if nodes and ui["last_node_id"] < max(nodes):
        errs.append(f"UI workflow: last_node_id {ui['last_node_id']} < largest node id {max(nodes)}")
    if links and ui["last_link_id"] < max(links):
        errs.append(f"UI workflow: last_link_id {ui['last_link_id']} < largest link id {max(links)}")
    orders = [n.get("order") for n in ui["nodes"]]
    if sorted(orders) != list(range(len(orders))):
        errs.append(f"UI workflow: node 'order' values must be 0..{len(orders) - 1}, got {orders}")
    for node in ui["nodes"]:
        nid, ntype = node.get("id"), node.get("type")
        where = f"UI node {nid} ({ntype})"
        lacking = [k for k in UI_NODE_KEYS if k not in node]
        if lacking:
            errs.append(f"{where}: keys missing: {lacking}")
            continue
        if not isinstance(nid, int):
            errs.append(f"{where}: id must be an int")
        if ntype in UI_ONLY_TYPES:
            if node["inputs"] or node["outputs"]:
                errs.append(f"{where}: a note has no sockets")
            continue
        spec = specs.get(ntype)
        if spec is None:
            errs.append(f"{where}: type is neither a Gentor node nor an allowed core node")
            continue
        # sockets, in the order the frontend creates them
        want = [(s.name, s.type, s.optional) for s in spec.sockets()]
        got_inputs = [i for i in node["inputs"] if "widget" not in i]
        got = [(i.get("name"), i.get("type"), i.get("shape") == OPTIONAL_SHAPE) for i in got_inputs]
        # A node saved before optional sockets were added keeps its old socket list (the frontend only adds
        # them on "Fix node (recreate)"): the saved sockets must be the schema's, in its order, with every
        # required one present; a renamed, retyped, reordered or missing required socket is drift.
        required = [w for w in want if not w[2]]
        if not _in_order(got, want) or not set(required) <= set(got):
            errs.append(f"{where}: input sockets {got} != schema {want} (name, type, optional)")
        for slot, inp in enumerate(node["inputs"]):
            lid = inp.get("link")
            if lid is None:
                continue
            link = links.get(lid)
            if link is None:
                errs.append(f"{where}: input {inp.get('name')!r} names missing link {lid}")
            elif link[3] != nid or link[4] != slot:
                errs.append(f"{where}: link {lid} ends at node {link[3]} slot {link[4]}, not here (slot {slot})")
        want_out = [t for _, t in spec.outputs]
        got_out = [o.get("type") for o in node["outputs"]]
        # A workflow saved before an output was appended lists fewer outputs; the frontend adds the new slot
        # when it loads it, so a prefix of the schema's outputs is fine (appending keeps old files valid).
        if got_out != want_out[:len(got_out)]:
            errs.append(f"{where}: output types {got_out} != schema {want_out} (or a prefix of it)")
        else:
            for slot, out in enumerate(node["outputs"]):
                if out.get("name") not in spec.output_names(slot):
                    errs.append(f"{where}: output {slot} named {out.get('name')!r}, expected one of "
                                f"{sorted(spec.output_names(slot))}")
        for slot, out in enumerate(node["outputs"]):
            for lid in out.get("links") or []:
                link = links.get(lid)
                if link is None or link[1] != nid or link[2] != slot:
                    errs.append(f"{where}: output {slot} lists link {lid}, which does not start here")
        slots = spec.widget_slots()
        values = node["widgets_values"]
        if not isinstance(values, list) or len(values) != len(slots):
            errs.append(f"{where}: widgets_values has {len(values) if isinstance(values, list) else '?'} entries, "
                        f"schema widgets are {slots}")
            continue
        for (name, kind), value in zip(slots, values):
            if kind == "control" and value not in SEED_CONTROL_VALUES:
                errs.append(f"{where}: {name} control_after_generate value {value!r} not in {SEED_CONTROL_VALUES}")
            elif kind == "upload" and value != "image":
                errs.append(f"{where}: {name} upload widget value {value!r}, expected 'image'")
            elif kind == "value":
                why = check_widget_value(spec.input(name), value)
                if why:
                    errs.append(f"{where}: widget {name!r}: {why}")
    for lid, (_, src, sslot, dst, dslot, ltype) in links.items():
        s, d = nodes.get(src), nodes.get(dst)
        if s is None or d is None:
            errs.append(f"UI link {lid}: node {src if s is None else dst} does not exist")
            continue
        if not (0 <= sslot < len(s["outputs"])) or lid not in (s["outputs"][sslot].get("links") or []):
            errs.append(f"UI link {lid}: not listed by output {sslot} of node {src}")
        elif s["outputs"][sslot].get("type") != ltype:
            errs.append(f"UI link {lid}: type {ltype} != source output type {s['outputs'][sslot].get('type')}")
        if not (0 <= dslot < len(d["inputs"])) or d["inputs"][dslot].get("link") != lid:
            errs.append(f"UI link {lid}: not the link of input {dslot} of node {dst}")
        elif d["inputs"][dslot].get("type") != ltype:
            errs.append(f"UI link {lid}: type {ltype} != target input type {d['inputs'][dslot].get('type')}")
        if s.get("order", 0) >= d.get("order", 0):
            errs.append(f"UI link {lid}: source node {src} is not ordered before target node {dst}")
    return errs


def ui_to_api(ui: dict, specs: dict[str, NodeSpec]) -> dict:
    """The pack's one UI -> API converter (gentor_headless.convert, which follows the frontend's
    graphToPrompt), fed with the node schemas ``specs`` instead of a live server's /object_info."""
    from gentor_headless.convert import ui_to_api as convert  # noqa: PLC0415

    return convert(ui, object_info_from_specs(specs), server="the pack's node files")


def compare_pair(ui: dict, api: dict, specs: dict[str, NodeSpec]) -> list[str]:
    """Differences between a UI workflow and its API copy (empty list = they agree)."""
    from gentor_headless.errors import ConversionError  # noqa: PLC0415

    try:
        want = ui_to_api(ui, specs)
    except (ConversionError, KeyError, IndexError, TypeError) as exc:
        return [f"UI workflow cannot be converted: {exc!r}"]
    errs = []
    if set(want) != set(api):
        errs.append(f"node ids differ: UI {sorted(want, key=int)} vs API {sorted(api, key=int)}")
    for nid in sorted(set(want) & set(api), key=int):
        w, a = want[nid], api[nid]
        if w["class_type"] != a.get("class_type"):
            errs.append(f"node {nid}: class_type {w['class_type']} (UI) vs {a.get('class_type')} (API)")
            continue
        if w["_meta"] != a.get("_meta"):
            errs.append(f"node {nid}: _meta {w['_meta']} (UI) vs {a.get('_meta')} (API)")
        ai = a.get("inputs", {})
        for name in sorted(set(w["inputs"]) | set(ai)):
            if name not in ai:
                errs.append(f"node {nid} ({w['class_type']}): input {name!r} only in UI ({w['inputs'][name]!r})")
            elif name not in w["inputs"]:
                errs.append(f"node {nid} ({w['class_type']}): input {name!r} only in API ({ai[name]!r})")
            elif w["inputs"][name] != ai[name] or type(w["inputs"][name]) is not type(ai[name]):
                errs.append(f"node {nid} ({w['class_type']}): input {name!r} UI {w['inputs'][name]!r} "
                            f"vs API {ai[name]!r}")
    return errs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.workflow_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--write-api", action="store_true", help="rewrite workflows/api/*.json from the UI files")
    args = ap.parse_args(argv)
    specs = allowed_specs(static_specs())
    bad = 0
    for name in workflow_names():
        ui = load_json(WORKFLOWS_DIR / f"{name}.json")
        errs = check_ui(ui, specs)
        if args.write_api and not errs:
            API_DIR.mkdir(exist_ok=True)
            (API_DIR / f"{name}.json").write_text(dump_json(ui_to_api(ui, specs)), encoding="utf-8")
        api_path = API_DIR / f"{name}.json"
        if api_path.is_file():
            api = load_json(api_path)
            errs += check_api(api, specs) + compare_pair(ui, api, specs)
        else:
            errs.append(f"{api_path} missing (run with --write-api)")
        for e in errs:
            print(f"{name}: {e}")
        bad += bool(errs)
        if not errs:
            print(f"{name}: ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
