"""Model inspection: which model a folder holds and what it will cost to run — without loading weights.

Everything here comes from config files and safetensors headers (shapes and dtypes): the backend and the
variant are detected from the layouts and configs (never from folder names); parameter counts, dtypes and
bytes per component come from the headers. The estimates follow how Gentor really runs a model:

- resting bytes: FP8 storage puts every 2-D weight (and its bias) of a layer not named by the backend's
  skip patterns in 1 byte; everything else rests in the compute dtype (diffusers' layerwise casting).
- peak host RAM while loading (streaming loads, DESIGN.md §5): every component's resting bytes plus the
  largest safetensors file being read (mapped) plus its biggest tensor copied out at its on-disk dtype
  before conversion, as all components stay cached.
- peak VRAM per offload mode: none = all resting bytes; model = the largest component; block = the
  largest component's non-block weights + two blocks (one computing, one prefetched); each plus the
  activations of one step (a transformer's working set: ``ACTIVATION_FACTOR`` hidden-sized tensors per
  token in the compute dtype, plus the KV cache of an autoregressive model).
- work: 2 FLOPs per weight per token (multiply-add) + attention 4·T·ctx·hidden per layer, per denoising
  step at a resolution (diffusion) or per generated token (autoregressive decoding).

``inspect_path`` / ``inspect_handle`` return a ``ModelReport``; ``estimate`` gives the numbers for one
memory option; ``format_report`` is what GentorInspectModel shows; ``check_fits`` is the shared
"too large for this device" refusal.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import registry
from ..errors import MemoryEstimateError, ModelFolderError
from .files import read_checkpoint, safetensors_header
from .memory import FP8, OFFLOAD_MODES, MemoryOptions, resolve

GIB = 1024**3
# Hidden-sized tensors alive per token during one transformer layer's forward (residual, norm output,
# q/k/v, attention output, the MLP's up/gate/down at ~4x width counted as 8): an upper-bound rule of thumb.
ACTIVATION_FACTOR = 16
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
               "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
# Keys of repeated blocks: "<container>.<index>." (transformer_blocks.3., layers.12., blocks.0.)
BLOCK_KEY = re.compile(r"^(.*?(?:layers|blocks|transformer_blocks|single_transformer_blocks))\.(\d+)\.")
DEFAULT_TEXT_TOKENS = 256  # prompt length assumed for estimates
PATCH_PIXELS = {"qwen_image": 16, "vlm": 28, "deepgen": 16, "bagel": 16, "emu35": 16}


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


@dataclass(frozen=True)
class Estimate:
    options: MemoryOptions
    resting_bytes: int
    peak_vram: int
    peak_host_load: int
    flops: float  # per step (diffusion) or per generated token (autoregressive)
    per: str  # "step at WxH" | "token"


@dataclass(frozen=True)
class Identity:
    backend: str
    backend_display: str
    variant: str


# ----------------------------------------------------------------------------- reading headers
def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _safetensors(folder: Path) -> list[Path]:
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


def _weight_files(folder: Path) -> list[Path]:
    """safetensors files, else torch pickle checkpoints (a folder with both: the safetensors)."""
    files = _safetensors(folder)
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
    for f in _weight_files(folder):
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


# ----------------------------------------------------------------------------- identification
def identify(path: Path) -> Identity | None:
    """Backend + variant of a folder from its layout and configs, or None when it is none of ours."""
    path = Path(path)
    from . import qwen_image, vlm  # noqa: PLC0415

    if path.is_dir() and qwen_image.looks_like_pipeline(path):
        try:
            return Identity("qwen_image", "Qwen-Image", qwen_image.inspect_folder(path).variant)
        except ModelFolderError:
            return Identity("qwen_image", "Qwen-Image", "(incomplete pipeline folder)")
    if path.is_dir() and vlm.looks_like_vlm(path):
        try:
            return Identity("vlm", vlm.DISPLAY, vlm.inspect_folder(path).variant)
        except ModelFolderError:
            return Identity("vlm", vlm.DISPLAY, "(incomplete Qwen-VL folder)")
    if path.is_dir() and (path / "llm_config.json").is_file() and (path / "ema.safetensors").is_file():
        return Identity("bagel", "BAGEL", _bagel_variant(path))
    emu = _emu35_variant(path) if path.is_dir() else None
    if emu:
        return Identity("emu35", "Emu3.5", emu)
    return _backend_identify(path)


def _backend_identify(path: Path) -> Identity | None:
    """Backends may offer ``loaders.<id>.identify(path) -> variant | None`` (from files, never names)."""
    import importlib  # noqa: PLC0415

    for spec in registry.BACKENDS:
        if spec.id in ("qwen_image", "vlm", "bagel", "emu35"):
            continue
        try:
            module = importlib.import_module(f"{__package__}.{spec.id}")
        except ImportError:
            continue  # an optional backend whose dependencies are missing
        variant = module.identify(path) if hasattr(module, "identify") else None
        if variant:
            return Identity(spec.id, spec.display_name, variant)
    return None


def _emu35_variant(path: Path) -> str | None:
    try:
        from . import emu35  # noqa: PLC0415 - optional backend
    except ImportError:
        return None
    if not emu35.looks_like_model(path):
        return None
    try:
        return emu35.inspect_model(path).variant
    except ModelFolderError:
        return "(incomplete Emu3.5 folder)"


def _bagel_variant(path: Path) -> str:
    llm = json.loads((path / "llm_config.json").read_text(encoding="utf-8"))
    hidden, layers = llm.get("hidden_size"), llm.get("num_hidden_layers")
    return "BAGEL-7B-MoT" if (hidden, layers) == (3584, 28) else f"BAGEL ({layers} layers x {hidden})"


# ----------------------------------------------------------------------------- reports
def inspect_path(path: str | Path) -> ModelReport:
    """Report on a folder or file in any Gentor model folder (no weights are loaded)."""
    path = Path(path)
    if not path.exists():
        raise ModelFolderError(f"Gentor Inspect Model path: nothing there (got {path}, expected a model folder or a "
                               ".safetensors file). Pick a folder from the list.")
    ident = identify(path)
    if ident is None:
        return _generic(path)
    spec = registry.get(ident.backend) if ident.backend in {b.id for b in registry.BACKENDS} else None
    skip = spec.fp8_skip if spec else registry.COMMON_FP8_SKIP
    report = ModelReport(ident.backend, ident.backend_display, ident.variant, str(path))
    if ident.backend == "qwen_image":
        for role in ("transformer", "text_encoder", "vae"):
            if (path / role).is_dir():
                comp = read_component(role, path / role, skip, ident.backend_display)
                if spec and role in spec.fp8_exclude:
                    comp.castable = 0  # this component never rests in FP8
                _dims_from_config(comp, path / role / "config.json", autoregressive=False)
                report.components.append(comp)
    elif ident.backend == "vlm":
        comp = read_component("model", path, skip, ident.backend_display)
        _dims_from_config(comp, path / "config.json", autoregressive=True)
        report.components.append(comp)
    elif ident.backend == "emu35":
        comp = read_component("model", path, skip, ident.backend_display)
        _dims_from_config(comp, path / "config.json", autoregressive=True)
        report.components.append(comp)
    elif ident.backend == "bagel":
        for role, name in (("model", "ema.safetensors"), ("ae", "ae.safetensors")):
            if (path / name).is_file():
                comp = read_component(role, path / name, skip if role == "model" else (), ident.backend_display)
                if role == "ae":
                    comp.castable = 0
                report.components.append(comp)
        _dims_from_config(report.components[0], path / "llm_config.json", autoregressive=False)
    else:
        for f in _safetensors(path) or []:
            comp = read_component(f.stem, f, skip, ident.backend_display)
            report.components.append(comp)
        report.notes.append("activation and work estimates need this backend's inspector (weights only)")
    return report


def inspect_handle(handle) -> ModelReport:  # noqa: ANN001 - a loaders.cache.ModelHandle
    """Report on a loaded model's files (the handle's main path)."""
    report = inspect_path(handle.path())
    report.variant = report.variant or handle.variant
    return report


def _generic(path: Path) -> ModelReport:
    files = _weight_files(path)
    report = ModelReport("", "unknown", "not a Gentor model layout", str(path))
    if path.is_dir():
        for sub in sorted(p for p in path.iterdir() if p.is_dir() and _weight_files(p)):
            report.components.append(read_component(sub.name, sub, registry.COMMON_FP8_SKIP, "Gentor"))
    if files:
        report.components.append(read_component(path.name, path, registry.COMMON_FP8_SKIP, "Gentor"))
    if not report.components:
        report.notes.append("no weights found (safetensors or torch checkpoint)")
    return report


def _dims_from_config(comp: Component, config_path: Path, autoregressive: bool) -> None:
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


# ----------------------------------------------------------------------------- estimates
def _bytes(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def resting_bytes(comp: Component, storage: torch.dtype, base: torch.dtype) -> int:
    fp8 = comp.castable if storage in FP8 else 0
    return fp8 * 1 + (comp.params - fp8) * _bytes(base)


def _tokens(report: ModelReport, width: int, height: int, images: int) -> int:
    patch = PATCH_PIXELS.get(report.backend, 16)
    return images * (width // patch) * (height // patch) + DEFAULT_TEXT_TOKENS


MAIN_ROLES = ("transformer", "model")  # the component that runs every step / token


def main_component(report: ModelReport) -> Component | None:
    """The denoiser or decoder (runs every step / token); else the largest component."""
    named = [c for c in report.components if c.role in MAIN_ROLES]
    return named[0] if named else max(report.components, key=lambda c: c.params, default=None)


def estimate(report: ModelReport, options: MemoryOptions, device: torch.device | None = None,
             width: int = 1024, height: int = 1024, images: int = 1) -> Estimate:
    """Peak VRAM, peak host RAM during load and work for one memory option at a resolution."""
    plan = resolve(options, device or torch.device("cuda"))
    base, storage = plan.precision.base, plan.precision.storage
    rest = {c.role: resting_bytes(c, storage, base) for c in report.components}
    total = sum(rest.values())
    main = main_component(report)
    tokens = _tokens(report, width, height, images)
    act = 0
    flops = 0.0
    if main is not None and main.hidden:
        act = tokens * main.hidden * ACTIVATION_FACTOR * _bytes(base)
        if main.autoregressive:
            act += tokens * main.kv_width * main.layers * _bytes(base)  # KV cache of the prompt
            ctx = tokens
            flops = 2.0 * main.params + 4.0 * ctx * main.hidden * main.layers  # one new token
        else:
            flops = 2.0 * main.params * tokens + 4.0 * tokens * tokens * main.hidden * main.layers
    if plan.offload == "none":
        weights = total
    elif plan.offload == "model":
        weights = max(rest.values(), default=0)
    else:
        biggest = main
        per_param = rest[biggest.role] / max(1, biggest.params) if biggest else 0
        block = int(biggest.block_params * per_param) if biggest else 0
        non_block = int((biggest.params - biggest.block_total) * per_param) if biggest else 0
        weights = non_block + 2 * block
    # Streaming: all components stay cached; the file being read is mapped, and its biggest tensor is copied
    # out at its on-disk dtype before conversion to the resting dtype.
    load_peak = total + max((c.largest_file + c.largest_tensor for c in report.components), default=0)
    per = "token" if main is not None and main.autoregressive else f"step at {width}x{height}"
    return Estimate(options, total, weights + act, load_peak, flops, per)


def estimates(report: ModelReport, device: torch.device | None = None, width: int = 1024, height: int = 1024,
              weight_dtypes: tuple[str, ...] = ("bf16", "fp8_e4m3fn")) -> list[Estimate]:
    """One estimate per (weight dtype, offload mode)."""
    return [estimate(report, MemoryOptions(weight_dtype=w, offload=o), device, width, height)
            for w in weight_dtypes for o in OFFLOAD_MODES]


def format_report(report: ModelReport, rows: list[Estimate]) -> str:
    """The text GentorInspectModel shows."""
    from .vlm import human_count  # noqa: PLC0415

    lines = [f"{report.display}: {report.variant}", f"path: {report.path}",
             f"parameters: {human_count(report.params)} in {len(report.components)} component(s)"]
    for c in report.components:
        dtypes = ", ".join(f"{k} {human_count(v)}" for k, v in sorted(c.dtypes.items(), key=lambda kv: -kv[1]))
        lines.append(f"  {c.role:14s} {human_count(c.params):>7s} params  {human_bytes(c.disk_bytes):>10s} on disk "
                     f"({dtypes})" + (f"  {c.blocks} blocks" if c.blocks else ""))
    lines.append("estimates (weights dtype / offload: peak VRAM, peak RAM while loading, work):")
    for e in rows:
        lines.append(f"  {e.options.weight_dtype:10s} {e.options.offload:6s} VRAM {human_bytes(e.peak_vram):>10s}  "
                     f"RAM(load) {human_bytes(e.peak_host_load):>10s}  {human_flops(e.flops)} per {e.per}")
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)


def human_flops(n: float) -> str:
    for scale, unit in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} FLOP"


def human_bytes(n: int) -> str:
    for scale, unit in ((GIB, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def summary(report: ModelReport, options: MemoryOptions | None = None) -> str:
    """One line for loader nodes: variant, parameters, resting size under the chosen options."""
    from .vlm import human_count  # noqa: PLC0415

    e = estimate(report, options or MemoryOptions())
    return (f"{report.variant}: {human_count(report.params)} params, {human_bytes(e.resting_bytes)} resting, "
            f"~{human_bytes(e.peak_vram)} peak VRAM ({e.options.weight_dtype}, offload {e.options.offload})")


def check_fits(report: ModelReport, options: MemoryOptions, device: torch.device, free_bytes: int,
               input_name: str = "memory", width: int = 1024, height: int = 1024, images: int = 1) -> Estimate:
    """The shared "too large for this device" refusal: raise before allocating when the estimate does not fit."""
    e = estimate(report, options, device, width, height, images)
    if device.type != "cpu" and e.peak_vram > free_bytes:
        cheaper = [estimate(report, MemoryOptions(weight_dtype=w, offload=o), device, width, height, images)
                   for w in ("bf16", "fp8_e4m3fn") for o in OFFLOAD_MODES]
        cheaper = [x for x in cheaper if x.peak_vram <= free_bytes]
        hint = (f"Use weight_dtype={cheaper[0].options.weight_dtype} with offload={cheaper[0].options.offload} "
                f"(~{cheaper[0].peak_vram / GIB:.1f} GiB)" if cheaper else "No memory option fits: use a smaller "
                "variant or a larger GPU")
        raise MemoryEstimateError(
            f"{report.display} {input_name}: {report.variant} will not fit on {device} (got an estimated peak of "
            f"{e.peak_vram / GIB:.1f} GiB, expected at most the {free_bytes / GIB:.1f} GiB free). {hint}.")
    return e


# ----------------------------------------------------------------------------- choosing what to inspect
NO_FOLDER = "(none)"


def folder_keys() -> list[str]:
    """Every model-folder key of the registered backends, in registry order."""
    return list(dict.fromkeys(k for b in registry.BACKENDS for k in b.folder_keys))


def _has_model_files(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("config.json", "model_index.json", "llm_config.json")) or bool(
        _weight_files(folder))


def list_inspectable() -> list[str]:
    """'<folder key>/<name>' for every model folder in any Gentor model folder."""
    from .files import list_model_folders  # noqa: PLC0415

    return [f"{key}/{name}" for key in folder_keys() for name in list_model_folders((key,), _has_model_files)]


def resolve_inspectable(choice: str, display: str = "Gentor Inspect Model") -> Path:
    """'<folder key>/<name>' -> the folder, confined to that key's registered roots."""
    from ..errors import InputError  # noqa: PLC0415
    from .files import resolve_model_folder  # noqa: PLC0415

    key, _, name = (choice or "").partition("/")
    if key not in folder_keys() or not name:
        raise InputError(f"{display} folder: not a model folder choice (got {choice!r}, expected '<folder key>/<name>' "
                         f"with a key among {', '.join(folder_keys())}). Pick a folder from the list.")
    return resolve_model_folder(display, "folder", name, (key,))


def inspect_text(model=None, folder: str | None = None, width: int = 1024, height: int = 1024,  # noqa: ANN001
                 device: torch.device | None = None) -> str:
    """GentorInspectModel's report: the chosen folder and/or the model handle (without loading weights)."""
    parts = []
    if folder and folder != NO_FOLDER:
        report = inspect_path(resolve_inspectable(folder))
        parts.append(format_report(report, estimates(report, device, width, height)))
    if model is not None:
        report = inspect_handle(model)
        rows = estimates(report, device, width, height)
        mine = estimate(report, model.memory, device, width, height)
        parts.append(format_report(report, rows) + f"\nwith this model's memory options ({model.memory.weight_dtype}, "
                     f"offload {model.memory.offload}): ~{human_bytes(mine.peak_vram)} peak VRAM")
    return "\n\n".join(parts)
