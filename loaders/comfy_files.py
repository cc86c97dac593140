"""Single model files as ComfyUI keeps them: headers, kinds and weight formats, read without the weights.

A file in ``diffusion_models`` / ``unet``, ``text_encoders`` / ``clip`` or ``vae`` is a safetensors file (bf16,
fp16, plain FP8, ComfyUI's scaled FP8) or a GGUF file. Everything here reads only the header (safetensors'
JSON header, GGUF's tensor table through the ``gguf`` package's reader, which is closed again at once), so
listing a folder or refusing a wrong file never reads a weight. The kind of a file (which model, which part)
comes from its tensor names and shapes, never from its name. Listings are cached by (path, size, mtime).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .. import glue
from ..errors import InputError, MissingDependencyError, ModelFolderError, fmt
from .files import safe_name_parts, safetensors_header

SAFETENSORS = "safetensors"
GGUF = "gguf"
EXTENSIONS = {".safetensors": SAFETENSORS, ".sft": SAFETENSORS, ".gguf": GGUF}
# ComfyUI saves whole checkpoints with these prefixes; split files may keep one of them.
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "first_stage_model.", "vae.")
# Comfy's scaled-FP8 markers: the old whole-file marker and its per-layer scales, the new per-layer JSON + scales.
SCALED_MARKER = "scaled_fp8"
OLD_SCALE = ".scale_weight"
OLD_INPUT_SCALE = ".scale_input"
NEW_QUANT = ".comfy_quant"
NEW_SCALE = ".weight_scale"
NEW_INPUT_SCALE = ".input_scale"
QUANT_METADATA = "_quantization_metadata"
# The quantised layer formats Gentor computes with (ComfyUI's names); others are refused by name.
SUPPORTED_LAYER_FORMATS = ("float8_e4m3fn", "float8_e5m2")
INDEX_TIMESTEP_ZERO = "__index_timestep_zero__"  # ComfyUI's marker tensor of Edit-2511 transformer files
SAFETENSORS_DTYPES = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2"}
DOWNLOAD_HINT = ("Download the bf16, fp8_e4m3fn or fp8mixed safetensors file, or a GGUF file (Q8_0 ... Q4_0) of "
                 "this model instead")


@dataclass
class FileHeader:
    """What one file's header says: tensor shapes (logical, prefix stripped) and stored types."""

    path: Path
    container: str  # safetensors | gguf
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]  # key -> stored type (safetensors dtype name, or the GGUF quant type name)
    metadata: dict[str, str] = field(default_factory=dict)
    prefix: str = ""  # stripped from every key (restored when reading)
    raw: dict = field(default_factory=dict)  # the safetensors header / GGUF tensor table, by original key

    def has(self, *keys: str) -> bool:
        return all(k in self.shapes for k in keys)

    def count(self, prefix: str) -> int:
        """How many numbered blocks ``<prefix>N.`` the file holds."""
        return len({k[len(prefix):].split(".")[0] for k in self.shapes if k.startswith(prefix)})

    def stored_bytes(self) -> int:
        return os.path.getsize(self.path)


# ----------------------------------------------------------------------------- headers
def read_header(path: str | Path, display: str, input_name: str) -> FileHeader:
    """The header of a single-file model; a truncated or unreadable file is a clear error naming it."""
    path = Path(path)
    container = EXTENSIONS.get(path.suffix.lower())
    if container is None:
        raise ModelFolderError(fmt(display, input_name, "not a model file", path.name,
                                   "a .safetensors or .gguf file", "Pick a safetensors or GGUF file"))
    if container == GGUF:
        return _gguf_header(path, display, input_name)
    try:
        header = safetensors_header(path, f"{display} {input_name}")
    except ModelFolderError:
        raise
    meta = header.get("__metadata__") or {}
    keys = [k for k in header if k != "__metadata__"]
    prefix = _common_prefix(keys)
    shapes = {k[len(prefix):]: tuple(header[k]["shape"]) for k in keys}
    dtypes = {k[len(prefix):]: header[k]["dtype"] for k in keys}
    return FileHeader(path, SAFETENSORS, shapes, dtypes, dict(meta), prefix, header)


