"""Test setup: offline, the pack importable as ``gentor`` whatever its folder is called, tiny models."""
from __future__ import annotations

import importlib.util
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
    """A models folder with every tiny Qwen-Image variant (written once per session)."""
    from tests import tiny_models

    out = Path(os.environ.get("GENTOR_TINY_DIR") or tmp_path_factory.mktemp("models"))
    tiny_models.write_all(out)
    return out


@pytest.fixture()
def qwen_roots(tiny_root: Path):
    """Register the tiny models as the qwen_image folder (plain-Python glue fallback)."""
    from gentor import glue

    glue.set_fallback_roots("qwen_image", [tiny_root / "qwen_image"])
    glue.set_fallback_roots("diffusers", [])
    yield tiny_root / "qwen_image"
