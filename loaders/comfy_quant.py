"""Layers that compute from a file's stored form: ComfyUI's scaled FP8 and GGUF blocks.

Scaled FP8 (ComfyUI's ``*_fp8_scaled`` / ``*_fp8mixed`` files): a linear layer's weight is stored in FP8 together
with one float32 scale; the real weight is ``fp8_weight * scale`` (``dequantize_scaled``, the one piece of
arithmetic written here). ``ScaledFP8Linear`` keeps both as stored and multiplies per forward, so the layer rests
at the file's size. GGUF: diffusers' ``GGUFParameter`` / ``GGUFLinear`` hold the quantised blocks and dequantise
them per forward (diffusers' own dequantisers); ``GGUFTensors`` reads them one tensor at a time with plain file
reads at the offsets the ``gguf`` package's reader found (each read buffer becomes the resting tensor itself),
so nothing stays mapped. Safetensors files go through the streaming loader's 64 MB read windows: measured, plain
reads into heap buffers that are then converted leave glibc heap holes that raise the peak (benchmarks/
bench_comfy_files_load.py: bf16 1.22x of resting + window with plain reads, 0.97x with the windows).
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from . import streaming
from .comfy_files import (NEW_INPUT_SCALE, NEW_QUANT, NEW_SCALE, OLD_INPUT_SCALE, OLD_SCALE, SCALED_MARKER,
                          INDEX_TIMESTEP_ZERO, FileHeader, WeightFormat)

# Keys of a Comfy file that are markers, not weights.
MARKER_SUFFIXES = (NEW_QUANT, OLD_INPUT_SCALE, NEW_INPUT_SCALE)
MARKER_KEYS = (SCALED_MARKER, INDEX_TIMESTEP_ZERO)


def dequantize_scaled(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """ComfyUI's scaled FP8: the weight a layer computes with is the stored FP8 weight times its scale."""
    return weight.to(dtype) * scale.to(dtype)


class ScaledFP8Linear(nn.Linear):
    """``nn.Linear`` whose weight rests in FP8 with a per-tensor ``weight_scale`` (ComfyUI's scaled FP8)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scale_shape: tuple[int, ...] = ()) -> None:
        super().__init__(in_features, out_features, bias, device="meta")
        self.register_buffer("weight_scale", torch.empty(scale_shape, dtype=torch.float32, device="meta"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = dequantize_scaled(self.weight, self.weight_scale, x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return nn.functional.linear(x, weight, bias)


def comfy_rename(prefix: str):
    """Checkpoint key -> module key for Comfy files: the common prefix off, markers left out, old scale names
    (``scale_weight``) under the new one (``weight_scale``)."""
    def rename(key: str) -> str | None:
        name = key[len(prefix):] if prefix and key.startswith(prefix) else key
        if name in MARKER_KEYS or name.endswith(MARKER_SUFFIXES):
            return None
        if name.endswith(OLD_SCALE):
            return name[: -len(OLD_SCALE)] + NEW_SCALE
        return name
    return rename


def _swap(module: nn.Module, path: str, make) -> bool:
    parent_name, _, leaf = path.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    old = getattr(parent, leaf)
    if not isinstance(old, nn.Linear):
        return False  # only linear layers compute from a stored form; other tensors are converted as usual
    new = make(old)
    new.weight = nn.Parameter(torch.empty(old.weight.shape, device="meta"), requires_grad=False)
    setattr(new.weight, streaming.STORED_FORM, True)
    setattr(parent, leaf, new)
    return True


def stored_form_preparer(header: FileHeader, fmt_: WeightFormat, compute: torch.dtype):
    """``prepare`` for streaming.load_module: swap the file's stored-form linear layers in the meta skeleton."""
    def prepare(module: nn.Module, mapper) -> None:
        if fmt_.gguf:
            from diffusers.quantizers.gguf.utils import GGUFLinear  # noqa: PLC0415 - needs the gguf package
        for layer in sorted(fmt_.stored):
            key = f"{header.prefix}{layer}.weight"
            target = mapper(key)
            if target is None or not target.endswith(".weight"):
                continue
            path = target[: -len(".weight")]
            if fmt_.gguf:
                def make(old, _c=compute, _cls=GGUFLinear):
                    with torch.device("meta"):
                        return _cls(old.in_features, old.out_features, old.bias is not None, compute_dtype=_c)
            else:
                scale = header.shapes.get(f"{layer}{NEW_SCALE}", header.shapes.get(f"{layer}{OLD_SCALE}", ()))

                def make(old, _s=tuple(scale)):
                    return ScaledFP8Linear(old.in_features, old.out_features, old.bias is not None, _s)
            if _swap(module, path, make) and fmt_.scaled:
                # The scale rests in float32 as stored (never cast to the compute dtype with the other tensors).
                buf = module.get_submodule(path).weight_scale
                setattr(buf, streaming.STORED_FORM, True)
    return prepare


def _read(f, offset: int, nbytes: int, where: str) -> torch.Tensor:
    """``nbytes`` at ``offset`` into a fresh CPU buffer (a plain read: nothing is mapped)."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    f.seek(offset)
    if nbytes and f.readinto(buf.numpy()) != nbytes:
        raise OSError(f"{where}: short read (the file is truncated)")
    return buf


class GGUFTensors(streaming.TensorSource):
    """A GGUF file's tensors for streaming.load_module, read one at a time (no mapping stays open)."""

    def __init__(self, header: FileHeader) -> None:
        self.header = header
        self.origin = str(header.path)
        self.shapes = {header.prefix + k: v for k, v in header.shapes.items()}

    def tensors(self, plan: dict[str, str | None]) -> Iterator[tuple[str, torch.Tensor]]:
        from diffusers.quantizers.gguf.utils import GGUFParameter  # noqa: PLC0415

        gguf = __import__("gguf")
        plain = {int(gguf.GGMLQuantizationType.F32): torch.float32, int(gguf.GGMLQuantizationType.F16): torch.float16,
                 int(gguf.GGMLQuantizationType.BF16): torch.bfloat16}
        items = sorted(self.header.raw.items(), key=lambda kv: kv[1][1])
        with Path(self.header.path).open("rb") as f:
            for key, (qtype, offset, nbytes, byte_shape) in items:
                if plan.get(key) is None:
                    continue
                buf = _read(f, offset, nbytes, f"{self.header.path.name} {key}")
                if qtype in plain:
                    yield key, buf.view(plain[qtype]).reshape(self.shapes[key])
                else:
                    # diffusers' layout of a quantised tensor: rows of raw blocks (bytes per row, last axis).
                    rows = byte_shape[:-1] if len(byte_shape) > 1 else ()
                    yield key, GGUFParameter(buf.reshape(*rows, -1), quant_type=qtype)


