"""Test setup: offline, the pack importable as ``gentor`` whatever its folder is called, tiny models."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # for `import tests.tiny_models`

from tests.tiny_common import import_pack  # noqa: E402 - needs ROOT on sys.path

import_pack()  # the checkout folder may be named "comfyui-gentor" (not importable): load it as ``gentor``


@pytest.fixture(scope="module", autouse=True)
def module_starts_with_empty_cache():
    """Every test module starts with an empty model cache. The cache is process-wide and counts entries per
    architecture, so a module that left Qwen-Image's text encoder (kind qwen2_5_vl) loaded made the next
    module's "one VLM copy" checks see two copies, depending on the order the files ran in."""
    from gentor.loaders.cache import CACHE

    CACHE.unload()
    yield


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


@pytest.fixture()
def fresh_cache(qwen_roots: Path):
    """The test starts and ends with an empty model cache (Qwen-Image's tiny models registered)."""
    from gentor.loaders.cache import CACHE

    CACHE.unload()
    yield
    CACHE.unload()


@pytest.fixture(scope="module")
def qwen_fp32_reference(tiny_root: Path):
    """The tiny Qwen-Image T2I image with fp32 weights and no offload: what memory options are compared to."""
    from gentor import glue
    from gentor.loaders.cache import CACHE
    from gentor.loaders.memory import MemoryOptions
    from tests.qwen_helpers import t2i

    glue.set_fallback_roots("qwen_image", [tiny_root / "qwen_image"])
    CACHE.unload()
    return t2i(memory=MemoryOptions(weight_dtype="fp32")).image


# ----------------------------------------------------------------------------- a real ComfyUI (server tests)
@pytest.fixture(scope="session")
def server_models(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's models folder: every tiny model, decoys, symlinked copies (tests/comfy_server.py)."""
    from gentor import registry
    from tests.comfy_server import write_server_models

    own_keys = list(dict.fromkeys(spec.folder_keys[0] for spec in registry.BACKENDS))
    return write_server_models(Path(tiny_root), tmp_path_factory.mktemp("comfy_models"), own_keys)


@pytest.fixture(scope="session")
def comfy_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """One real ComfyUI for every server test file (skips with the reason when COMFYUI_DIR is unusable,
    before any tiny model is written)."""
    from tests.comfy_server import ComfyServer, comfy_dir_or_skip

    comfy_dir = comfy_dir_or_skip()
    models = request.getfixturevalue("server_models")
    inputs = sorted((ROOT / "workflows" / "inputs").glob("*.png"))
    srv = ComfyServer(comfy_dir, tmp_path_factory.mktemp("comfy_base"), models, inputs)
    srv.start()
    print(f"\nComfyUI listening after {srv.start_seconds:.1f} s on {srv.url}; log {srv.log_path}")
    try:
        yield srv
    finally:
        srv.stop()
