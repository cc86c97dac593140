"""What every tiny-model kit module shares, with the pack's requirements alone (no pytest): the README tells
users to run ``python -m tests.tiny_models`` with ComfyUI's Python, which need not have the test tools.

- ``import_pack()``: the pack importable as ``gentor`` whatever its folder is called (kits that build weights
  with the pack's own modules, and conftest.py, call it);
- ``atomic_folder(final, fill)``: a model folder is written into a temporary sibling and renamed into place
  once complete (with a ``.complete`` marker), so a failed or interrupted run leaves nothing partial.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_MODULE = "gentor"
COMPLETE_MARKER = ".complete"
TMP_INFIX = ".tmp-"  # temporary siblings are named .<final name>.tmp-<pid>


def import_pack() -> None:
    """Load the pack as ``gentor`` (the checkout folder may be named "comfyui-gentor", not importable)."""
    if PACK_MODULE in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(PACK_MODULE, PACK_ROOT / "__init__.py",
                                                  submodule_search_locations=[str(PACK_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACK_MODULE]  # a half-imported pack must not shadow a later, working import
        raise


def is_complete(folder: Path) -> bool:
    return (Path(folder) / COMPLETE_MARKER).is_file()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _remove_stale_siblings(final: Path) -> None:
    """Temporary siblings left by a killed run (their writer is gone): remove them, so that no half-written
    folder stays in a models folder. A live writer's (another process writing the same kit) is left alone."""
    for tmp in final.parent.glob(f".{final.name}{TMP_INFIX}*"):
        pid = tmp.name.rpartition(TMP_INFIX)[2]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def atomic_folder(final: Path, fill: Callable[[Path], None], force: bool = False) -> Path:
    """Write ``final`` by ``fill(tmp)`` into a temporary sibling, then rename it into place; a complete folder
    is kept unless ``force``. On any failure the temporary folder is removed and ``final`` is untouched."""
    final = Path(final)
    if is_complete(final) and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(final)
    tmp = final.parent / f".{final.name}{TMP_INFIX}{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        fill(tmp)
        (tmp / COMPLETE_MARKER).write_text(final.name + "\n", encoding="utf-8")
        if final.exists():
            shutil.rmtree(final)
        try:
            tmp.rename(final)
        except OSError:
            if not is_complete(final):  # lost a race against another writer: theirs is as good
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
