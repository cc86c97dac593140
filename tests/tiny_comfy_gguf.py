"""GGUF Qwen-Image transformers as city96's tools make them, written with the ``gguf`` package's own writer.

The published files (city96/Qwen-Image-gguf, QuantStack's Edit / Edit-2509, unsloth's Edit-2511) come from
city96/ComfyUI-GGUF's ``tools/convert.py`` (safetensors -> BF16 GGUF) and its patched ``llama-quantize``
(``tools/lcpp.patch``). Facts taken from those sources and reproduced here:

- ``general.architecture = "qwen_image"`` (loader.py IMG_ARCH_LIST), ``general.quantization_version = 2``,
  ``general.file_type`` = the llama.cpp file type (MOSTLY_Q8_0 = 7, Q4_0 = 2, Q4_K_M = 15, Q5_K_M = 17, Q6_K = 18);
- tensor names are the diffusers parameter names, ``model.diffusion_model.`` stripped (convert.py strip_prefix);
- 1-D tensors and tensors of <= 1024 values stay F32 (convert.py); everything else takes the file's type, except
  (lcpp.patch img_tensor_get_type) ``*.to_v.weight`` -> Q6_K in Q4_K_M / Q5_K_M files, and a K-quant tensor whose
  row length is not a multiple of 256 falls back to F16.

Q8_0 and Q4_0 use ``gguf.quants.quantize``. The installed ``gguf`` (0.19) has no K-quant quantisers (only their
dequantisers), so Q4_K / Q5_K / Q6_K blocks are encoded by the small functions below — the plain per-block
absmax / min-max choice (llama.cpp searches scales for a lower error; any valid block is a valid file). Their
byte layout is checked by decoding with ``gguf.quants.dequantize`` (tests/test_tiny_comfy.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

QK_K = 256
QUANTIZATION_THRESHOLD = 1024  # convert.py: tensors with at most this many values stay F32
GGUF_ARCH = "qwen_image"
# file type name -> (default tensor type, llama.cpp LlamaFileType value name)
FILE_TYPES = {
    "Q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "Q6_K": ("Q6_K", "MOSTLY_Q6_K"),
    "Q5_K_M": ("Q5_K", "MOSTLY_Q5_K_M"),
    "Q4_K_M": ("Q4_K", "MOSTLY_Q4_K_M"),
    "Q4_0": ("Q4_0", "MOSTLY_Q4_0"),
    "BF16": ("BF16", "MOSTLY_BF16"),
}


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(*x.shape[:-1], -1) if x.ndim > 1 else \
        x.astype(np.float16).view(np.uint8)


def _scales_mins(x: np.ndarray, levels: int) -> tuple[np.ndarray, ...]:
    """Per 32-value sub-block (scale, min) as 6-bit codes over fp16 super-scales d, dmin (ggml's Q4_K / Q5_K)."""
    sub = x.reshape(x.shape[0], 8, 32)
    lo = np.minimum(sub.min(axis=-1), 0.0)  # ggml keeps the min <= 0 and stores -min
    hi = sub.max(axis=-1)
    scale = (hi - lo) / levels
    d = (scale.max(axis=-1) / 63).astype(np.float16).astype(np.float32)
    dmin = ((-lo).max(axis=-1) / 63).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(np.divide(scale, d[:, None], out=np.zeros_like(scale), where=d[:, None] > 0)), 0, 63)
    mn = np.clip(np.round(np.divide(-lo, dmin[:, None], out=np.zeros_like(lo), where=dmin[:, None] > 0)), 0, 63)
    step = d[:, None] * sc
    q = np.divide(sub + (dmin[:, None] * mn)[..., None], step[..., None], out=np.zeros_like(sub),
                  where=step[..., None] > 0)
    q = np.clip(np.round(q), 0, levels).astype(np.uint8)
    return d, dmin, sc.astype(np.uint8), mn.astype(np.uint8), q


