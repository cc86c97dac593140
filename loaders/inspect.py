"""Model inspection: which model a folder holds and what it will cost to run — without loading weights.

The backend and the variant come from loaders/identify.py (each backend's loader answers for its own
layout, from files, never folder names); the components' parameters, dtypes and bytes come from the weight
headers (loaders/headers.py); the memory and work numbers from loaders/estimates.py.

``inspect_path`` / ``inspect_handle`` return a ``ModelReport``; ``format_report`` / ``inspect_text`` are
what GentorInspectModel shows; ``list_inspectable`` / ``resolve_inspectable`` fill its folder choice.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .. import registry
from ..errors import ModelFolderError
from .estimates import Estimate, estimate, estimates, human_bytes, human_count, human_flops
from .headers import ModelReport, dims_from_config, read_component, safetensors_files, weight_files
from .identify import identify


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
                dims_from_config(comp, path / role / "config.json", autoregressive=False)
                report.components.append(comp)
    elif ident.backend == "vlm":
        comp = read_component("model", path, skip, ident.backend_display)
        dims_from_config(comp, path / "config.json", autoregressive=True)
        report.components.append(comp)
    elif ident.backend == "emu35":
        comp = read_component("model", path, skip, ident.backend_display)
        dims_from_config(comp, path / "config.json", autoregressive=True)
        report.components.append(comp)
    elif ident.backend == "bagel":
        for role, name in (("model", "ema.safetensors"), ("ae", "ae.safetensors")):
            if (path / name).is_file():
                comp = read_component(role, path / name, skip if role == "model" else (), ident.backend_display)
                if role == "ae":
                    comp.castable = 0
                report.components.append(comp)
        dims_from_config(report.components[0], path / "llm_config.json", autoregressive=False)
    else:
        for f in safetensors_files(path) or []:
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
    files = weight_files(path)
    report = ModelReport("", "unknown", "not a Gentor model layout", str(path))
    if path.is_dir():
        for sub in sorted(p for p in path.iterdir() if p.is_dir() and weight_files(p)):
            report.components.append(read_component(sub.name, sub, registry.COMMON_FP8_SKIP, "Gentor"))
    if files:
        report.components.append(read_component(path.name, path, registry.COMMON_FP8_SKIP, "Gentor"))
    if not report.components:
        report.notes.append("no weights found (safetensors or torch checkpoint)")
    return report


def format_report(report: ModelReport, rows: list[Estimate]) -> str:
    """The text GentorInspectModel shows."""

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


# ----------------------------------------------------------------------------- choosing what to inspect
NO_FOLDER = "(none)"


def folder_keys() -> list[str]:
    """Every model-folder key of the registered backends, in registry order."""
    return list(dict.fromkeys(k for b in registry.BACKENDS for k in b.folder_keys))


def _has_model_files(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("config.json", "model_index.json", "llm_config.json")) or bool(
        weight_files(folder))


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
