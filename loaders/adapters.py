"""Adapters (LoRA) on cached modules, switched per call through PEFT's own layer API.

Adapters are injected by PEFT (diffusers' ``load_lora_adapter``, transformers' ``load_adapter`` or
``peft.inject_adapter_in_model``) under a name; the base weights stay untouched, so switching an adapter off
gives the base model back exactly, with nothing re-read from disk. This module only switches them: which
adapters are active, at which strength, for any ``nn.Module`` that holds PEFT tuner layers.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import torch


@dataclass(frozen=True)
class Adapter:
    """An adapter a run wants: ``load(module, name)`` injects it once; ``identity`` changes with its files."""

    name: str
    identity: tuple
    load: Callable[[torch.nn.Module, str], None]
    weight: float = 1.0


# PEFT warns whenever an adapter is injected into a module that already holds one ("This will lead to having
# multiple adapters in the model"): several named adapters per module, switched per call, is this design.
SEVERAL_ADAPTERS_WARNING = r"Already found a `peft_config` attribute in the model"


@contextmanager
def adding_named_adapter() -> Iterator[None]:
    """Inject one more named adapter (diffusers' ``load_lora_adapter``, ``peft.inject_adapter_in_model``) without
    PEFT's warning about several adapters; every other warning still shows."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=SEVERAL_ADAPTERS_WARNING, category=UserWarning)
        yield


def _tuner_layers(module: torch.nn.Module):
    from peft.tuners.tuners_utils import BaseTunerLayer  # noqa: PLC0415

    return [m for m in module.modules() if isinstance(m, BaseTunerLayer)]


def activate(module: torch.nn.Module, wanted: list[tuple[str, float]]) -> None:
    """Exactly the named adapters on, each at its strength; everything else off."""
    layers = _tuner_layers(module)
    if not wanted:
        deactivate(module)
        return
    names = [n for n, _ in wanted]
    for layer in layers:
        present = [n for n in names if n in getattr(layer, "scaling", {})]
        layer.enable_adapters(bool(present))
        if present:
            layer.set_adapter(present)
            for name, weight in wanted:
                if name in present:
                    # LoraLayer.set_scale multiplies by lora_alpha / r itself.
                    layer.set_scale(name, weight)


def deactivate(module: torch.nn.Module) -> None:
    """All adapters off: the module computes its base weights again."""
    for layer in _tuner_layers(module):
        layer.enable_adapters(False)


def delete(module: torch.nn.Module, name: str) -> None:
    """Remove an adapter whose files changed (it is re-injected under the same name)."""
    for layer in _tuner_layers(module):
        if name in getattr(layer, "scaling", {}):
            layer.delete_adapter(name)


def active(module: torch.nn.Module) -> set[str]:
    """Names of the adapters currently switched on (for tests and inspection)."""
    out: set[str] = set()
    for layer in _tuner_layers(module):
        if not layer.disable_adapters:
            out.update(layer.active_adapters)
    return out


def has_lora_layers(module: Any) -> bool:
    """A cached wider copy that carries injected LoRA layers cannot be converted by key (its names gained
    ``base_layer`` / ``lora_``): read that narrower copy from the files instead."""
    return module is not None and any("lora_" in name for name, _ in module.named_parameters())