def _pack_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """The 12-byte 6-bit scale/min packing of Q4_K / Q5_K (inverse of gguf's Q4_K.get_scale_min)."""
    out = np.empty((sc.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    return out


def quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 144) Q4_K blocks: d, dmin, scales[12], 4-bit quants (two sub-blocks per 32 bytes)."""
    d, dmin, sc, mn, q = _scales_mins(blocks, 15)
    q = q.reshape(-1, 4, 2, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    return np.concatenate([_f16(d[:, None]), _f16(dmin[:, None]), _pack_scales(sc, mn), qs], axis=1)


def quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 176) Q5_K blocks: d, dmin, scales[12], high bits[32], low nibbles[128]."""
    d, dmin, sc, mn, q = _scales_mins(blocks, 31)
    low = (q & 0x0F).reshape(-1, 4, 2, 32)
    qs = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = ((q >> 4) & 1).reshape(-1, 8, 32)  # bit j of byte l = sub-block j, value l
    qh = np.zeros((q.shape[0], 32), dtype=np.uint8)
    for j in range(8):
        qh |= high[:, j] << j
    return np.concatenate([_f16(d[:, None]), _f16(dmin[:, None]), _pack_scales(sc, mn), qh, qs], axis=1)


def quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """(n, 256) float32 -> (n, 210) Q6_K blocks: low nibbles[128], high 2 bits[64], int8 scales[16], d."""
    sub = blocks.reshape(blocks.shape[0], 16, 16)
    scale = np.abs(sub).max(axis=-1) / 31
    d = (scale.max(axis=-1) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(np.divide(scale, d[:, None], out=np.zeros_like(scale), where=d[:, None] > 0)), 0, 127)
    step = d[:, None] * sc
    q = np.divide(sub, step[..., None], out=np.zeros_like(sub), where=step[..., None] > 0)
    q = (np.clip(np.round(q), -32, 31) + 32).astype(np.uint8).reshape(-1, 2, 128)  # two halves of 128
    ql = ((q[:, :, 0:64] & 0x0F) | ((q[:, :, 64:128] & 0x0F) << 4)).reshape(-1, 128)
    hi = (q >> 4).reshape(-1, 2, 4, 32)
    qh = (hi[:, :, 0] | (hi[:, :, 1] << 2) | (hi[:, :, 2] << 4) | (hi[:, :, 3] << 6)).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.astype(np.int8).view(np.uint8), _f16(d[:, None])], axis=1)


_K_QUANTISERS = {"Q4_K": quantize_q4_k, "Q5_K": quantize_q5_k, "Q6_K": quantize_q6_k}


def quantize(data: np.ndarray, qtype_name: str) -> tuple[np.ndarray, object]:
    """(bytes or values, GGMLQuantizationType) of ``data`` (rows of the last axis) in ``qtype_name``."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    data = np.ascontiguousarray(data, dtype=np.float32)
    if qtype_name in _K_QUANTISERS:
        if data.shape[-1] % QK_K:
            raise gguf.QuantError(f"row length {data.shape[-1]} is not a multiple of {QK_K}")
        blocks = _K_QUANTISERS[qtype_name](data.reshape(-1, QK_K))
        return blocks.reshape(*data.shape[:-1], -1), qtype
    return gguf.quants.quantize(data, qtype), qtype


def tensor_type(name: str, shape: tuple[int, ...], file_type: str) -> str:
    """The tensor type city96's convert.py + lcpp.patch give ``name`` in a ``file_type`` file."""
    n = int(np.prod(shape))
    if len(shape) <= 1 or n <= QUANTIZATION_THRESHOLD:
        return "F32"
    qtype = FILE_TYPES[file_type][0]
    if name.endswith(".to_v.weight") and file_type in ("Q4_K_M", "Q5_K_M"):
        qtype = "Q6_K"
    if qtype in _K_QUANTISERS and shape[-1] % QK_K:
        return "F16"
    return qtype


def write_gguf(state_dict: dict, path: Path | str, file_type: str, arch: str = GGUF_ARCH) -> Path:
    """Write ``state_dict`` (torch tensors, diffusers names) as a GGUF ``file_type`` file of ``arch``."""
    import gguf
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[file_type][1]])
    for name, t in state_dict.items():
        qtype_name = tensor_type(name, tuple(t.shape), file_type)
        values = t.to(torch.float32).numpy()
        if qtype_name in ("F32", "F16"):
            data = values.astype(np.float32 if qtype_name == "F32" else np.float16)
            writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[qtype_name])
            continue
        data, qtype = quantize(values, qtype_name)
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_transformer_gguf(folder: Path | str, path: Path | str, file_type: str = "Q8_0") -> Path:
    """The GGUF ``file_type`` transformer of a tiny Qwen-Image folder (tests/tiny_comfy.py)."""
    from tests.tiny_comfy import read_component

    if file_type not in FILE_TYPES:
        raise ValueError(f"unknown GGUF file type {file_type!r}; known: {', '.join(FILE_TYPES)}")
    return write_gguf(read_component(folder, "transformer"), path, file_type)


def write_other_arch_gguf(path: Path | str, file_type: str = "Q8_0") -> Path:
    """A tiny GGUF of another image architecture (``flux``, reference key names), as city96 publishes for FLUX."""
    import torch

    g = torch.Generator().manual_seed(3)
    shapes = {"img_in.weight": (256, 64), "img_in.bias": (256,), "time_in.in_layer.weight": (256, 256),
              "double_blocks.0.img_attn.qkv.weight": (768, 256), "double_blocks.0.img_attn.proj.weight": (256, 256),
              "single_blocks.0.linear1.weight": (1280, 256), "final_layer.linear.weight": (64, 256)}
    return write_gguf({k: torch.randn(s, generator=g) for k, s in shapes.items()}, path, file_type, arch="flux")
