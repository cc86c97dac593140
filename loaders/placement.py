"""The placement layer: apply a memory plan to any backend's named components (DESIGN.md §5–6).

A backend only declares its components (role -> cache entry) and, in the registry, each role's block
containers (dotted paths such as ``model.language_model.layers``). Modes:

- ``none``: every weight resident on the device, registered with ComfyUI's memory manager (it frees room
  first and may evict ours when another model needs the VRAM).
- ``model``: one component on the device at a time. A forward pre-hook on each component and on its
  children and grandchildren (so method-style entry points such as a VAE's ``encode``/``decode`` or a VLM's image tower also
  trigger it) moves that component in and the previous one out. Works for any ``nn.Module``; no pipeline.
- ``block``: diffusers' ``apply_group_offloading`` on the declared NESTED block containers (``block_modules``
  recursion), so LLM-shaped models stream one decoder layer at a time; CUDA streams on CUDA.

``vram_budget_gb`` switches ``none`` to ``block`` when the resident weights would not fit; a budget below
the largest single block is refused with the numbers. After an error or Cancel, what model offload put on
the device goes back (``running()``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
from typing import Iterator, Mapping

import torch

from .. import glue
from ..errors import MemoryEstimateError, ModelFolderError
from .cache import CACHE, Entry
from .cancel import cancel_points
from .memory import Plan

log = logging.getLogger(__name__)

GROUP_OFFLOAD_HOOKS = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")
BLOCKS_PER_GROUP = 1
CONTAINER_TYPES = (torch.nn.ModuleList, torch.nn.Sequential)

# Which component model offload has on each device right now (entries are shared between backends, so
# this is process-wide, not per placement).
_active: dict[str, Entry] = {}
_active_lock = threading.RLock()


def block_containers(module: torch.nn.Module, paths: tuple[str, ...], display: str, role: str) -> list[tuple[str, torch.nn.Module]]:
    """Resolve declared container paths; each must exist and be a ModuleList / Sequential."""
    out = []
    for path in paths:
        try:
            container = module.get_submodule(path)
        except AttributeError as exc:
            children = ", ".join(n for n, _ in module.named_children())
            raise ModelFolderError(
                f"{display} {role}: block container {path!r} does not exist in the loaded {type(module).__name__} "
                f"(got top-level children {children}, expected {path}). The weights are of another architecture "
                "or layout than the backend declares: check the model folder, or report it.") from exc
        if not isinstance(container, CONTAINER_TYPES):
            raise ModelFolderError(
                f"{display} {role}: block container {path!r} is not a list of blocks (got "
                f"{type(container).__name__}, expected ModuleList or Sequential). Report this layout.")
        out.append((path, container))
    return out


def _block_bytes(container: torch.nn.Module) -> int:
    return max((sum(t.numel() * t.element_size() for t in b.state_dict().values()) for b in container), default=0)


def has_block_offload(module: torch.nn.Module) -> bool:
    """True when group-offloading hooks sit on the module or any submodule."""
    return any(getattr(m, "_diffusers_hook", None) is not None and
               m._diffusers_hook.get_hook("group_offloading") is not None for m in module.modules())


def apply_block_offload(module: torch.nn.Module, paths: tuple[str, ...], device: torch.device,
                        display: str = "Gentor", role: str = "model") -> None:
    """Weights rest on the CPU; each declared block is moved to ``device`` just before it runs."""
    from diffusers.hooks import apply_group_offloading  # noqa: PLC0415

    block_containers(module, paths, display, role)  # validate first: clear error, nothing half-applied
    # diffusers recurses into children named in block_modules at every level; the ModuleList at the end
    # of each path is split into per-block groups by diffusers itself.
    names = sorted({part for p in paths for part in p.split(".")[:-1]})
    module.to("cpu")
    use_stream = device.type == "cuda"
    apply_group_offloading(module, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=BLOCKS_PER_GROUP,
                           use_stream=use_stream, non_blocking=use_stream, block_modules=names or None)


def remove_block_offload(module: torch.nn.Module) -> None:
    """Undo apply_block_offload; the weights stay where they are (the CPU)."""
    from diffusers.hooks import HookRegistry  # noqa: PLC0415

    registry = HookRegistry.check_if_exists_or_initialize(module)
    for name in GROUP_OFFLOAD_HOOKS:
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()


def activate(entry: Entry, device: torch.device) -> None:
    """Model offload: put ``entry`` on ``device`` and the component that was there back on the CPU."""
    with _active_lock:
        slot = str(device)
        current = _active.get(slot)
        if current is entry:
            return
        if current is not None and current.value is not None:
            current.value.to("cpu")
        if device.type != "cpu":
            glue.make_room(entry.nbytes, device)
            entry.value.to(device)
        _active[slot] = entry


def deactivate_all(device: torch.device) -> None:
    """Model offload after an error or Cancel: nothing stays on the device."""
    with _active_lock:
        current = _active.pop(str(device), None)
        if current is not None and current.value is not None and device.type != "cpu":
            current.value.to("cpu")


@functools.lru_cache(maxsize=1)
def _activate_hook_type() -> type:
    from accelerate.hooks import ModelHook  # noqa: PLC0415

    class ActivateHook(ModelHook):
        def __init__(self, entry: Entry, device: torch.device) -> None:
            self.entry = entry
            self.execution_device = device

        def pre_forward(self, module: torch.nn.Module, *args, **kwargs):  # noqa: ANN002, ANN003
            activate(self.entry, self.execution_device)
            return args, kwargs

    return ActivateHook


def _ActivateHook(entry: Entry, device: torch.device):  # noqa: N802 - a class built lazily (accelerate import)
    return _activate_hook_type()(entry, device)


class _HookHandle:
    """Removes an accelerate hook the way a torch hook handle is removed."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def remove(self) -> None:
        from accelerate.hooks import remove_hook_from_module  # noqa: PLC0415

        remove_hook_from_module(self.module)


