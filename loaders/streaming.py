"""Streaming loads: build a module on the meta device, then fill it one tensor at a time.

``load_module`` never materialises a component at a wider precision than it will rest in: the skeleton
is built with ``accelerate.init_empty_weights`` (parameters on meta, buffers real), every parameter gets
its resting dtype up front (FP8 where diffusers' ``apply_layerwise_casting`` would cast, the compute
dtype elsewhere), and each tensor is converted as it is read. Safetensors files are opened one at a
time (and re-opened every READ_WINDOW_BYTES) and every tensor is copied out, so no file stays mapped
once loading is done (DESIGN.md §5: peak host RAM ~ resting bytes + one shard; here + one 64 MB window).

Keys are checked from the files' headers before any weight is read: unknown keys, missing weights and
shape mismatches are a ``ModelFolderError`` naming the component. transformers models load both their
old and their new key layouts through transformers' own checkpoint conversion mapping (``streaming_keys``).
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import glue
from ..errors import GentorError, ModelFolderError, fmt
from .files import read_json, safetensors_header, weight_files
from .memory import FP8, Precision, apply_layerwise_storage
from .streaming_keys import Label, Rename, alias_groups, check_plan, few, file_shapes, key_mapper

# Bytes of a safetensors file mapped at a time while reading (see _file_tensors).
READ_WINDOW_BYTES = 64 * 1024**2
FLOAT32 = torch.float32

# Set on a (meta) parameter whose tensor rests exactly as the file stores it (FP8 with a scale, GGUF blocks):
# no resting dtype is given to it and nothing converts it (loaders/comfy_quant.py).
STORED_FORM = "_gentor_stored_form"


class TensorSource:
    """Tensors of a file that safetensors cannot map (GGUF): its keys' logical shapes, then the tensors."""

    origin: str
    shapes: dict[str, tuple]

    def tensors(self, plan: dict[str, "str | None"]) -> Iterator[tuple[str, torch.Tensor]]:
        raise NotImplementedError


# ----------------------------------------------------------------------------- files and skeletons
def component_files(folder: str | Path, display: str, component: str) -> tuple[Path, ...]:
    """A component's validated safetensors files (sharded index or single file), in load order."""
    folder = Path(folder)
    try:
        names = sorted(weight_files(folder, display, component))
    except ModelFolderError as exc:
        # files.safetensors_header names only the backend ("<display> weights: ..."): add the component.
        text, generic = str(exc), f"{display} weights:"
        if text.startswith(generic):
            raise ModelFolderError(f"{display} {component} weights:{text[len(generic):]}") from exc
        raise
    return tuple(folder / name for name in names)


def diffusers_builder(cls: type, folder: str | Path, display: str = "", component: str = "",
                      **overrides: Any) -> Callable[[], nn.Module]:
    """``build`` for a diffusers model class from ``folder/config.json`` (read now, built later)."""
    folder = Path(folder)
    read_json(folder / "config.json", display, f"{component} config")  # a clear error when missing/invalid
    config = cls.load_config(folder)
    config.update(overrides)
    return lambda: cls.from_config(config)


def transformers_builder(cls: type, folder: str | Path, dtype: torch.dtype | None = None, display: str = "",
                         component: str = "") -> Callable[[], nn.Module]:
    """``build`` for a transformers model class from ``folder/config.json`` without reading weights.

    ``dtype`` is the default dtype while the skeleton is built, as ``from_pretrained(dtype=...)`` uses it
    (buffers created with the default dtype follow it; rotary ``inv_freq`` stays float32).
    """
    folder = Path(folder)
    found = read_json(folder / "config.json", display, f"{component} config").get("model_type")
    expected = getattr(cls.config_class, "model_type", "")
    if expected and found != expected:
        raise ModelFolderError(fmt(display, f"{component} config", "another model family",
                                   f"model_type={found!r} in {folder / 'config.json'}", f"model_type={expected!r}",
                                   "Point this component at the right folder"))
    config = cls.config_class.from_pretrained(folder)
    generation = _generation_config(cls, folder)

    def build() -> nn.Module:
        model = cls._from_config(config, dtype=dtype or FLOAT32)
        if generation is not None:
            model.generation_config = generation
        return model

    return build


