"""What weight files say without loading them: per component, parameter counts, on-disk dtypes, bytes,
the share FP8 storage would cast and the repeated blocks (``Component``), gathered into a ``ModelReport``.

Everything comes from safetensors headers and torch checkpoints read with ``weights_only`` (a zip archive
is memory-mapped, its tensor data never read) plus config files. loaders/inspect.py decides what a folder
is and builds the report; loaders/estimates.py turns a report into memory and work estimates.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import read_checkpoint, safetensors_header

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# Keys of repeated blocks: "<container>.<index>." (transformer_blocks.3., layers.12., blocks.0.)
BLOCK_KEY = re.compile(r"^(.*?(?:layers|blocks|transformer_blocks|single_transformer_blocks))\.(\d+)\.")

@dataclass
class Component:
    """One weighted component as its headers describe it."""

    role: str
    path: str
    params: int = 0
    disk_bytes: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)  # on-disk dtype -> parameter count
    largest_file: int = 0
    largest_tensor: int = 0  # bytes on disk of the biggest tensor (read whole before its dtype conversion)
    castable: int = 0  # parameters that rest in FP8 under FP8 storage
    blocks: int = 0
    block_params: int = 0  # parameters of the largest block
    block_total: int = 0  # parameters in all blocks
    hidden: int = 0  # width of its main model (tokens x hidden activations)
    layers: int = 0
    autoregressive: bool = False
    kv_width: int = 0  # K+V values per token per layer (KV cache)


@dataclass
class ModelReport:
    backend: str  # backend id, or "" when unknown
    display: str
    variant: str
    path: str
    components: list[Component] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(c.params for c in self.components)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def safetensors_files(folder: Path) -> list[Path]:
    if folder.is_file():
        return [folder] if folder.suffix == ".safetensors" else []
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:
        names = sorted(set(json.loads(index[0].read_text()).get("weight_map", {}).values()))
        return [folder / n for n in names if (folder / n).is_file()]
    return sorted(folder.glob("*.safetensors"))


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


def _pickle_shapes(path: Path, display: str) -> dict[str, dict]:
    """{key: {"shape", "dtype"}} of a torch.save checkpoint, read with weights_only (a zip archive is mapped,
    its tensor data never read); nested dicts such as {"state_dict": ...} are flattened."""
    state = read_checkpoint(path, display)
    out: dict[str, dict] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, torch.Tensor):
            name = str(value.dtype).replace("torch.", "")
            out[prefix] = {"shape": list(value.shape), "dtype": SAFETENSORS_DTYPES.get(name, name.upper())}
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)

    walk("", state)
    return out


SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3",
                      "float8_e5m2": "F8_E5M2", "int64": "I64", "int32": "I32", "uint8": "U8", "bool": "BOOL"}


def weight_files(folder: Path) -> list[Path]:
    """safetensors files, else torch pickle checkpoints (a folder with both: the safetensors)."""
    files = safetensors_files(folder)
    if files:
        return files
    if folder.is_file():
        return [folder] if folder.suffix in PICKLE_SUFFIXES else []
    return sorted(f for f in folder.iterdir() if f.suffix in PICKLE_SUFFIXES)


def read_component(role: str, folder: Path, skip: tuple[str, ...], display: str) -> Component:
    """Parameter counts, dtypes, bytes, FP8-castable share and blocks from the headers of ``folder``."""
    comp = Component(role, str(folder))
    blocks: dict[tuple[str, str], int] = {}
    modules: dict[str, list[tuple[str, int]]] = {}  # module path -> [(param name, numel)]
    for f in weight_files(folder):
        comp.largest_file = max(comp.largest_file, f.stat().st_size)
        comp.disk_bytes += f.stat().st_size
        header = safetensors_header(f, display) if f.suffix == ".safetensors" else _pickle_shapes(f, display)
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            n = _numel(meta["shape"])
            comp.largest_tensor = max(comp.largest_tensor, n * DTYPE_BYTES.get(meta["dtype"], 4))
            comp.params += n
            comp.dtypes[meta["dtype"]] = comp.dtypes.get(meta["dtype"], 0) + n
            module, name = key.rsplit(".", 1) if "." in key else ("", key)
            modules.setdefault(module, []).append((name if len(meta["shape"]) < 2 else "weight>=2d", n))
            m = BLOCK_KEY.match(key)
            if m:
                blocks[(m.group(1), m.group(2))] = blocks.get((m.group(1), m.group(2)), 0) + n
    for module, params in modules.items():
        # Layerwise casting stores whole layers with a matrix / kernel weight (Linear, Conv) in FP8, bias
        # included, unless a skip pattern names the layer; norms (1-D weights) never qualify.
        if any(p == "weight>=2d" for p, _ in params) and not any(re.search(pat, module) for pat in skip):
            comp.castable += sum(n for _, n in params)
    comp.blocks = len(blocks)
    comp.block_params = max(blocks.values(), default=0)
    comp.block_total = sum(blocks.values())
    return comp


def dims_from_config(comp: Component, config_path: Path, autoregressive: bool) -> None:
    if not config_path.is_file():
        return
    cfg = json.loads(config_path.read_text(encoding="utf-8"))
    text = cfg.get("text_config") or cfg
    comp.hidden = int(text.get("hidden_size") or cfg.get("num_attention_heads", 0) * cfg.get("attention_head_dim", 0)
                      or 0)
    comp.layers = int(text.get("num_hidden_layers") or cfg.get("num_layers") or 0)
    comp.autoregressive = autoregressive
    heads = int(text.get("num_attention_heads") or 0)
    kv = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or (comp.hidden // heads if heads else 0))
    comp.kv_width = 2 * kv * head_dim