def _common_prefix(keys: list[str]) -> str:
    for prefix in PREFIXES:
        if keys and sum(k.startswith(prefix) for k in keys) > len(keys) // 2:
            return prefix
    return ""


def gguf_module():
    """The ``gguf`` package, or an error naming the pip command."""
    try:
        import gguf  # noqa: PLC0415
    except ImportError as exc:
        raise MissingDependencyError(
            "Gentor GGUF: reading GGUF files needs the gguf package (got no gguf installed, expected gguf>=0.10). "
            "Install it into ComfyUI's Python with: pip install gguf") from exc
    return gguf


def _gguf_header(path: Path, display: str, input_name: str) -> FileHeader:
    """GGUF tensor table through gguf's reader (a memory map it drops when this returns)."""
    gguf = gguf_module()
    try:
        reader = gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise ModelFolderError(fmt(display, input_name, f"{path.name} is truncated or not a GGUF file", exc,
                                   "a complete GGUF file", f"Re-download {path}")) from exc
    try:
        meta = {}
        for name, fld in reader.fields.items():
            if name.startswith(("general.", "comfy.")) and fld.types and fld.types[0] == gguf.GGUFValueType.STRING:
                meta[name] = bytes(fld.parts[fld.data[0]]).decode("utf-8", errors="replace")
        raw, shapes, dtypes = {}, {}, {}
        size = path.stat().st_size
        for t in reader.tensors:
            end = int(t.data_offset) + int(t.n_bytes)
            if end > size:
                raise ModelFolderError(fmt(display, input_name, f"{path.name} is truncated",
                                           f"{size} bytes, tensor {t.name} ends at byte {end}", "a complete GGUF file",
                                           f"Re-download {path}"))
            # GGUF lists dimensions innermost first; torch's order is the reverse.
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            orig = meta.get(f"comfy.gguf.orig_shape.{t.name}")
            raw[t.name] = (int(t.tensor_type), int(t.data_offset), int(t.n_bytes), shape)
            shapes[t.name] = tuple(json.loads(orig)) if orig else shape
            dtypes[t.name] = gguf.GGMLQuantizationType(t.tensor_type).name
    finally:
        del reader
    prefix = _common_prefix(list(shapes))
    strip = len(prefix)
    return FileHeader(path, GGUF, {k[strip:]: v for k, v in shapes.items()}, {k[strip:]: v for k, v in dtypes.items()},
                      meta, prefix, raw)


# ----------------------------------------------------------------------------- weight formats
@dataclass(frozen=True)
class WeightFormat:
    """How a file stores its weights."""

    name: str  # bf16 | fp16 | fp32 | fp8_e4m3fn | fp8_e5m2 | scaled_fp8 | scaled_fp8_mixed | gguf_<TYPE>
    stored: frozenset[str] = frozenset()  # layers (keys without ".weight") kept in a quantised stored form
    quant_type: str = ""  # GGUF: the most common quant type of the big weights

    @property
    def scaled(self) -> bool:
        return self.name.startswith("scaled_fp8")

    @property
    def gguf(self) -> bool:
        return self.name.startswith("gguf")

    @property
    def keeps_stored_form(self) -> bool:
        """Layers that compute from a stored form of their own (scale multiply, GGUF dequantisation)."""
        return self.scaled or self.gguf