def _generation_config(cls: type, folder: Path):
    """The folder's generation_config.json for models that generate (what from_pretrained attaches)."""
    if not (folder / "generation_config.json").is_file() or not cls.can_generate():
        return None
    from transformers import GenerationConfig  # noqa: PLC0415

    return GenerationConfig.from_pretrained(folder)


def load_diffusers(cls: type, folder: str | Path, precision: Precision | None, skip: Sequence[str] = (),
                   source: nn.Module | None = None, display: str = "", component: str = "") -> nn.Module:
    """A diffusers model from its folder (config + safetensors) or converted from ``source``."""
    build = diffusers_builder(cls, folder, display, component)
    files = () if source is not None else component_files(folder, display, component)
    return load_module(build, precision, skip, files, source, None, display, component)


def load_transformers(cls: type, folder: str | Path, precision: Precision | None, skip: Sequence[str] = (),
                      source: nn.Module | None = None, display: str = "", component: str = "") -> nn.Module:
    """A transformers model from its folder (old or new key layout) or converted from ``source``."""
    build = transformers_builder(cls, folder, precision.base if precision else None, display, component)
    files = () if source is not None else component_files(folder, display, component)
    return load_module(build, precision, skip, files, source, None, display, component)


# ----------------------------------------------------------------------------- the loader
def load_module(build: Callable[[], nn.Module], precision: Precision | None, skip: Sequence[str] = (),
                files: Iterable[str | Path] = (), source: nn.Module | None = None, rename: Rename | None = None,
                display: str = "", component: str = "", tensors: TensorSource | None = None,
                prepare: Callable[[nn.Module, Rename], None] | None = None) -> nn.Module:
    """Build a skeleton with ``build()`` on meta and fill it from ``files`` or from ``source``.

    ``precision`` None keeps the on-disk dtypes; otherwise parameters rest in ``precision.base``, and when
    ``precision.cast`` diffusers' layerwise casting (``skip`` patterns) decides which rest in FP8.
    ``rename(checkpoint_key)`` returns the module key or None to leave that tensor out; transformers
    models also get transformers' own key conversion. ``source`` is a loaded module of the same
    architecture (wider precision) converted tensor by tensor without touching the disk. ``tensors`` reads a
    file safetensors cannot (GGUF) in place of ``files``. ``prepare(skeleton, mapper)`` may swap layers of the
    meta skeleton for ones that compute from a stored form (scaled FP8, GGUF) before anything is filled.
    Returns the module in eval mode without gradients, on the CPU.
    """
    files = tuple(Path(f) for f in files)
    if (bool(files) or tensors is not None) == (source is not None):
        raise GentorError(fmt(display or "Gentor", component or "weights", "nothing or two sources to load from",
                              f"{len(files)} files and {'a' if source is not None else 'no'} source module",
                              "either weight files or a source module", "Report this as a bug"))
    with _meta_skeleton():
        module = build()
    label = Label(display or type(module).__name__, component or "weights")
    if prepare is not None:
        prepare(module, key_mapper(module, rename, module.state_dict(keep_vars=True), label))
    _set_resting_dtypes(module, precision, tuple(skip))
    slots = module.state_dict(keep_vars=True)
    if source is not None:
        shapes = {key: tuple(t.shape) for key, t in source.state_dict(keep_vars=True).items()}
        plan = {key: key for key in shapes}
        origin = "the source module"
    elif tensors is not None:
        shapes = dict(tensors.shapes)
        mapper = key_mapper(module, rename, slots, label)
        plan = {key: mapper(key) for key in shapes}
        origin = tensors.origin
    else:
        # Headers only (no mapping): a truncated file or a wrong key fails before any weight is read.
        headers = {path: safetensors_header(path, f"{label.display} {label.component}") for path in files}
        shapes = file_shapes(headers, label)
        mapper = key_mapper(module, rename, slots, label)
        plan = {key: mapper(key) for h in headers.values() for key in h if key != "__metadata__"}
        origin = f"{len(files)} file(s) in {files[0].parent}"
    check_plan(module, plan, shapes, slots, label, origin)
    loaded: set[str] = set()
    aliases = alias_groups(slots)
    base = precision.base if precision else None
    reads = (_source_tensors(source) if source is not None else
             tensors.tensors(plan) if tensors is not None else file_tensors(headers, plan, label))
    for key, tensor in reads:
        glue.check_interrupt()  # Cancel lands within one tensor's read, also while a big model loads
        if plan[key] is not None:
            _assign(module, plan[key], tensor, slots[plan[key]], base, precision is None, aliases, loaded)
        del tensor  # a file tensor views the mapping: drop it before the reader closes its window
    _tie(module, slots, loaded)
    leftover = [name for name, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
    if leftover:
        raise label.error(f"{len(leftover)} weights were never filled", few(leftover),
                          f"every weight read from {origin}", "Re-download the component's files")
    release_freed_memory()
    conversions = module.__dict__.pop("_streaming_conversions", None)
    if conversions is not None:  # as from_pretrained: save_pretrained writes back the layout that was read
        module._weight_conversions = [c for c in conversions if c.was_used()]
    return module.eval().requires_grad_(False)


@contextmanager
def _meta_skeleton() -> Iterator[None]:
    """accelerate's init_empty_weights (parameters on meta, buffers real), keeping weights shared in __init__.

    accelerate re-wraps every registered parameter in a new object, so ``head.weight = emb.weight`` would
    leave two separate parameters: one already on meta is registered as it is.
    """
    from accelerate import init_empty_weights  # noqa: PLC0415

    torch_register = nn.Module.register_parameter
    with init_empty_weights():
        accelerate_register = nn.Module.register_parameter

        def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
            if param is not None and param.is_meta:
                torch_register(module, name, param)
            else:
                accelerate_register(module, name, param)

        nn.Module.register_parameter = register
        try:
            yield
        finally:
            nn.Module.register_parameter = accelerate_register


# ----------------------------------------------------------------------------- resting dtypes
def _set_resting_dtypes(module: nn.Module, precision: Precision | None, skip: tuple[str, ...]) -> None:
    """Give every (meta) parameter the dtype it will rest in; install the FP8 casting hooks."""
    if precision is None:
        return
    keep = _keep_fp32(module, precision.base)
    replaced: dict[int, nn.Parameter] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        for name, param in list(sub._parameters.items()):
            if param is None or not param.is_floating_point() or getattr(param, STORED_FORM, False):
                continue
            full = f"{prefix}.{name}" if prefix else name
            if id(param) not in replaced:
                dtype = FLOAT32 if keep(full) else precision.base
                replaced[id(param)] = nn.Parameter(torch.empty_like(param, dtype=dtype, device="meta"),
                                                   requires_grad=False)
            # Tied parameters stay one object, so they keep sharing one tensor once filled.
            sub._parameters[name] = replaced[id(param)]
    if precision.cast:
        # The hooks' initialisation casts each hooked layer to the storage dtype: on meta, that decides
        # which parameters rest in FP8 exactly as it would on a loaded model. Layers the model class itself
        # keeps out of casting are added, as diffusers' enable_layerwise_casting does.
        patterns = tuple(skip) + tuple(getattr(module, "_keep_in_fp32_modules", None) or ()) + tuple(
            getattr(module, "_skip_layerwise_casting_patterns", None) or ())
        apply_layerwise_storage(module, precision, patterns)


def _keep_fp32(module: nn.Module, base: torch.dtype) -> Callable[[str], bool]:
    """Parameters the library keeps in float32 whatever the requested dtype (``_keep_in_fp32_modules``)."""
    if base == FLOAT32:
        return lambda _name: False
    plan_fn = getattr(module, "_get_dtype_plan", None)
    if plan_fn is not None:  # transformers: its own plan (strict / fp16-only lists)
        patterns = [p for p, dt in plan_fn(base).items() if dt == FLOAT32]
        if not patterns:
            return lambda _name: False
        from transformers.core_model_loading import build_glob_alternation  # noqa: PLC0415

        regex = build_glob_alternation(patterns)[0]
        return lambda name: regex.search(name) is not None
    names = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    return lambda name: any(m in name for m in names)  # diffusers' rule: a substring of the name


def _convert(tensor: torch.Tensor, slot: torch.Tensor, base: torch.dtype | None, keep_dtype: bool) -> torch.Tensor:
    """A CPU copy of ``tensor`` in its resting dtype (a copy, so nothing keeps a file mapping alive)."""
    if getattr(slot, STORED_FORM, False):
        # Stored form (FP8 weight of a scaled layer, GGUF blocks): kept bit for bit, already a private copy.
        return tensor if getattr(tensor, "quant_type", None) is not None else tensor.to("cpu", copy=True)
    if keep_dtype or not tensor.is_floating_point():
        dtype = tensor.dtype
    elif isinstance(slot, nn.Parameter):
        dtype = slot.dtype
    else:
        dtype = base  # a floating buffer read from the files rests in the compute dtype
    if dtype in FP8 and tensor.dtype != dtype and base is not None:
        # Round exactly as the library path does: read in the compute dtype, then the hook casts to FP8.
        tensor = tensor.to(dtype=base)
    return tensor.to(device="cpu", dtype=dtype, copy=True)


# ----------------------------------------------------------------------------- reading and filling
def file_tensors(headers: dict[Path, dict], plan: dict[str, str | None], label: Label
                  ) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) one file at a time, in file order; the caller copies each tensor and drops it.

    Pages of a mapped file count towards the process's RSS until the mapping goes, whatever was copied
    out: the file is re-opened every ``READ_WINDOW_BYTES`` so at most one window is mapped at a time
    (a real Qwen-Image shard is ~5 GB).
    """
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    for path, header in headers.items():
        keys = sorted((k for k in header if k != "__metadata__" and plan.get(k) is not None),
                      key=lambda k: header[k]["data_offsets"][0])
        for window in _windows(keys, header):
            try:
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    for key in window:
                        yield key, handle.get_tensor(key)  # a view of the mapping
            except (OSError, SafetensorError) as exc:
                raise label.error(f"could not read {path.name}", exc, "a complete safetensors file",
                                  f"Re-download {path}") from exc


def _windows(keys: list[str], header: dict) -> list[list[str]]:
    """Consecutive keys in groups of about READ_WINDOW_BYTES (a larger tensor is a group of its own)."""
    groups: list[list[str]] = [[]]
    size = 0
    for key in keys:
        begin, end = header[key]["data_offsets"]
        if groups[-1] and size + (end - begin) > READ_WINDOW_BYTES:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += end - begin
    return groups


def _source_tensors(source: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of a loaded module; a tied tensor once (its other names are filled as aliases)."""
    seen: set[int] = set()
    with torch.no_grad():
        for key, tensor in source.state_dict(keep_vars=True).items():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield key, tensor.detach()


