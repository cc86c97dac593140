"""Pack-level contract: cheap import, V3 registration only, registry, optional dependencies."""
from __future__ import annotations

import ast
import logging
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import gentor
from gentor import registry

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_cheap_and_v3_only(tmp_path):
    # A folder name with a hyphen, as users clone it: importing must not pull torch, diffusers or ComfyUI.
    link = tmp_path / "comfyui-gentor"
    link.symlink_to(ROOT)
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('comfyui-gentor', r'{link}/__init__.py',"
        f" submodule_search_locations=[r'{link}'])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules[spec.name] = m; spec.loader.exec_module(m)\n"
        "heavy = [n for n in ('torch', 'diffusers', 'transformers', 'comfy_api') if n in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert m.WEB_DIRECTORY == 'web' and not hasattr(m, 'NODE_CLASS_MAPPINGS')\n"
        "import inspect; assert inspect.iscoroutinefunction(m.comfy_entrypoint)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert (ROOT / gentor.WEB_DIRECTORY / "gentor.js").is_file()


def test_pyproject_and_requirements():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "gentor" and meta["project"]["license"]["text"] == "Apache-2.0"
    assert meta["tool"]["comfy"]["PublisherId"] == "gentor" and "requires-comfyui" in meta["tool"]["comfy"]
    assert "Repository" in meta["project"]["urls"]
    reqs = [line.split(">")[0].split("=")[0].strip().lower() for line in
            (ROOT / "requirements.txt").read_text().splitlines() if line and not line.startswith("#")]
    assert not {"torch", "torchvision", "transformers"} & set(reqs), "never pin what ComfyUI owns"
    assert not any("flash" in r for r in reqs)
    # The installable package is the headless client: no torch / model libraries unless asked for.
    deps = {_req_name(d) for d in meta["project"]["dependencies"]}
    assert not deps & {"torch", "torchvision", "diffusers", "transformers", "accelerate", "peft"}, deps
    extra = {_req_name(d) for d in meta["project"]["optional-dependencies"]["nodes"]}
    assert set(reqs) == extra | deps, "requirements.txt (what ComfyUI-Manager installs) and the extra disagree"


def _req_name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].strip().lower()


def test_licence_icon_and_ignores():
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    icon = meta["tool"]["comfy"]["Icon"].split("/main/", 1)[1]  # the URL names a file of this repository
    assert (ROOT / icon).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ignored = (ROOT / ".gitignore").read_text().split()
    assert {"build/", "*.egg-info/", ".venv/", "venv/"} <= set(ignored)


def test_missing_optional_dependency_skips_backend(monkeypatch, caplog):
    fake = registry.BackendSpec("fake", "Fake", ("fake",), (("no_such_module_xyz", "no-such-package"),))
    monkeypatch.setattr(registry, "BACKENDS", registry.BACKENDS + (fake,))
    with caplog.at_level(logging.WARNING):
        ids = [b.id for b in registry.available()]
    assert "qwen_image" in ids and "fake" not in ids
    assert "Fake nodes disabled: missing no-such-package (pip install no-such-package)" in caplog.text


COMFY_MODULES = ("comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "nodes",
                 "execution", "latent_preview", "node_helpers")
COMFY_ALLOWED = ("nodes/", "glue.py")  # the node classes and the ONE glue module may import ComfyUI


def comfy_imports(source: str, filename: str = "<source>") -> list[tuple[int, str]]:
    """(line, module) of every absolute import of a ComfyUI module anywhere in ``source`` (function bodies,
    try blocks, class bodies included); relative imports (``from .nodes import``) are the pack's own."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))
              and getattr(node.func, "id", getattr(node.func, "attr", "")) in ("import_module", "__import__")
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names = [node.args[0].value]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.split(".")[0] in COMFY_MODULES]
    return found


def test_layering_checker_catches_indented_and_dynamic_imports():
    source = (
        "import os\n"
        "from .nodes import thing\n"  # relative: the pack's own module, allowed
        "def f():\n"
        "    import comfy.model_management as mm\n"
        "    if True:\n"
        "        from folder_paths import get_folder_paths\n"
        "class C:\n"
        "    try:\n"
        "        import server\n"
        "    except ImportError:\n"
        "        server = None\n"
        "def g():\n"
        "    return importlib.import_module('comfy_api.latest')\n"
    )
    assert comfy_imports(source) == [(4, "comfy.model_management"), (6, "folder_paths"), (9, "server"),
                                      (13, "comfy_api.latest")]
    assert comfy_imports("import comfyui_gentor_like\nfrom serverless import x\n") == []


def test_layering_no_comfy_imports_outside_nodes_and_glue():
    checked = 0
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith((".venv/", "venv/", "tests/", "benchmarks/", "build/")) or rel.startswith(COMFY_ALLOWED):
            continue
        checked += 1
        assert comfy_imports(path.read_text(encoding="utf-8"), rel) == [], f"{rel} imports ComfyUI"
    assert checked >= 10, checked  # loaders/, samplers/, modeling/, registry, errors, gentor_headless, …


V3_API_MODULE = "comfy_api.v0_0_2"  # re-exports io, ui, ComfyExtension in ComfyUI 0.3.64 and 0.8.0 alike


def test_nodes_import_the_versioned_v3_api():
    """A versioned module both supported ComfyUI versions have, never comfy_api.latest (which moves)."""
    for path in sorted((ROOT / "nodes").glob("*.py")) + [ROOT / "glue.py"]:
        rel = path.relative_to(ROOT).as_posix()
        api = [m for _, m in comfy_imports(path.read_text(encoding="utf-8"), rel) if m.startswith("comfy_api")]
        assert all(m == V3_API_MODULE for m in api), (rel, api)
