"""Test setup: offline, the pack importable as ``gentor`` whatever its folder is called, tiny models."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for `import tests.tiny_models`


def _import_pack() -> None:
    # The checkout folder may be named "comfyui-gentor" (not importable): load it under an alias.
    if "gentor" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("gentor", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["gentor"] = module
    spec.loader.exec_module(module)


_import_pack()


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with every backend's tiny models (tests.tiny_models.write_all; once per session)."""
    from tests import tiny_models

    out = Path(os.environ.get("GENTOR_TINY_DIR") or tmp_path_factory.mktemp("models"))
    tiny_models.write_all(out)
    return out


@pytest.fixture()
def model_roots(tiny_root: Path) -> dict[str, Path]:
    """Register the tiny models as every backend's model folders (plain-Python glue fallback); a key the
    kit wrote nothing for gets no root. Returns {folder key: folder}."""
    from gentor import glue, registry

    roots = {}
    for key in dict.fromkeys(k for spec in registry.BACKENDS for k in spec.folder_keys):
        folder = Path(tiny_root) / key
        glue.set_fallback_roots(key, [folder] if folder.is_dir() else [])
        roots[key] = folder
    return roots


@pytest.fixture()
def qwen_roots(model_roots: dict[str, Path]) -> Path:
    """Kept for tests/test_qwen_image.py until it asks for model_roots itself."""
    return model_roots["qwen_image"]


# ----------------------------------------------------------------------------- a real ComfyUI (server tests)
DECOY_PLAIN = "decoy-not-a-model"  # a folder with a config but no weights: no loader may list it
DECOY_OTHER = "decoy-other-pipeline"  # a diffusers pipeline of a family no Gentor backend reads
STRAY_FILE = "stray-file.safetensors"
LINK_PREFIX = "linked-"  # linked-<tiny folder>: a symlink to a model kept outside the models folder


def _own_keys() -> list[str]:
    """Each backend's own model folder key (its first), in registry order."""
    from gentor import registry

    return list(dict.fromkeys(spec.folder_keys[0] for spec in registry.BACKENDS))


@pytest.fixture(scope="session")
def server_models(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's models folder: a copy of every tiny model, decoys in each backend's own folder, and
    for every tiny folder a symlink ``linked-<name>`` to the original outside this folder (how users keep
    models on another disk)."""
    root = tmp_path_factory.mktemp("comfy_models")
    for key_dir in sorted(p for p in Path(tiny_root).iterdir() if p.is_dir()):
        shutil.copytree(key_dir, root / key_dir.name)
        for variant in sorted(p for p in key_dir.iterdir() if p.is_dir()):
            (root / key_dir.name / f"{LINK_PREFIX}{variant.name}").symlink_to(variant.resolve(),
                                                                            target_is_directory=True)
    for key in _own_keys():
        folder = root / key
        (folder / DECOY_PLAIN / "transformer").mkdir(parents=True)
        (folder / DECOY_PLAIN / "transformer" / "config.json").write_text("{}")
        (folder / DECOY_PLAIN / "README.md").write_text("not a model\n")
        (folder / DECOY_OTHER).mkdir()
        (folder / DECOY_OTHER / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
        (folder / STRAY_FILE).write_bytes(b"\0" * 16)
    return root


@pytest.fixture(scope="session")
def comfy_server(server_models: Path, tmp_path_factory: pytest.TempPathFactory):
    """One real ComfyUI for every server test file (skips with the reason when COMFYUI_DIR is unusable)."""
    from tests.comfy_server import ComfyServer, comfy_dir_or_skip

    comfy_dir = comfy_dir_or_skip()
    inputs = sorted((ROOT / "workflows" / "inputs").glob("*.png"))
    srv = ComfyServer(comfy_dir, tmp_path_factory.mktemp("comfy_base"), server_models, inputs)
    srv.start()
    print(f"\nComfyUI listening after {srv.start_seconds:.1f} s on {srv.url}; log {srv.log_path}")
    try:
        yield srv
    finally:
        srv.stop()
