"""Reading and checking DeepGen's released weights (both distribution forms).

- Checkpoint form: one flat state dict (``model.pt`` or a ``.safetensors`` of it) with the official
  keys: ``connector.*``, ``projector_{1,2,3}.*``, ``meta_queries`` (the bridge), ``transformer.*`` (the
  trained DiT, diffusers key names), and only when LoRA was saved, ``lmm.*lora*``.
- Diffusers form (``deepgenteam/DeepGen-1.0-diffusers``): ``transformer/`` (the trained DiT, diffusers
  names), ``vae/``, ``scheduler/``, ``connector/model.safetensors`` (the bridge tensors under the official
  names, float32, no LoRA: 103 tensors / 432,449,532 values = exactly meta_queries + projectors + six
  connector layers), ``vlm/`` (DeepGen's Qwen2.5-VL-3B, its LoRA merged, two shards + index),
  ``model_index.json`` and ``deepgen_pipeline.py`` (remote code, never run).

Sizes (queries, connector width/depth/MLP, LoRA rank) are read from tensor shapes, never from names.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from .bridge import BRIDGE_PREFIXES, QUERIES_KEY, BridgeConfig
from .convert import ConversionRefused, load_pickle, unwrap

TRANSFORMER_PREFIX = "transformer."
LMM_PREFIX = "lmm."
# Parts of the training wrapper that are never needed for inference (the official state_dict() drops them).
IGNORED_PREFIXES = ("ema.", "vae.")
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
SAFETENSORS_SUFFIX = ".safetensors"
HEADER_LIMIT = 100 * 1024 * 1024
CONNECTOR_FOLDER = "connector"  # diffusers form: connector/model.safetensors
CONNECTOR_FILE = "model.safetensors"
CONNECTOR_CONFIG = "config.json"  # optional: {"num_attention_heads": ..., "hidden_size": ..., ...}
# LoRA key names by transformers version of the training code -> this transformers' module names.
LORA_RENAMES = (("model.layers.", "model.language_model.layers."),
                ("model.embed_tokens.", "model.language_model.embed_tokens."), ("visual.", "model.visual."))


@dataclass
class Parts:
    """A checkpoint split by destination."""

    bridge: dict[str, torch.Tensor] = field(default_factory=dict)
    transformer: dict[str, torch.Tensor] = field(default_factory=dict)
    lora: dict[str, torch.Tensor] = field(default_factory=dict)  # VLM module names (no ``lmm.``)
    unknown: list[str] = field(default_factory=list)


def is_bridge_key(key: str) -> bool:
    return key == QUERIES_KEY or key.startswith(BRIDGE_PREFIXES)


def is_lora_key(key: str) -> bool:
    return key.startswith(LMM_PREFIX) and "lora_" in key


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header (reads only the header)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > HEADER_LIMIT:
            raise ValueError(f"{path.name}: implausible safetensors header of {n} bytes")
        header = json.loads(f.read(n))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint file (pickles only through ``torch.load(weights_only=True)``)."""
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import load_file  # noqa: PLC0415

        return unwrap(load_file(str(path)))
    return unwrap(load_pickle(path))


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes of a checkpoint's tensors; cheap for safetensors and for zip pickles (memory-mapped)."""
    if path.suffix == SAFETENSORS_SUFFIX:
        return safetensors_shapes(path)
    return {k: tuple(v.shape) for k, v in read_state(path).items()}


def split(state: Mapping[str, torch.Tensor]) -> Parts:
    parts = Parts()
    for key, value in state.items():
        if is_bridge_key(key):
            parts.bridge[key] = value
        elif key.startswith(TRANSFORMER_PREFIX):
            parts.transformer[key[len(TRANSFORMER_PREFIX):]] = value
        elif is_lora_key(key):
            parts.lora[lora_module_key(key)] = value
        elif not key.startswith(IGNORED_PREFIXES):
            parts.unknown.append(key)
    return parts


def lora_module_key(key: str) -> str:
    """``lmm.<old or new transformers name>`` -> this transformers' Qwen2.5-VL parameter name."""
    name = key[len(LMM_PREFIX):]
    if name.startswith("model.language_model.") or name.startswith("model.visual."):
        return name
    for old, new in LORA_RENAMES:
        if name.startswith(old):
            return new + name[len(old):]
    return name


def bridge_config(shapes: Mapping[str, Sequence[int]], connector: Mapping | None = None) -> BridgeConfig:
    """Bridge sizes from the shapes of its tensors (raises KeyError naming a missing one) and the connector
    config (the head count; ConnectorHeadsUnknown without one for sizes other than the released ones)."""
    return BridgeConfig.from_shapes({k: tuple(v) for k, v in shapes.items() if is_bridge_key(k)}, connector)


def connector_config_file(path: Path) -> Path:
    """Where the connector config of a checkpoint file or a diffusers-form folder is: ``connector/config.json``
    beside it (the diffusers form's connector folder, or one next to ``model.pt``)."""
    return (path if path.is_dir() else path.parent) / CONNECTOR_FOLDER / CONNECTOR_CONFIG


def lora_rank(shapes: Mapping[str, Sequence[int]]) -> int:
    """Rank of the saved LoRA (0 when there is none): rows of any ``lora_A`` weight."""
    for key, shape in shapes.items():
        if is_lora_key(key) and ".lora_A." in key:
            return int(shape[0])
        if is_lora_key(key) and "lora_embedding_A" in key:
            return int(shape[0])
    return 0


def lora_targets(keys: Iterable[str]) -> list[str]:
    """Module names (this transformers' naming) that carry LoRA weights."""
    out = set()
    for key in keys:
        name = lora_module_key(key) if key.startswith(LMM_PREFIX) else key
        for marker in (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B"):
            if marker in name:
                out.add(name.split(marker)[0])
    return sorted(out)


def key_report(expected: Iterable[str], found: Iterable[str], limit: int = 4) -> tuple[list[str], list[str]]:
    """(missing, unexpected) keys, sorted, at most ``limit`` of each."""
    expected, found = set(expected), set(found)
    return sorted(expected - found)[:limit], sorted(found - expected)[:limit]


def bridge_files(folder: Path) -> list[Path]:
    """Safetensors in a diffusers-form folder's ``connector/`` that hold bridge tensors (found by their keys;
    the released file is ``connector/model.safetensors``)."""
    out = []
    for path in sorted((folder / CONNECTOR_FOLDER).glob("*" + SAFETENSORS_SUFFIX)):
        try:
            shapes = safetensors_shapes(path)
        except (OSError, ValueError):
            continue  # unreadable: not a bridge file; the loader says what it expected
        if any(is_bridge_key(k) for k in shapes):
            out.append(path)
    return out


__all__ = ["ConversionRefused", "Parts", "bridge_config", "bridge_files", "connector_config_file",
           "is_bridge_key", "is_lora_key",
           "key_report", "lora_module_key", "lora_rank", "lora_targets", "read_shapes", "read_state",
           "safetensors_shapes", "split", "CONNECTOR_FILE", "CONNECTOR_FOLDER", "PICKLE_SUFFIXES",
           "SAFETENSORS_SUFFIX", "TRANSFORMER_PREFIX"]
