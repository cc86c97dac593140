"""A Comfy file's tensors under the module's layout, read one at a time: a fused matrix split into the two layers
it holds, a causal convolution's time kernel of 1 dropped.

Comfy-Org's Qwen-Image 2.1 transformer stores each block's SwiGLU gate and up projections as one matrix
(``img_mlp.gate_up``, gate rows first); diffusers has two layers. ComfyUI's 2.1 VAE stores its causal
convolutions as 3-D kernels of time size 1; diffusers' image VAE holds the 2-D kernels. ``RemappedTensors``
presents the file as the module's keys and shapes (so the streaming loader checks everything from the header
before reading) and yields the pieces as views of each tensor read (the loader copies them into place).
Stored forms split with their weights: GGUF blocks by rows, a per-row scale by rows, a per-tensor scale copied.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator

import torch

from . import streaming
from .comfy_files import FileHeader, WeightFormat
from .comfy_quant import GGUFTensors
from .streaming_keys import Label

TIME_AXIS = 2  # (out, in, time, height, width)
Split = Callable[[str], "tuple[str, ...] | None"]


def _weight_key(key: str) -> str:
    layer, _, _ = key.rpartition(".")
    return f"{layer}.weight"


def _squeezable(shape: tuple[int, ...]) -> bool:
    return len(shape) == 5 and shape[TIME_AXIS] == 1


class RemappedTensors(streaming.TensorSource):
    """``header``'s tensors with ``split(key)`` (key without prefix -> the keys it becomes, or None) applied on
    dim 0 and, with ``squeeze_time``, 5-D kernels of time size 1 made 2-D; keys keep the file's prefix."""

    def __init__(self, header: FileHeader, split: Split | None = None, squeeze_time: bool = False,
                 display: str = "", component: str = "") -> None:
        self.header, self.origin, self.squeeze_time = header, str(header.path), squeeze_time
        self.label = Label(display, component)
        self.parts: dict[str, tuple[str, int | None, int]] = {}  # virtual key -> (file key, piece, pieces)
        self.shapes: dict[str, tuple] = {}
        for key, shape in header.shapes.items():
            full = header.prefix + key
            into = split(key) if split is not None else None
            if not into:
                self.parts[full] = (full, None, 1)
                self.shapes[full] = shape[:TIME_AXIS] + shape[TIME_AXIS + 1:] if squeeze_time and _squeezable(shape) \
                    else shape
                continue
            rows = header.shapes.get(_weight_key(key), shape)[0]
            by_rows = len(shape) > 0 and shape[0] == rows  # the weight itself, or a per-row scale
            for i, name in enumerate(into):
                self.parts[header.prefix + name] = (full, i if by_rows else None, len(into))
                self.shapes[header.prefix + name] = (shape[0] // len(into), *shape[1:]) if by_rows else shape

    def tensors(self, plan: dict[str, str | None]) -> Iterator[tuple[str, torch.Tensor]]:
        wanted: dict[str, list[tuple[str, int | None, int]]] = {}
        for virtual, (real, piece, pieces) in self.parts.items():
            if plan.get(virtual) is not None:
                wanted.setdefault(real, []).append((virtual, piece, pieces))
        real_plan = {real: real for real in wanted}
        if self.header.container == "gguf":
            reads = GGUFTensors(self.header).tensors(real_plan)
        else:
            reads = streaming.file_tensors({self.header.path: self.header.raw}, real_plan, self.label)
        for real, tensor in reads:
            for virtual, piece, pieces in wanted[real]:
                yield virtual, self._piece(tensor, piece, pieces)
            del tensor

    def _piece(self, tensor: torch.Tensor, piece: int | None, pieces: int) -> torch.Tensor:
        if piece is not None:
            quant = getattr(tensor, "quant_type", None)
            part = tensor.chunk(pieces, dim=0)[piece]
            if quant is not None:  # GGUF blocks: rows are independent, each keeps the quant type
                from diffusers.quantizers.gguf.utils import GGUFParameter  # noqa: PLC0415

                return GGUFParameter(part.as_subclass(torch.Tensor), quant_type=quant)
            return part
        if self.squeeze_time and tensor.ndim == 5 and tensor.shape[TIME_AXIS] == 1:
            return tensor.squeeze(TIME_AXIS)
        return tensor


def split_header(header: FileHeader, split: Split) -> FileHeader:
    """The header as the module sees it after ``split`` (for weight-format detection and stored-form layers)."""
    source = RemappedTensors(header, split)
    n = len(header.prefix)
    shapes = {k[n:]: v for k, v in source.shapes.items()}
    dtypes = {k[n:]: header.dtypes[real[n:]] for k, (real, _, _) in source.parts.items()}
    return dataclasses.replace(header, shapes=shapes, dtypes=dtypes)


def split_format(wfmt: WeightFormat, split: Split) -> WeightFormat:
    """``wfmt`` with each split layer's stored form given to the layers it becomes."""
    stored: set[str] = set()
    for layer in wfmt.stored:
        into = split(f"{layer}.weight")
        stored.update(name[: -len(".weight")] for name in into) if into else stored.add(layer)
    return dataclasses.replace(wfmt, stored=frozenset(stored))
