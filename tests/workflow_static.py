"""The pack's node schemas read from nodes/*.py with ``ast`` (no ComfyUI, no ``comfy_api`` import).

``io.Schema(node_id=..., inputs=...)`` in each ``define_schema``, following helper calls such as
``common_inputs()`` / ``settings_input()``, local names and ``for i in range(1, EDIT_IMAGE_INPUTS + 1)``
comprehensions, with constants resolved across the pack's relative imports.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

from tests.workflow_files import PACK_ROOT
from tests.workflow_specs import UNKNOWN, InputSpec, NodeSpec, Unknown


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
                         f"{ast.unparse(expr)!r}; teach tests/workflow_static.py this form")

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
