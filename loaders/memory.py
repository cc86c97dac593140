"""Memory plan: weight storage dtype, compute dtype, offload mode and VRAM budget.

FP8 storage and block offload are diffusers' hooks (``apply_layerwise_casting``,
``apply_group_offloading``), which work on any ``nn.Module`` (DESIGN.md §6).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import InputError, fmt

log = logging.getLogger(__name__)

WEIGHT_DTYPES = ("auto", "bf16", "fp16", "fp32", "fp8_e4m3fn", "fp8_e5m2")
COMPUTE_DTYPES = ("auto", "bf16", "fp16", "fp32")
OFFLOAD_MODES = ("none", "model", "block")
DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "fp8_e4m3fn": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
}
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
# Precision rank: a cached copy can be converted in place only to a strictly lower rank
# (or kept); anything else needs a fresh read from disk.
_RANK = {torch.float32: 3, torch.bfloat16: 2, torch.float16: 2, torch.float8_e4m3fn: 1, torch.float8_e5m2: 1}
# Layers kept out of FP8 (norms, embeddings, in/out projections): they are small and sensitive.
FP8_SKIP_PATTERNS = ("pos_embed", "patch_embed", "norm", "embed", "^proj_in$", "^proj_out$", "lm_head")
GROUP_OFFLOAD_HOOKS = ("group_offloading", "layer_execution_tracker", "lazy_prefetch_group_offloading")
BLOCKS_PER_GROUP = 1
GIB = 1024**3


@dataclass(frozen=True)
class MemoryOptions:
    """What the GentorMemoryOptions node outputs (the GENTOR_MEMORY socket)."""

    weight_dtype: str = "auto"
    compute_dtype: str = "auto"
    offload: str = "none"
    vram_budget_gb: float = 0.0

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("weight_dtype", self.weight_dtype, WEIGHT_DTYPES),
            ("compute_dtype", self.compute_dtype, COMPUTE_DTYPES),
            ("offload", self.offload, OFFLOAD_MODES),
        ):
            if value not in allowed:
                raise InputError(fmt("Gentor Memory Options", name, "unknown value", repr(value),
                                     " / ".join(allowed), "Pick one of the listed values"))
        if self.vram_budget_gb < 0:
            raise InputError(fmt("Gentor Memory Options", "vram_budget_gb", "negative budget",
                                 self.vram_budget_gb, ">= 0 (0 = no limit)", "Set 0 or a positive size in GB"))


@dataclass(frozen=True)
class Precision:
    """How a cached module's weights are held: ``storage`` for the hooked layers, ``base`` elsewhere."""

    storage: torch.dtype
    base: torch.dtype

    @property
    def cast(self) -> bool:
        """Layers are stored in one dtype and up-cast per forward (diffusers' layerwise casting)."""
        return self.storage != self.base


@dataclass(frozen=True)
class Plan:
    """MemoryOptions resolved for one device."""

    precision: Precision
    offload: str
    device: torch.device
    budget_bytes: int
    notes: tuple[str, ...] = ()

    @property
    def compute(self) -> torch.dtype:
        return self.precision.base


def resolve(options: MemoryOptions | None, device: torch.device) -> Plan:
    """Turn the user's options into concrete dtypes and an offload mode for ``device``."""
    options = options or MemoryOptions()
    notes: list[str] = []
    on_gpu = device.type == "cuda"
    default = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else (
        torch.float16 if on_gpu else torch.float32)
    storage = default if options.weight_dtype == "auto" else DTYPES[options.weight_dtype]
    if options.compute_dtype != "auto":
        compute = DTYPES[options.compute_dtype]
    else:
        compute = default if storage in FP8 else storage
    offload = options.offload
    if offload != "none" and device.type == "cpu":
        notes.append(f"offload '{offload}' has no effect on a CPU (no second device); hooks still run")
    return Plan(Precision(storage, compute), offload, device, int(options.vram_budget_gb * GIB), tuple(notes))


def _name(dtype: torch.dtype) -> str:
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype))


def can_convert(current: Precision, target: Precision) -> bool:
    """True when ``target`` is reachable from ``current`` without losing what was read from disk."""
    def ok(a: torch.dtype, b: torch.dtype) -> bool:
        return a == b or _RANK[b] < _RANK[a]

    # Casting hooks cannot be taken off again, and a stored dtype cannot be swapped sideways.
    if current.cast and (not target.cast or current.storage != target.storage):
        return False
    return ok(current.storage, target.storage) and ok(current.base, target.base)


def convert(module: torch.nn.Module, current: Precision, target: Precision, skip: tuple[str, ...]) -> None:
    """Convert a module in place from ``current`` to ``target`` (``can_convert`` must hold)."""
    from diffusers.hooks import apply_layerwise_casting  # noqa: PLC0415

    if current == target:
        return
    if target.cast and current.cast:
        # Same storage, lower compute dtype: retarget the hooks, cast the skipped layers.
        for sub in module.modules():
            hook = _casting_hook(sub)
            if hook is not None:
                hook.compute_dtype = target.base
            else:
                _cast_own_floats(sub, target.base)
        return
    if current.base != target.base:
        module.to(target.base)
    if target.cast:
        apply_layerwise_casting(module, storage_dtype=target.storage, compute_dtype=target.base,
                                skip_modules_pattern=skip)


def _casting_hook(module: torch.nn.Module):
    registry = getattr(module, "_diffusers_hook", None)
    return registry.get_hook("layerwise_casting") if registry is not None else None


def _cast_own_floats(module: torch.nn.Module, dtype: torch.dtype) -> None:
    for p in module.parameters(recurse=False):
        if p.is_floating_point() and p.dtype not in FP8:
            p.data = p.data.to(dtype)
    for name, b in module.named_buffers(recurse=False):
        if b.is_floating_point() and b.dtype not in FP8:
            setattr(module, name, b.to(dtype))


def stored_dtypes(module: torch.nn.Module) -> dict[torch.dtype, int]:
    """Bytes of parameters per dtype as they rest between runs (proof of FP8 storage)."""
    out: dict[torch.dtype, int] = {}
    for p in module.parameters():
        out[p.dtype] = out.get(p.dtype, 0) + p.numel() * p.element_size()
    return out


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


# ----------------------------------------------------------------------------- offload hooks
def has_block_offload(module: torch.nn.Module) -> bool:
    """True when group-offloading hooks sit on the module or any submodule."""
    return any(getattr(m, "_diffusers_hook", None) is not None and
               m._diffusers_hook.get_hook("group_offloading") is not None for m in module.modules())


def apply_block_offload(module: torch.nn.Module, device: torch.device) -> None:
    """Weights rest on the CPU; each block is moved to ``device`` just before it runs."""
    from diffusers.hooks import apply_group_offloading  # noqa: PLC0415

    module.to("cpu")
    use_stream = device.type == "cuda"
    apply_group_offloading(module, onload_device=device, offload_device=torch.device("cpu"),
                           offload_type="block_level", num_blocks_per_group=BLOCKS_PER_GROUP,
                           use_stream=use_stream, non_blocking=use_stream)


def remove_block_offload(module: torch.nn.Module) -> None:
    """Undo apply_block_offload; the weights stay where they are (the CPU)."""
    from diffusers.hooks import HookRegistry  # noqa: PLC0415

    registry = HookRegistry.check_if_exists_or_initialize(module)
    for name in GROUP_OFFLOAD_HOOKS:
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()
