"""Key planning for streaming loads: which checkpoint key fills which weight, checked before any read.

``key_mapper`` maps a checkpoint key to a module key (the caller's rename, then transformers' own checkpoint
conversion for its old and new layouts); ``check_plan`` refuses unknown keys, missing weights, two keys for
one weight and shape mismatches from the files' headers alone, as a ``ModelFolderError`` naming the component.
"""
from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from torch import nn

from ..errors import ModelFolderError, fmt

# How many keys an error message names before "...".
KEYS_SHOWN = 4

Rename = Callable[[str], "str | None"]


def file_shapes(headers: dict[Path, dict], label: Label) -> dict[str, tuple]:
    """Key -> shape over all files; a key in two files is a stale duplicate."""
    shapes: dict[str, tuple] = {}
    where: dict[str, Path] = {}
    for path, header in headers.items():
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if key in where:
                raise label.error("the same tensor is in two files", f"{key} in {where[key].name} and {path.name}",
                                  "each tensor in one file", "Remove the stale duplicate file from the folder")
            where[key], shapes[key] = path, tuple(info["shape"])
    return shapes


class Label:
    """Who is loading what, for error messages."""

    def __init__(self, display: str, component: str) -> None:
        self.display, self.component = display, component

    def error(self, problem: str, got: object, expected: object, todo: str) -> ModelFolderError:
        return ModelFolderError(fmt(self.display, self.component, problem, got, expected, todo))


def few(keys: Iterable[str]) -> str:
    """A few of ``keys`` for an error message, sorted, with the count when some are left out."""
    keys = sorted(keys)
    shown = ", ".join(keys[:KEYS_SHOWN]) + (f", ... ({len(keys)} in all)" if len(keys) > KEYS_SHOWN else "")
    return shown or "none"


def key_mapper(module: nn.Module, rename: Rename | None, slots: dict[str, Any], label: Label) -> Rename:
    """checkpoint key -> module key (or None: not this component's), user rename first, then transformers'."""
    convert = _transformers_rename(module, slots, label)

    def mapper(key: str) -> str | None:
        name = rename(key) if rename is not None else key
        if name is None or convert is None:
            return name
        return convert(name)

    return mapper


def _transformers_rename(module: nn.Module, slots: dict[str, Any], label: Label) -> Rename | None:
    """transformers' own checkpoint conversion (old and new layouts), without its loading machinery."""
    if "transformers" not in sys.modules:
        return None  # not imported, so the module cannot be a transformers model (and importing it costs RAM)
    from transformers import PreTrainedModel  # noqa: PLC0415

    if not isinstance(module, PreTrainedModel):
        return None
    from transformers.conversion_mapping import get_model_conversion_mapping  # noqa: PLC0415
    from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key  # noqa: PLC0415

    mapping = get_model_conversion_mapping(module)
    module._streaming_conversions = mapping
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    prefix = module.base_model_prefix

    def convert(key: str) -> str:
        name, pattern = rename_source_key(key, renamings, converters, prefix, slots)
        if name not in slots and key in slots:
            # As transformers does: the key was already right; at most the base-model prefix changes.
            name, pattern = rename_source_key(key, [], [], prefix, slots)
        if pattern is not None:
            # A converter merges or splits several checkpoint tensors: that needs them all at once.
            raise label.error("this key layout needs transformers' fused conversion, which streaming does not do",
                              f"{key} matching {pattern}", "keys that map one to one onto the model",
                              "Re-save the model with save_pretrained in the current transformers layout")
        return name

    return convert


def check_plan(module: nn.Module, plan: dict[str, str | None], shapes: dict[str, tuple], slots: dict[str, Any],
                label: Label, origin: str) -> None:
    """Unknown keys, missing weights, two keys for one weight and shape mismatches, before any read."""
    targets = [t for t in plan.values() if t is not None]
    unexpected = {t for t in targets if t not in slots}
    missing = set(slots) - set(targets)
    unexpected, missing = _ignorable(module, unexpected, missing)
    # A tied weight is filled through its partner: missing only when no name of its group is read.
    groups = alias_groups(slots)
    missing = {k for k in missing if not any(a in targets for a in groups.get(k, (k,)))}
    missing -= _tied_targets(module, set(targets))
    if unexpected:
        names = [k for k, t in plan.items() if t in unexpected]
        raise label.error(f"{len(unexpected)} tensors do not belong to this model", few(names),
                          f"only the {type(module).__name__} weights", "Check that the folder holds this component "
                          "(not another model's files) or re-download it")
    if missing:
        raise label.error(f"{len(missing)} weights missing", f"no {few(missing)} in {origin}",
                          f"all {len(slots)} weights of {type(module).__name__}",
                          "Re-download the component's files (a shard may be missing or from another model)")
    seen: dict[str, str] = {}
    for key, target in plan.items():
        if target is None:
            continue
        if target in seen:
            raise label.error("two tensors fill the same weight", f"{seen[target]} and {key} -> {target}",
                              "one tensor per weight", "Remove the stale duplicate file from the folder")
        seen[target] = key
        want = tuple(slots[target].shape)
        if shapes[key] != want:
            raise label.error(f"weight {target} has the wrong shape", list(shapes[key]), list(want),
                              "The files belong to another model size: use the matching config.json and weights")


def _ignorable(module: nn.Module, unexpected: set[str], missing: set[str]) -> tuple[set[str], set[str]]:
    """Drop the keys the library itself declares ignorable on load."""
    adjust = getattr(module, "_adjust_missing_and_unexpected_keys", None)
    if adjust is not None:  # transformers: its patterns incl. old per-layer rotary inv_freq / position_ids
        info = SimpleNamespace(missing_keys=set(missing), unexpected_keys=set(unexpected))
        adjust(info)
        return info.unexpected_keys, info.missing_keys
    for attr, keys in (("_keys_to_ignore_on_load_unexpected", unexpected),
                       ("_keys_to_ignore_on_load_missing", missing)):
        patterns = getattr(module, attr, None) or ()
        keys -= {k for k in keys if any(re.search(p, k) for p in patterns)}
    return unexpected, missing


def alias_groups(slots: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """Names that share one tensor object in the skeleton (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for name, tensor in slots.items():
        by_id.setdefault(id(tensor), []).append(name)
    return {name: tuple(names) for names in by_id.values() if len(names) > 1 for name in names}


def _tied_targets(module: nn.Module, present: set[str]) -> set[str]:
    """transformers' tied keys whose partner is read (ties made by tie_weights, not yet in the skeleton)."""
    tied = getattr(module, "all_tied_weights_keys", None) or {}
    return {a for a, b in tied.items() if b in present} | {b for a, b in tied.items() if a in present}