def _assign(module: nn.Module, target: str, tensor: torch.Tensor, slot: torch.Tensor, base: torch.dtype | None,
            keep_dtype: bool, aliases: dict[str, tuple[str, ...]], loaded: set[str]) -> None:
    """Put one converted tensor into the module (and into its tied aliases not read themselves)."""
    value = _convert(tensor, slot, base, keep_dtype)
    del tensor
    names = [target] + [a for a in aliases.get(target, ()) if a != target and a not in loaded]
    if isinstance(value, nn.Parameter):  # a parameter subclass of the stored form (GGUFParameter)
        new = value
    else:
        new = nn.Parameter(value, requires_grad=False) if isinstance(slot, nn.Parameter) else value
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = module.get_submodule(parent_name)
        if isinstance(slot, nn.Parameter):
            parent._parameters[leaf] = new
        else:
            parent._buffers[leaf] = new
    loaded.add(target)


def _tie(module: nn.Module, slots: dict[str, Any], loaded: set[str]) -> None:
    """transformers' tie_weights, told which weights were read, so it ties like from_pretrained."""
    tie = getattr(module, "tie_weights", None)
    if tie is None or not hasattr(module, "all_tied_weights_keys"):
        return
    tie(missing_keys=set(slots) - loaded, recompute_mapping=False)


def release_freed_memory() -> None:
    """Give the heap pages freed while loading back to the OS (glibc only).

    glibc keeps freed memory of a thread's arena for reuse; on ComfyUI's executor thread that is hundreds of MB
    of read buffers left counting as the process's RSS after a load (issue 19: +1,176 MB after an FP8 load,
    +716 MB after ``malloc_trim(0)``, resting 688 MB). Elsewhere (musl, macOS, Windows) nothing is done.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    import ctypes  # noqa: PLC0415
    import ctypes.util  # noqa: PLC0415

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (e.g. musl has no malloc_trim)
        return None


def resting_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers as they rest (tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