def weight_format(header: FileHeader, display: str, input_name: str) -> WeightFormat:
    """Detect the file's weight format from its header; unsupported formats are refused by name."""
    if header.container == GGUF:
        return _gguf_format(header, display, input_name)
    meta_layers = _metadata_layers(header)
    if meta_layers is not None:
        return _scaled_format(header, meta_layers, display, input_name)
    if any(k.endswith(NEW_QUANT) for k in header.shapes):
        return _scaled_format(header, None, display, input_name)
    if SCALED_MARKER in header.shapes or any(k.endswith(OLD_SCALE) for k in header.shapes):
        layers = {k[: -len(OLD_SCALE)] for k in header.shapes if k.endswith(OLD_SCALE)}
        _check_scales(header, layers, display, input_name)
        return WeightFormat("scaled_fp8", frozenset(layers))
    big = {}
    for key, dtype in header.dtypes.items():
        if len(header.shapes[key]) >= 2:
            big[dtype] = big.get(dtype, 0) + math.prod(header.shapes[key])
    if not big:
        return WeightFormat("fp32")
    main = max(big, key=big.get)
    if main not in SAFETENSORS_DTYPES:
        raise ModelFolderError(fmt(display, input_name, f"unsupported weight type in {header.path.name}", main,
                                   "BF16, F16, F32, F8_E4M3 or F8_E5M2 weights", DOWNLOAD_HINT))
    return WeightFormat(SAFETENSORS_DTYPES[main])


def _metadata_layers(header: FileHeader) -> dict | None:
    text = header.metadata.get(QUANT_METADATA)
    if not text:
        return None
    try:
        return dict(json.loads(text).get("layers", {}))
    except (ValueError, AttributeError):
        return None


def _scaled_format(header: FileHeader, meta_layers: dict | None, display: str, input_name: str) -> WeightFormat:
    """ComfyUI's newer scaled files: per-layer formats (in the metadata, or a ``comfy_quant`` tensor per layer,
    read by ``quant_layers``); here the header alone says which layers carry a ``weight_scale``."""
    if meta_layers is None:
        meta_layers = _comfy_quant_layers(header, display, input_name)
    formats = {layer: str(conf.get("format", "")) for layer, conf in meta_layers.items()}
    bad = sorted({f for f in formats.values() if f not in SUPPORTED_LAYER_FORMATS})
    if bad:
        raise ModelFolderError(fmt(display, input_name, f"{header.path.name} uses a quantisation Gentor cannot "
                                   "compute with", ", ".join(bad), " or ".join(SUPPORTED_LAYER_FORMATS),
                                   DOWNLOAD_HINT))
    layers = set(formats)
    _check_scales(header, layers, display, input_name)
    mixed = any(header.dtypes.get(f"{k}.weight") in ("BF16", "F16", "F32") for k in _linear_layers(header))
    return WeightFormat("scaled_fp8_mixed" if mixed else "scaled_fp8", frozenset(layers))


def _comfy_quant_layers(header: FileHeader, display: str, input_name: str) -> dict[str, dict]:
    """layer -> its ``comfy_quant`` JSON (a few bytes per layer; format markers, not weights)."""
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    out = {}
    try:
        with safe_open(str(header.path), framework="pt", device="cpu") as handle:
            for key in header.shapes:
                if key.endswith(NEW_QUANT):
                    raw = bytes(handle.get_tensor(header.prefix + key).tolist())
                    out[key[: -len(NEW_QUANT)]] = json.loads(raw.decode("utf-8"))
    except (OSError, SafetensorError, ValueError) as exc:
        raise ModelFolderError(fmt(display, input_name, f"unreadable quantisation markers in {header.path.name}", exc,
                                   "comfy_quant JSON per quantised layer", f"Re-download {header.path.name}")) from exc
    return out


def _linear_layers(header: FileHeader) -> list[str]:
    return [k[: -len(".weight")] for k, s in header.shapes.items() if k.endswith(".weight") and len(s) == 2]


def _check_scales(header: FileHeader, layers: set[str], display: str, input_name: str) -> None:
    """A scaled layer without its scale would compute with weights off by that factor: refuse the file."""
    missing = sorted(layer for layer in layers
                     if f"{layer}{OLD_SCALE}" not in header.shapes and f"{layer}{NEW_SCALE}" not in header.shapes)
    # FP8 weights in a scaled file without any scale at all (the old marker promises one per FP8 layer).
    if SCALED_MARKER in header.shapes:
        fp8 = {k[: -len(".weight")] for k, d in header.dtypes.items() if k.endswith(".weight") and d.startswith("F8")}
        missing = sorted(set(missing) | {layer for layer in fp8 if f"{layer}{OLD_SCALE}" not in header.shapes})
    if missing:
        shown = ", ".join(missing[:3]) + (f", ... ({len(missing)} in all)" if len(missing) > 3 else "")
        raise ModelFolderError(fmt(display, input_name, f"{header.path.name} is a scaled-FP8 file with scales missing",
                                   f"no weight scale for {shown}", "a scale tensor for every scaled layer",
                                   f"Re-download {header.path.name}; the file is incomplete or was edited"))