class Placement:
    """Applies a plan to a backend's components (role -> cache entry); see the module docstring."""

    def __init__(self, components: Mapping[str, Entry], blocks: Mapping[str, tuple[str, ...]], plan: Plan,
                 display: str, mover: str = "") -> None:
        self.components = {r: e for r, e in components.items() if isinstance(e.value, torch.nn.Module)}
        self.blocks = dict(blocks)
        self.plan = plan
        self.display = display
        # A named engine that moves the weights itself under model/block offload (DiffSynth's VRAM management):
        # the weights rest on the CPU with no hooks of ours; ComfyUI still sees them and can free them.
        self.mover = mover
        self.notes: list[str] = []

    # -- planning
    def _with_budget(self) -> Plan:
        plan = self.plan
        if not plan.budget_bytes:
            return plan
        resident = sum(e.nbytes for e in self.components.values())
        if plan.offload == "none" and resident > plan.budget_bytes:
            self.notes.append(f"weights ({resident / 1e9:.2f} GB) exceed vram_budget_gb "
                              f"({plan.budget_bytes / 1e9:.2f} GB): using block offload")
            plan = dataclasses.replace(plan, offload="block")
        if plan.offload == "block":
            largest = max((_block_bytes(c) for role, e in self.components.items()
                           for _, c in block_containers(e.value, self.blocks.get(role, ()), self.display, role)),
                          default=0)
            # Components without declared blocks are moved whole: they count as one block.
            largest = max([largest] + [e.nbytes for r, e in self.components.items() if not self.blocks.get(r)])
            if largest > plan.budget_bytes:
                raise MemoryEstimateError(
                    f"{self.display} vram_budget_gb: the budget is smaller than the largest block that must sit "
                    f"on the device at once (got {plan.budget_bytes / 1e9:.2f} GB, expected at least "
                    f"{largest / 1e9:.2f} GB). Raise vram_budget_gb, or set it to 0 for no limit.")
        if plan.offload == "model":
            largest = max(e.nbytes for e in self.components.values())
            if largest > plan.budget_bytes:
                raise MemoryEstimateError(
                    f"{self.display} vram_budget_gb: model offload puts a whole component on the device (got a "
                    f"budget of {plan.budget_bytes / 1e9:.2f} GB, expected at least {largest / 1e9:.2f} GB for "
                    "the largest component). Use offload = block, or raise the budget.")
        return plan

    # -- applying
    def apply(self) -> Plan:
        """Put every component where the plan says; re-plans without reading the disk."""
        plan = self._with_budget()
        self.plan = plan
        external = bool(self.mover) and plan.offload != "none"
        want = f"{self.mover + '-' if external else ''}{plan.offload}@{plan.device}"
        for role, entry in self.components.items():
            if entry.placement == want:
                continue  # hooks live on the cached module and survive between runs
            self._clear(entry)
            module = entry.value
            if external:
                module.to("cpu")
            elif plan.offload == "block" and self.blocks.get(role):
                apply_block_offload(module, self.blocks[role], plan.device, self.display, role)
            elif plan.offload in ("model", "block"):
                # model offload, or a component without declared blocks under block offload: moved whole.
                module.to("cpu")
                self._hook_activation(entry, plan.device)
            entry.placement = want
        self._register()
        return plan

    def _clear(self, entry: Entry) -> None:
        for hook in entry.hooks:
            hook.remove()
        entry.hooks.clear()
        with _active_lock:
            for slot, e in list(_active.items()):
                if e is entry:
                    del _active[slot]
        if has_block_offload(entry.value):
            remove_block_offload(entry.value)

    @staticmethod
    def _hook_activation(entry: Entry, device: torch.device) -> None:
        """Model offload hooks on the component, its children and grandchildren.

        accelerate's hook type is used (not a bare torch pre-hook) because diffusers recognises it: its
        pipelines read ``execution_device`` from it to create latents on the right device, and its VAEs call
        it from ``encode``/``decode``, which do not go through ``forward``.
        """
        from accelerate.hooks import add_hook_to_module  # noqa: PLC0415

        module = entry.value
        # Two levels down: VLMs are often driven through a grandchild (``model.language_model``,
        # ``model.visual``) without the component's or its child's forward running.
        targets = [module] + [m for child in module.children() for m in (child, *child.children())]
        for target in targets:
            add_hook_to_module(target, _ActivateHook(entry, device))
            entry.hooks.append(_HookHandle(target))

    def _register(self) -> None:
        """Tell ComfyUI's memory manager about our weights.

        Resident weights are handed over for real (ComfyUI moves them and may evict them). Hook-managed ones
        (model/block offload) get an empty stand-in, so "Unload models" and /free still reach us.
        """
        plan = self.plan
        mine = plan.offload == "none"
        if plan.offload == "model" and plan.device.type != "cpu":
            glue.make_room(max(e.nbytes for e in self.components.values()), plan.device)
        patchers = []
        for entry in self.components.values():
            if glue.in_comfyui() and (entry.patcher is None or entry.patcher_resident != mine):
                key = entry.key
                entry.patcher = glue.make_patcher(entry.value if mine else None, entry.nbytes if mine else 0,
                                                  lambda k=key: CACHE.evicted_by_comfyui(k))
                entry.patcher_resident = mine
            if entry.patcher is not None:
                patchers.append(entry.patcher)
            elif plan.offload == "none":
                entry.value.to(plan.device)
        glue.load_patchers(patchers)

    def release(self) -> None:
        """After an error or Cancel: no weights stranded on the device by model offload."""
        if self.plan.offload in ("model", "block"):
            deactivate_all(self.plan.device)
            if self.mover and self.plan.device.type != "cpu":
                for entry in self.components.values():
                    entry.value.to("cpu")

    @contextlib.contextmanager
    def running(self) -> Iterator[Plan]:
        """Apply the plan for one run (Cancel checked before every block); release the device after an error or
        Cancel."""
        plan = self.apply()
        try:
            with cancel_points(entry.value for entry in self.components.values()):
                yield plan
        except BaseException:
            self.release()
            raise

