"""The one module below nodes/ that talks to ComfyUI.

Device choice, free memory, progress bars with previews, interrupts, model-folder registration,
memory-manager registration, the server's route table and whether a prompt runs. Each has a plain-Python
fallback so loaders and samplers run (and are tested) without ComfyUI.
"""
from __future__ import annotations

import functools
import logging
import os
import threading
from typing import Any, Callable

import torch

from .errors import GentorInterrupted

log = logging.getLogger(__name__)

PREVIEW_FORMAT = "JPEG"
PREVIEW_MAX_SIZE = 512
# Outside ComfyUI, model folders come from here: $GENTOR_MODELS_DIR/<folder key>/.
MODELS_DIR_ENV = "GENTOR_MODELS_DIR"
DEVICE_ENV = "GENTOR_DEVICE"

_fallback_roots: dict[str, list[str]] = {}
_interrupt = threading.Event()


@functools.lru_cache(maxsize=1)
def comfy() -> Any | None:
    """ComfyUI's model_management module, or None when we run outside ComfyUI."""
    try:
        import comfy.model_management as mm  # noqa: PLC0415 - optional, only inside ComfyUI
        import folder_paths  # noqa: F401,PLC0415
    except ImportError:
        return None
    return mm


def in_comfyui() -> bool:
    return comfy() is not None


# ----------------------------------------------------------------------------- model folders
def register_model_folder(key: str) -> None:
    """Add ``models/<key>`` to ComfyUI's folder registry without replacing user paths."""
    if in_comfyui():
        import folder_paths  # noqa: PLC0415

        # add_model_folder_path appends, so paths from extra_model_paths.yaml stay in place.
        folder_paths.add_model_folder_path(key, os.path.join(folder_paths.models_dir, key))


def model_roots(key: str) -> list[str]:
    """Every root folder registered for a model-folder key, in priority order."""
    if in_comfyui():
        import folder_paths  # noqa: PLC0415

        if key not in folder_paths.folder_names_and_paths:
            return []
        return list(folder_paths.get_folder_paths(key))
    if key in _fallback_roots:
        return list(_fallback_roots[key])
    base = os.environ.get(MODELS_DIR_ENV)
    return [os.path.join(base, key)] if base else []


# Outside ComfyUI, where ComfyUI's bundled tokenizer folders (comfy/text_encoders/<name>/) are found.
BUNDLED_TOKENIZERS_KEY = "comfy_text_encoders"


def bundled_tokenizer_dirs(name: str) -> list[str]:
    """Candidate folders of a tokenizer ComfyUI ships (``comfy/text_encoders/<name>``), never the network."""
    mm = comfy()
    if mm is not None:  # comfy/model_management.py sits beside comfy/text_encoders/
        return [os.path.join(os.path.dirname(os.path.realpath(mm.__file__)), "text_encoders", name)]
    return [os.path.join(root, name) for root in _fallback_roots.get(BUNDLED_TOKENIZERS_KEY, [])]


def set_fallback_roots(key: str, roots: list[str]) -> None:
    """Outside ComfyUI: say where a folder key's models live (tests, scripts)."""
    _fallback_roots[key] = [str(r) for r in roots]


# ----------------------------------------------------------------------------- devices / memory
def torch_device() -> torch.device:
    """The device models compute on."""
    mm = comfy()
    if mm is not None:
        return mm.get_torch_device()
    if os.environ.get(DEVICE_ENV):
        return torch.device(os.environ[DEVICE_ENV])
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def offload_device() -> torch.device:
    """Where weights rest when they are not on the compute device."""
    mm = comfy()
    return mm.unet_offload_device() if mm is not None else torch.device("cpu")


def free_memory_bytes(device: torch.device) -> int:
    """Memory free on a device right now (RAM for the CPU)."""
    mm = comfy()
    if mm is not None:
        return int(mm.get_free_memory(device))
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil  # noqa: PLC0415

    return int(psutil.virtual_memory().available)


def make_room(needed: int, device: torch.device) -> None:
    """Ask ComfyUI to evict other models until ``needed`` bytes are free on ``device``."""
    mm = comfy()
    if mm is not None:
        if device.type != "cpu":
            mm.free_memory(needed, device)
    elif device.type == "cuda":
        torch.cuda.empty_cache()


class _Holder(torch.nn.Module):
    """A plain container: ComfyUI's ModelPatcher assigns ``.device``, a read-only property on
    diffusers/transformers models, so they are wrapped rather than patched."""

    def __init__(self, inner: torch.nn.Module, device: torch.device) -> None:
        super().__init__()
        self.inner = inner
        self.device = device


