"""Pack-level contract: cheap import, V3 registration only, registry, optional dependencies."""
from __future__ import annotations

import logging
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


def test_missing_optional_dependency_skips_backend(monkeypatch, caplog):
    fake = registry.BackendSpec("fake", "Fake", ("fake",), (("no_such_module_xyz", "no-such-package"),))
    monkeypatch.setattr(registry, "BACKENDS", registry.BACKENDS + (fake,))
    with caplog.at_level(logging.WARNING):
        ids = [b.id for b in registry.available()]
    assert "qwen_image" in ids and "fake" not in ids
    assert "Fake nodes disabled: missing no-such-package (pip install no-such-package)" in caplog.text


def test_layering_no_comfy_imports_below_nodes():
    for folder in ("loaders", "samplers", "modeling"):
        for path in (ROOT / folder).rglob("*.py"):
            text = path.read_text()
            for mod in ("comfy", "comfy_api", "folder_paths", "server"):
                assert f"\nimport {mod}" not in text and f"\nfrom {mod} " not in text and \
                    f"\nfrom {mod}." not in text, f"{path} imports {mod}"
