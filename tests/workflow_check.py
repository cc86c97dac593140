"""Checks for the example workflows (workflows/*.json UI format, workflows/api/*.json API format).

Node schemas come from one of two places, both giving the same ``NodeSpec`` shape:

- ``static_specs()``: the pack's node files parsed with ``ast`` (no ComfyUI, no ``comfy_api`` import):
  ``io.Schema(node_id=..., inputs=...)`` in each ``define_schema``, following helper calls such as
  ``common_inputs()`` / ``settings_input()``, local names and ``for i in range(1, EDIT_IMAGE_INPUTS + 1)``
  comprehensions, with constants resolved across the pack's relative imports;
- ``specs_from_object_info()``: a live ComfyUI's ``GET /object_info``.

Core nodes the examples may use form an explicit allow-list (``CORE_SPECS``); UI-only nodes (notes) are
skipped when a UI workflow is converted, as the frontend does.

Command line (from the pack root): ``python -m tests.workflow_check`` checks every pair;
``python -m tests.workflow_check --write-api`` rewrites workflows/api/ from the UI files (after editing an
example in ComfyUI and saving it).
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PACK_ROOT = Path(__file__).resolve().parents[1]
NODES_DIR = PACK_ROOT / "nodes"
WORKFLOWS_DIR = PACK_ROOT / "workflows"
API_DIR = WORKFLOWS_DIR / "api"
INPUTS_DIR = WORKFLOWS_DIR / "inputs"

WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
UI_ONLY_TYPES = frozenset({"Note", "MarkdownNote"})  # frontend-only: never in an API prompt
UI_SCHEMA_VERSION = 0.4
UI_TOP_KEYS = ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version")
UI_NODE_KEYS = ("id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                "widgets_values")
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
OPTIONAL_SHAPE = 7  # LiteGraph slot shape the frontend saves for optional inputs


class Unknown:
    """A value the static parser cannot know (e.g. a dropdown filled at run time)."""

    def __repr__(self) -> str:
        return "<unknown>"


UNKNOWN = Unknown()


@dataclass(frozen=True)
class InputSpec:
    name: str
    type: str
    optional: bool = False
    control_after_generate: bool = False
    image_upload: bool = False
    force_input: bool = False
    options: Any = None  # tuple of allowed COMBO values, UNKNOWN, or None (not a combo)
    min: Any = None
    max: Any = None

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES and not self.force_input


@dataclass
class NodeSpec:
    node_id: str
    display_name: str
    category: str
    inputs: list[InputSpec]
    outputs: list[tuple[str, str]]  # (slot name as ComfyUI 0.3.64's UI shows it: display name or type, type)
    output_node: bool = False
    source: str = ""
    output_ids: list[str] = field(default_factory=list)  # the V3 output ids (ComfyUI 0.8.0 shows these)

    def input(self, name: str) -> InputSpec | None:
        return next((i for i in self.inputs if i.name == name), None)

    def sockets(self) -> list[InputSpec]:
        """Inputs the UI shows as sockets, in the order the frontend lists them."""
        return [i for i in self.inputs if not i.is_widget]

    def widget_slots(self) -> list[tuple[str, str]]:
        """(input name, kind) per ``widgets_values`` entry; kind: value | control | upload."""
        slots = []
        for i in self.inputs:
            if not i.is_widget:
                continue
            slots.append((i.name, "value"))
            if i.control_after_generate:
                slots.append((i.name, "control"))
            if i.image_upload:
                slots.append((i.name, "upload"))
        return slots

    def signature(self) -> dict:
        """What must agree between the static parse and a live server."""
        return {"node_id": self.node_id, "display_name": self.display_name, "category": self.category,
                "inputs": [(i.name, i.type, i.optional) for i in self.inputs],
                # Output TYPES: the names differ between ComfyUI versions (0.3.64 shows the type, 0.8.0 the id).
                "widgets": self.widget_slots(), "outputs": [t for _, t in self.outputs],
                "output_node": self.output_node}

    def output_names(self, slot: int) -> set[str]:
        """Names a saved UI workflow may give output ``slot`` (whichever ComfyUI version saved it)."""
        shown, typ = self.outputs[slot]
        return {shown, typ} | ({self.output_ids[slot]} if slot < len(self.output_ids) else set())


# The only core nodes the examples may use (explicit allow-list; schemas as ComfyUI 0.3.64 reports them).
CORE_SPECS: dict[str, NodeSpec] = {
    "LoadImage": NodeSpec("LoadImage", "Load Image", "image",
                          [InputSpec("image", "COMBO", image_upload=True, options=UNKNOWN)],
                          [("IMAGE", "IMAGE"), ("MASK", "MASK")], source="core"),
    "SaveImage": NodeSpec("SaveImage", "Save Image", "image",
                          [InputSpec("images", "IMAGE"), InputSpec("filename_prefix", "STRING")], [],
                          output_node=True, source="core"),
    "PreviewImage": NodeSpec("PreviewImage", "Preview Image", "image", [InputSpec("images", "IMAGE")], [],
                             output_node=True, source="core"),
}


# ============================================================================ static parse of nodes/*.py
class _Module:
    def __init__(self, path: Path, parser: "_StaticParser") -> None:
        self.path = path
        self.parser = parser
        self.tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        self.consts: dict[str, ast.expr] = {}
        self.funcs: dict[str, ast.FunctionDef] = {}
        self.classes: dict[str, ast.ClassDef] = {}
        self.imports: dict[str, tuple[Path, str | None]] = {}  # alias -> (module file, name or None=module)
        for node in self.tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                self.consts[node.targets[0].id] = node.value
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                self.consts[node.target.id] = node.value
            elif isinstance(node, ast.FunctionDef):
                self.funcs[node.name] = node
            elif isinstance(node, ast.ClassDef):
                self.classes[node.name] = node
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                base = path.parent
                for _ in range(node.level - 1):
                    base = base.parent
                pkg = base.joinpath(*node.module.split(".")) if node.module else base
                for alias in node.names:
                    sub = pkg / f"{alias.name}.py"
                    if sub.is_file():  # `from ..samplers import qwen_image as sampler`
                        self.imports[alias.asname or alias.name] = (sub, None)
                    else:
                        target = pkg.with_suffix(".py") if pkg.with_suffix(".py").is_file() else pkg / "__init__.py"
                        self.imports[alias.asname or alias.name] = (target, alias.name)


class _StaticParser:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: dict[Path, _Module] = {}

    def module(self, path: Path) -> _Module:
        path = path.resolve()
        if path not in self.modules:
            self.modules[path] = _Module(path, self)
        return self.modules[path]

    # ------------------------------------------------------------------ values
    def value(self, expr: ast.expr, mod: _Module, local: dict[str, Any]) -> Any:
        if isinstance(expr, ast.Constant):
            return expr.value
        if isinstance(expr, ast.JoinedStr):
            parts = []
            for v in expr.values:
                got = self.value(v.value, mod, local) if isinstance(v, ast.FormattedValue) else v.value
                if isinstance(got, Unknown):
                    return UNKNOWN
                parts.append(str(got))
            return "".join(parts)
        if isinstance(expr, (ast.Tuple, ast.List)):
            items = [self.value(e, mod, local) for e in expr.elts]
            return UNKNOWN if any(isinstance(i, Unknown) for i in items) else tuple(items)
        if isinstance(expr, ast.Name):
            return self.name(expr.id, mod, local)
        if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name):
            imp = mod.imports.get(expr.value.id)
            if imp and imp[1] is None:
                return self.name(expr.attr, self.module(imp[0]), {})
            return UNKNOWN
        if isinstance(expr, ast.UnaryOp) and isinstance(expr.op, ast.USub):
            v = self.value(expr.operand, mod, local)
            return UNKNOWN if isinstance(v, Unknown) else -v
        if isinstance(expr, ast.BinOp):
            a, b = self.value(expr.left, mod, local), self.value(expr.right, mod, local)
            if isinstance(a, Unknown) or isinstance(b, Unknown):
                return UNKNOWN
            ops = {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y, ast.Mult: lambda x, y: x * y,
                   ast.FloorDiv: lambda x, y: x // y, ast.Div: lambda x, y: x / y}
            return ops[type(expr.op)](a, b) if type(expr.op) in ops else UNKNOWN
        if (isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id in ("list", "tuple")
                and len(expr.args) == 1):
            v = self.value(expr.args[0], mod, local)
            return v if isinstance(v, Unknown) else tuple(v)
        return UNKNOWN

    def name(self, name: str, mod: _Module, local: dict[str, Any]) -> Any:
        if name in local:
            got = local[name]
            return self.value(got, mod, local) if isinstance(got, ast.expr) else got
        if name in mod.consts:
            return self.value(mod.consts[name], mod, {})
        if name in mod.imports:
            path, attr = mod.imports[name]
            return self.name(attr, self.module(path), {}) if attr else UNKNOWN
        return UNKNOWN

    def _resolve_def(self, name: str, mod: _Module, kind: str) -> tuple[Any, _Module] | None:
        table = mod.funcs if kind == "func" else mod.consts
        if name in table:
            return table[name], mod
        if name in mod.imports and mod.imports[name][1]:
            path, attr = mod.imports[name]
            return self._resolve_def(attr, self.module(path), kind)
        return None

    # ------------------------------------------------------------------ io types
    def io_type(self, type_expr: ast.expr, mod: _Module) -> str:
        """``io.Int`` -> INT, ``GentorModel`` (= io.Custom("GENTOR_MODEL")) -> GENTOR_MODEL."""
        if isinstance(type_expr, ast.Attribute):  # io.Int, io.Image, io.Combo ...
            return {"Int": "INT", "Float": "FLOAT", "String": "STRING", "Boolean": "BOOLEAN", "Combo": "COMBO",
                    "Image": "IMAGE", "Mask": "MASK", "Latent": "LATENT"}.get(type_expr.attr, type_expr.attr.upper())
        if isinstance(type_expr, ast.Name):
            found = self._resolve_def(type_expr.id, mod, "const")
            if found:
                call, owner = found
                if (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr == "Custom"
                        and call.args):
                    return str(self.value(call.args[0], owner, {}))
        raise ValueError(f"{mod.path.name}:{type_expr.lineno}: cannot tell the socket type of "
                         f"{ast.unparse(type_expr)}")

    def make_input(self, call: ast.Call, mod: _Module, local: dict[str, Any]) -> InputSpec:
        kw = {k.arg: k.value for k in call.keywords if k.arg}
        id_expr = call.args[0] if call.args else kw.get("id")
        name = self.value(id_expr, mod, local) if id_expr is not None else UNKNOWN
        if not isinstance(name, str):
            raise ValueError(f"{mod.path.name}:{call.lineno}: input id is not a literal: {ast.unparse(call)}")
        typ = self.io_type(call.func.value, mod)

        def flag(key: str) -> bool:
            return key in kw and self.value(kw[key], mod, local) is True

        options = None
        if typ == "COMBO":
            options = self.value(kw["options"], mod, local) if "options" in kw else UNKNOWN
        return InputSpec(name, typ, optional=flag("optional"), control_after_generate=flag("control_after_generate"),
                         image_upload=flag("image_upload"), force_input=flag("force_input"), options=options,
                         min=self.value(kw["min"], mod, local) if "min" in kw else None,
                         max=self.value(kw["max"], mod, local) if "max" in kw else None)

    def make_output(self, call: ast.Call, mod: _Module, local: dict[str, Any]) -> tuple[str, str, str]:
        """(shown name, type, id) of an ``X.Output(id, ...)``."""
        kw = {k.arg: k.value for k in call.keywords if k.arg}
        typ = self.io_type(call.func.value, mod)
        shown = self.value(kw["display_name"], mod, local) if "display_name" in kw else None
        id_expr = call.args[0] if call.args else kw.get("id")
        out_id = self.value(id_expr, mod, local) if id_expr is not None else None
        return (shown if isinstance(shown, str) else typ), typ, (out_id if isinstance(out_id, str) else typ)

    # ------------------------------------------------------------------ input / output lists
    def items(self, expr: ast.expr, mod: _Module, local: dict[str, Any], what: str) -> list:
        """Evaluate an inputs=/outputs= expression to a list of InputSpec / (name, type)."""
        if isinstance(expr, ast.List):
            out = []
            for e in expr.elts:
                out.extend(self.items(e.value if isinstance(e, ast.Starred) else e, mod, local, what))
            return out
        if isinstance(expr, ast.BinOp) and isinstance(expr.op, ast.Add):
            return self.items(expr.left, mod, local, what) + self.items(expr.right, mod, local, what)
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute) and expr.func.attr in ("Input", "Output"):
            if expr.func.attr != what:
                raise ValueError(f"{mod.path.name}:{expr.lineno}: {expr.func.attr} in a list of {what}s")
            return [self.make_input(expr, mod, local) if what == "Input" else self.make_output(expr, mod, local)]
        if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name):
            found = self._resolve_def(expr.func.id, mod, "func")
            if found:
                func, owner = found
                return self.items(self._returned(func), owner, self._locals(func), what)
        if isinstance(expr, ast.Name) and isinstance(local.get(expr.id), ast.expr):
            return self.items(local[expr.id], mod, local, what)
        if isinstance(expr, ast.ListComp) and len(expr.generators) == 1:
            gen = expr.generators[0]
            if (isinstance(gen.target, ast.Name) and isinstance(gen.iter, ast.Call)
                    and isinstance(gen.iter.func, ast.Name) and gen.iter.func.id == "range" and not gen.ifs):
                bounds = [self.value(a, mod, local) for a in gen.iter.args]
                if all(isinstance(b, int) for b in bounds):
                    out = []
                    for i in range(*bounds):
                        out.extend(self.items(expr.elt, mod, {**local, gen.target.id: i}, what))
                    return out
        raise ValueError(f"{mod.path.name}:{expr.lineno}: cannot read the node {what}s from "
                         f"{ast.unparse(expr)!r}; teach tests/workflow_check.py this form")

    @staticmethod
    def _locals(func: ast.FunctionDef) -> dict[str, Any]:
        local: dict[str, Any] = {}
        for node in ast.walk(func):
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                local[node.targets[0].id] = node.value
        return local

    @staticmethod
    def _returned(func: ast.FunctionDef) -> ast.expr:
        rets = [n for n in ast.walk(func) if isinstance(n, ast.Return) and n.value is not None]
        if len(rets) != 1:
            raise ValueError(f"{func.name}: expected one return statement, found {len(rets)}")
        return rets[0].value

    # ------------------------------------------------------------------ schemas
    def node_spec(self, cls: ast.ClassDef, mod: _Module) -> NodeSpec | None:
        schema_fn = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "define_schema"), None)
        if schema_fn is None:
            return None
        local = self._locals(schema_fn)
        call = next((n for n in ast.walk(schema_fn) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                     and n.func.attr == "Schema"), None)
        if call is None:
            raise ValueError(f"{mod.path.name}: {cls.name}.define_schema builds no io.Schema")
        kw = {k.arg: k.value for k in call.keywords if k.arg}

        def text(key: str) -> str:
            v = self.value(kw[key], mod, local) if key in kw else ""
            if not isinstance(v, str):
                raise ValueError(f"{mod.path.name}: {cls.name} {key} is not a literal string")
            return v

        node_id = text("node_id")
        inputs = self.items(kw["inputs"], mod, local, "Input") if "inputs" in kw else []
        outputs = self.items(kw["outputs"], mod, local, "Output") if "outputs" in kw else []
        output_node = "is_output_node" in kw and self.value(kw["is_output_node"], mod, local) is True
        # ComfyUI lists required inputs first, then optional ones (object_info input_order).
        ordered = [i for i in inputs if not i.optional] + [i for i in inputs if i.optional]
        return NodeSpec(node_id, text("display_name") or node_id, text("category"), ordered,
                        [(shown, typ) for shown, typ, _ in outputs], output_node,
                        source=f"{mod.path.relative_to(self.root).as_posix()}:{cls.name}",
                        output_ids=[out_id for _, _, out_id in outputs])

    def registered_class_names(self, nodes_dir: Path) -> dict[str, Path]:
        """Classes the pack hands to ComfyUI: node_list()'s literal list + every backend module's NODES."""
        names: dict[str, Path] = {}
        for path in sorted(nodes_dir.glob("*.py")):
            mod = self.module(path)
            lists = [mod.consts["NODES"]] if "NODES" in mod.consts else []
            if "node_list" in mod.funcs:
                for n in ast.walk(mod.funcs["node_list"]):
                    if isinstance(n, (ast.Assign, ast.AnnAssign)) and isinstance(n.value, ast.List):
                        lists.append(n.value)
            for lst in lists:
                for e in getattr(lst, "elts", []):
                    if isinstance(e, ast.Name):
                        names[e.id] = path
        return names


def static_specs(root: Path = PACK_ROOT) -> dict[str, NodeSpec]:
    """Every node the pack registers, by node id, read from nodes/*.py without importing ComfyUI."""
    parser = _StaticParser(root)
    nodes_dir = root / "nodes"
    specs: dict[str, NodeSpec] = {}
    by_class: dict[str, NodeSpec] = {}
    for path in sorted(nodes_dir.glob("*.py")):
        mod = parser.module(path)
        for cls in mod.classes.values():
            spec = parser.node_spec(cls, mod)
            if spec is not None:
                by_class[cls.name] = spec
    for cls_name in parser.registered_class_names(nodes_dir):
        if cls_name not in by_class:
            raise ValueError(f"nodes/: {cls_name} is registered but no class with define_schema was found")
        spec = by_class[cls_name]
        if spec.node_id in specs:
            raise ValueError(f"node id {spec.node_id} is defined twice ({specs[spec.node_id].source}, {spec.source})")
        specs[spec.node_id] = spec
    return specs


def static_constant(module: str, name: str, root: Path = PACK_ROOT) -> Any:
    """A module-level constant of the pack, e.g. ``static_constant("nodes/common.py", "EDIT_IMAGE_INPUTS")``."""
    parser = _StaticParser(root)
    return parser.name(name, parser.module(root / module), {})


# ============================================================================ live server schemas
def specs_from_object_info(object_info: dict, names: list[str] | None = None) -> dict[str, NodeSpec]:
    specs = {}
    for node_id in names if names is not None else list(object_info):
        info = object_info[node_id]
        inputs = []
        for section in ("required", "optional"):
            for name in info.get("input_order", {}).get(section, list(info["input"].get(section, {}))):
                raw = info["input"][section][name]
                kind, opts = raw[0], (raw[1] if len(raw) > 1 and isinstance(raw[1], dict) else {})
                options = None
                if isinstance(kind, list):
                    kind, options = "COMBO", tuple(kind)
                elif kind == "COMBO":
                    options = tuple(opts.get("options", ()))
                inputs.append(InputSpec(name, kind, optional=section == "optional",
                                        control_after_generate=bool(opts.get("control_after_generate")),
                                        image_upload=bool(opts.get("image_upload")),
                                        force_input=bool(opts.get("forceInput")), options=options,
                                        min=opts.get("min"), max=opts.get("max")))
        outputs = list(zip(info.get("output_name") or info["output"], info["output"]))
        specs[node_id] = NodeSpec(node_id, info.get("display_name") or node_id, info.get("category", ""), inputs,
                                  outputs, bool(info.get("output_node")), source="object_info",
                                  output_ids=[name for name, _ in outputs])
    return specs


def allowed_specs(gentor: dict[str, NodeSpec]) -> dict[str, NodeSpec]:
    """Gentor nodes plus the allow-listed core nodes."""
    clash = set(gentor) & set(CORE_SPECS)
    if clash:
        raise ValueError(f"Gentor node ids collide with core ids: {sorted(clash)}")
    return {**CORE_SPECS, **gentor}


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


def is_link(value: Any) -> bool:
    return (isinstance(value, list) and len(value) == 2 and isinstance(value[0], str)
            and isinstance(value[1], int) and not isinstance(value[1], bool))


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


def object_info_from_specs(specs: dict[str, NodeSpec]) -> dict[str, dict]:
    """The ``/object_info`` entries a server would report for ``specs`` (what the converter reads)."""
    info: dict[str, dict] = {}
    for node_id, spec in specs.items():
        sections: dict[str, dict] = {"required": {}, "optional": {}}
        for i in spec.inputs:
            opts: dict[str, Any] = {}
            if i.control_after_generate:
                opts["control_after_generate"] = True
            if i.image_upload:
                opts["image_upload"] = True
            if i.force_input:
                opts["forceInput"] = True
            if i.type == "COMBO":
                opts["options"] = list(i.options) if isinstance(i.options, tuple) else []
            sections["optional" if i.optional else "required"][i.name] = [i.type, opts]
        info[node_id] = {"input": sections, "input_order": {k: list(v) for k, v in sections.items()},
                         "output": [t for _, t in spec.outputs], "output_name": [n for n, _ in spec.outputs],
                         "name": node_id, "display_name": spec.display_name, "category": spec.category,
                         "output_node": spec.output_node}
    return info


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


# ============================================================================ files
def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def workflow_names() -> list[str]:
    return sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))


def load_pair(name: str) -> tuple[dict, dict]:
    return load_json(WORKFLOWS_DIR / f"{name}.json"), load_json(API_DIR / f"{name}.json")


def dump_json(data: Any) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


def sampler_of(api: dict) -> tuple[str, dict]:
    """(node id, node) of the node whose IMAGE the first SaveImage saves."""
    save = next(n for n in api.values() if n["class_type"] == "SaveImage")
    src = save["inputs"]["images"][0]
    return src, api[src]


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