def _gguf_format(header: FileHeader, display: str, input_name: str) -> WeightFormat:
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES  # noqa: PLC0415

    gguf = gguf_module()
    supported = {gguf.GGMLQuantizationType(t).name for t in SUPPORTED_GGUF_QUANT_TYPES} | {"F32", "F16", "BF16"}
    bad = sorted({d for d in header.dtypes.values() if d not in supported})
    if bad:
        raise ModelFolderError(fmt(display, input_name, f"{header.path.name} uses a GGUF quant type this install "
                                   "cannot dequantise", ", ".join(bad), "one of " + ", ".join(sorted(supported)),
                                   "Download a Q8_0, Q6_K, Q5_K_M, Q4_K_M or Q4_0 file instead, or update diffusers "
                                   "and gguf"))
    quant = {k[: -len(".weight")]: d for k, d in header.dtypes.items()
             if k.endswith(".weight") and d not in ("F32", "F16", "BF16")}
    counts: dict[str, int] = {}
    for key, dtype in header.dtypes.items():
        counts[dtype] = counts.get(dtype, 0) + math.prod(header.shapes[key])
    main = max(counts, key=counts.get) if counts else "F32"
    return WeightFormat(f"gguf_{main}", frozenset(quant), main)


# ----------------------------------------------------------------------------- folders and listings
_listing_cache: dict[tuple, object] = {}


def cached(path: Path, what: str, compute):
    """``compute(path)`` once per (path, size, mtime, what): listings re-read only changed files."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, what)
    if key not in _listing_cache:
        _listing_cache[key] = compute(path)
    return _listing_cache[key]


def list_files(folder_keys: tuple[str, ...], accept) -> list[str]:
    """Model files (names relative to their root, '/'-separated) in ComfyUI's folders whose header ``accept``
    takes; unreadable files are left out of the list (picking one by name gives the full error)."""
    seen: dict[str, Path] = {}
    for key in folder_keys:
        for root in glue.model_roots(key):
            base = Path(root)
            if not base.is_dir():
                continue
            for path in sorted(base.rglob("*")):
                if path.suffix.lower() not in EXTENSIONS or not path.is_file():
                    continue
                name = path.relative_to(base).as_posix()
                if name in seen:
                    continue
                try:
                    ok = cached(path, getattr(accept, "__name__", repr(accept)), accept)
                except (OSError, ModelFolderError, MissingDependencyError, ValueError):
                    ok = False
                if ok:
                    seen[name] = path
    return sorted(seen)


def resolve_file(display: str, input_name: str, name: str, folder_keys: tuple[str, ...]) -> Path:
    """A dropdown value -> a file inside one of the registered roots; anything else is refused."""
    if not name or not isinstance(name, str):
        raise InputError(fmt(display, input_name, "no file selected", repr(name),
                             f"a file from models/{folder_keys[0]}/", "Pick a file from the list"))
    parts = safe_name_parts(name)
    if parts is None:
        raise InputError(fmt(display, input_name, "not a plain file name", repr(name),
                             f"a name relative to models/{folder_keys[0]}/",
                             "Pick a file from the dropdown; paths outside the model folders are refused"))
    roots = [Path(r) for key in folder_keys for r in glue.model_roots(key)]
    for root in roots:
        cand = root.joinpath(*parts)
        if cand.is_file():
            return cand.resolve()
    raise InputError(fmt(display, input_name, "file not found in the model folders", repr(name),
                         f"a file under {', '.join(map(str, roots)) or 'models/' + folder_keys[0]}",
                         "Pick a file from the dropdown (refresh after copying files)"))
