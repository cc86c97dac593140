"""Memory plan: weight storage dtype, compute dtype, offload mode and VRAM budget.

FP8 storage and block offload are diffusers' hooks (``apply_layerwise_casting``,
``apply_group_offloading``), which work on any ``nn.Module`` (DESIGN.md §6).
"""
from __future__ import annotations

import functools
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
GIB = 1024**3
LAYERWISE_HOOK = "layerwise_casting"  # diffusers' registry name of its casting hook


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
    if on_gpu and torch.bfloat16 in (storage, compute) and not torch.cuda.is_bf16_supported():
        # Pre-Ampere GPUs have no bf16 math: fp16 has the same size and is computed natively.
        notes.append("this GPU cannot compute in bf16: using fp16 instead")
        storage = torch.float16 if storage == torch.bfloat16 else storage
        compute = torch.float16
    offload = options.offload
    if offload != "none" and device.type == "cpu":
        notes.append(f"offload '{offload}' has no effect on a CPU (no second device); hooks still run")
    return Plan(Precision(storage, compute), offload, device, int(options.vram_budget_gb * GIB), tuple(notes))


def _name(dtype: torch.dtype) -> str:
    return next((k for k, v in DTYPES.items() if v == dtype), str(dtype))


def is_wider(have: Precision, want: Precision) -> bool:
    """True when ``want`` can be derived from a copy held in ``have`` without losing what was read.

    A copy stored in FP8 derives only copies with the same FP8 storage (its skipped layers may narrow);
    bf16 and fp16 are different, not wider or narrower.
    """
    def ok(a: torch.dtype, b: torch.dtype) -> bool:
        return a == b or _RANK[b] < _RANK[a]

    if have == want:
        return False
    if have.cast and (not want.cast or have.storage != want.storage):
        return False
    return ok(have.storage, want.storage) and ok(have.base, want.base)


def apply_storage(module: torch.nn.Module, precision: Precision, skip: tuple[str, ...]) -> None:
    """Cast a freshly built module to ``precision``: FP8 storage through diffusers' layerwise casting."""
    module.to(precision.base)
    if precision.cast:
        apply_layerwise_storage(module, precision, skip)


@functools.lru_cache(maxsize=1)
def _restoring_hook_type() -> type:
    from diffusers.hooks.layerwise_casting import LayerwiseCastingHook  # noqa: PLC0415

    class RestoringCastHook(LayerwiseCastingHook):
        """diffusers' layerwise casting, except after the forward: the stored tensors are put back instead of
        casting the compute copies down again. Up-casting FP8 is exact, so the down-cast would only rebuild
        what was there; skipping it saves one pass over the layer's weights per forward (measured: the
        bf16 -> FP8 rounding is ~1/6 of the up-cast's time on a CPU, per layer and forward)."""

        _stored: tuple | list[tuple[torch.Tensor, torch.Tensor]] = ()  # (tensor, its stored data) in a forward

        def pre_forward(self, module: torch.nn.Module, *args, **kwargs):
            if self._stored:  # the last forward raised (Cancel, OOM) before post_forward: put its tensors back
                self._restore()
            self._stored = [(t, t.data) for t in (*module.parameters(), *module.buffers())
                            if t.dtype == self.storage_dtype]
            return super().pre_forward(module, *args, **kwargs)

        def post_forward(self, module: torch.nn.Module, output):
            self._restore()
            return output

        def _restore(self) -> None:
            for tensor, stored in self._stored:
                tensor.data = stored
            self._stored = []

    return RestoringCastHook


def apply_layerwise_storage(module: torch.nn.Module, precision: Precision, patterns: tuple[str, ...]) -> None:
    """diffusers' ``apply_layerwise_casting`` (storage dtype at rest, compute dtype per forward, ``patterns``
    skipped), with hooks that restore the stored tensors after each forward instead of re-casting them."""
    from diffusers.hooks import apply_layerwise_casting  # noqa: PLC0415
    from diffusers.hooks.layerwise_casting import LayerwiseCastingHook  # noqa: PLC0415

    apply_layerwise_casting(module, storage_dtype=precision.storage, compute_dtype=precision.base,
                            skip_modules_pattern=patterns)
    restoring = _restoring_hook_type()
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = registry.get_hook(LAYERWISE_HOOK) if registry is not None else None
        if type(hook) is LayerwiseCastingHook:
            # Removing diffusers' hook is unsupported (it would have to undo the storage cast), so the registered
            # object takes the subclass's behaviour in place, and the registry's forward wrapper (``fn_ref``, which
            # holds the bound methods taken at registration) calls the new ones.
            hook.__class__ = restoring
            hook.fn_ref.pre_forward, hook.fn_ref.post_forward = hook.pre_forward, hook.post_forward


def stored_dtypes(module: torch.nn.Module) -> dict[torch.dtype, int]:
    """Bytes of parameters per dtype as they rest between runs (proof of FP8 storage)."""
    out: dict[torch.dtype, int] = {}
    for p in module.parameters():
        out[p.dtype] = out.get(p.dtype, 0) + p.numel() * p.element_size()
    return out


def module_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())