def memory_manager_features() -> dict[str, bool]:
    """What ComfyUI's memory manager offers here, detected by feature, never by version.

    - ``dynamic_vram``: newer ComfyUI's aimdo path is on (default on NVIDIA since spring 2026). Our patchers
      stay the legacy ``ModelPatcher`` (our layers are not comfy.ops layers, which the dynamic patcher
      needs); mixing one in costs pinned RAM of its resident size, so hook-managed weights register as
      empty stand-ins and only ``offload = none`` registers real bytes.
    - ``on_detach``: ComfyUI tells patchers when it unloads them; without it /free cannot reach our cache.
    """
    if not in_comfyui():
        return {}
    import sys  # noqa: PLC0415

    from comfy.patcher_extension import CallbacksMP  # noqa: PLC0415

    return {"dynamic_vram": bool(getattr(sys.modules.get("comfy.memory_management"), "aimdo_enabled", False)),
            "on_detach": hasattr(CallbacksMP, "ON_DETACH")}


def make_patcher(module: torch.nn.Module | None, size: int, on_detach: Callable[[], None]) -> Any | None:
    """Register a module with ComfyUI's memory manager (None outside ComfyUI).

    ``module=None`` registers an empty stand-in (for weights our own hooks move). ``on_detach`` runs
    when ComfyUI unloads it (room for another model, "Unload models", /free).
    """
    if not in_comfyui():
        return None
    import comfy.model_patcher as mp  # noqa: PLC0415
    from comfy.patcher_extension import CallbacksMP  # noqa: PLC0415

    features = memory_manager_features()
    holder = _Holder(module if module is not None else torch.nn.Module(), offload_device())
    # Deliberately the legacy class, also where CoreModelPatcher is the dynamic one: the dynamic load()
    # refuses full loads and expects comfy.ops layers.
    patcher = mp.ModelPatcher(holder, load_device=torch_device(), offload_device=offload_device(), size=size)
    if features["on_detach"]:
        patcher.add_callback(CallbacksMP.ON_DETACH, lambda _p, _unpatch_all: on_detach())
    else:
        log.warning("Gentor: this ComfyUI's ModelPatcher has no ON_DETACH callback: 'Unload models' and /free "
                    "cannot free Gentor's cache; use POST /gentor/unload")
    return patcher


def empty_patcher(patcher: Any) -> None:
    """Detach our module from a patcher so its weights can be freed while the patcher lives on."""
    patcher.model.inner = torch.nn.Module()


def load_patchers(patchers: list[Any]) -> None:
    """Put registered modules on the compute device through ComfyUI (it frees room first)."""
    mm = comfy()
    if mm is not None and patchers:
        # force_full_load: plain torch layers cannot be split by ComfyUI's partial loading.
        mm.load_models_gpu(patchers, force_full_load=True)


# ----------------------------------------------------------------------------- interrupt / progress
def check_interrupt() -> None:
    """Raise if the user pressed Cancel (ComfyUI) or request_interrupt() was called."""
    mm = comfy()
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()
    if _interrupt.is_set():
        _interrupt.clear()
        raise GentorInterrupted("Gentor run: cancelled by the user (interrupt requested). Queue it again to rerun.")


def request_interrupt() -> None:
    """Cancel the running generation at its next step (outside ComfyUI)."""
    _interrupt.set()


def is_interrupt(exc: BaseException) -> bool:
    mm = comfy()
    if mm is not None and isinstance(exc, mm.InterruptProcessingException):
        return True
    return isinstance(exc, GentorInterrupted)


class Progress:
    """Per-step progress with optional preview images; also the interrupt check point."""

    def __init__(self, total: int, listener: Callable[[int, int, Any], None] | None = None) -> None:
        self.total = max(1, int(total))
        self.listener = listener
        self.bar = None
        if in_comfyui():
            import comfy.utils  # noqa: PLC0415

            self.bar = comfy.utils.ProgressBar(self.total)

    def update(self, value: int, preview: Any = None) -> None:
        check_interrupt()
        if self.bar is not None:
            shown = (PREVIEW_FORMAT, preview, PREVIEW_MAX_SIZE) if preview is not None else None
            self.bar.update_absolute(value, self.total, shown)
        if self.listener is not None:
            self.listener(value, self.total, preview)


# ----------------------------------------------------------------------------- server
def server_routes() -> Any | None:
    """ComfyUI's route table (``PromptServer.instance.routes``), or None outside ComfyUI. The HTTP API
    package adds its routes to it; glue itself knows nothing of them."""
    if not in_comfyui():
        return None
    from server import PromptServer  # noqa: PLC0415 - only inside ComfyUI

    return PromptServer.instance.routes


def prompt_running() -> bool:
    """Whether ComfyUI is executing a prompt right now (False outside ComfyUI)."""
    if not in_comfyui():
        return False
    from server import PromptServer  # noqa: PLC0415

    queue = PromptServer.instance.prompt_queue  # looked up per call: created after the nodes load
    # currently_running holds the executing prompt (ComfyUI 0.3.64 and 0.8.0 alike).
    running = getattr(queue, "currently_running", None)
    return bool(running if running is not None else queue.get_current_queue()[0])
