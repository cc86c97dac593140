"""GET /gentor/summary: what a loader node shows under its model choice (variant, size on disk, what
is loaded, the peak-VRAM estimate), read from headers and configs only, never from loading weights."""
from __future__ import annotations

import importlib
import logging
import math
from pathlib import Path
from typing import Any, Mapping

from .. import registry
from ..errors import GentorError, InputError
from ..loaders.files import first_under_roots, safe_name_parts
from ..loaders.memory import MemoryOptions
from .common import RouteError, Services, shown

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 1024
MEMORY_PARAMS = ("weight_dtype", "compute_dtype", "offload", "vram_budget_gb")  # Gentor Memory Options' inputs
BYTES_PER_GB = 1e9
BYTES_PER_MB = 1e6


def folder_keys(services: Services) -> list[str]:
    keys: list[str] = []
    for spec in services.backends():
        keys.extend(k for k in spec.folder_keys if k not in keys)
    return keys


def resolve_name(services: Services, key: str, name: str) -> Path:
    """A name inside one of ``key``'s registered roots (first root wins), as the loaders resolve it.

    The NAME is confined (no absolute path, '..' or empty part: clients can send any string); a symlink
    inside a root is followed, as the loaders do (models kept on another disk)."""
    parts = safe_name_parts(name) if name and len(name) <= MAX_NAME_CHARS else None
    roots = [Path(r) for r in services.roots(key)]
    if parts is None:
        raise RouteError(400, "name", f"Gentor summary name: outside the model folders (got {shown(name)}, expected "
                                      f"a name relative to models/{key}/, no absolute path or '..'). Pick a name "
                                      "from the loader's list.")
    found = first_under_roots(roots, parts, Path.exists)
    if found is not None:
        return found
    raise RouteError(404, "name", f"Gentor summary name: not found (got {shown(name)}, expected a file or folder "
                                  f"inside {', '.join(map(str, roots)) or f'models/{key}/'}). Refresh the node list.")


def disk_bytes(path: Path) -> tuple[int, int]:
    """(bytes, files) of a file or of everything below a folder."""
    if path.is_file():
        return path.stat().st_size, 1
    files = [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


def memory_options(query: Mapping[str, str]) -> MemoryOptions:
    """The loader's wired Gentor Memory Options, sent as query parameters named like its inputs (the panel
    reads them from the connected node); the node's defaults for the rest. Other parameters are refused."""
    unknown = sorted(set(query) - {"folder", "name", *MEMORY_PARAMS})
    if unknown:
        raise RouteError(400, unknown[0], f"Gentor summary {unknown[0]}: unknown parameter (got {shown(unknown)}, "
                                          f"expected folder, name and Gentor Memory Options inputs {MEMORY_PARAMS}). "
                                          "Remove or rename it.")
    given: dict[str, Any] = {k: query[k] for k in MEMORY_PARAMS if k in query}
    if "vram_budget_gb" in given:
        try:
            given["vram_budget_gb"] = float(given["vram_budget_gb"])
        except ValueError:
            given["vram_budget_gb"] = math.nan
        if not math.isfinite(given["vram_budget_gb"]):
            raise RouteError(400, "vram_budget_gb", f"Gentor summary vram_budget_gb: not a number (got "
                                                    f"{shown(query['vram_budget_gb'])}, expected GB >= 0). Send a "
                                                    "number, 0 for no limit.")
    try:
        return MemoryOptions(**given)
    except InputError as exc:  # the node's own check: "Gentor Memory Options <input>: ..."
        name = str(exc).split(":", 1)[0].rsplit(" ", 1)[-1]
        raise RouteError(400, name if name in MEMORY_PARAMS else None, str(exc)) from exc


def default_describe(spec: registry.BackendSpec, path: Path, options: MemoryOptions) -> dict | None:
    """Variant by the backend's own loader check (``inspect_folder``, which raises GentorError for another
    layout), then sizes and the peak-VRAM estimate for ``options`` from loaders/estimates.py (headers only, no
    weights)."""
    info: dict[str, Any] = {}
    module = importlib.import_module(f"..loaders.{spec.id}", __package__)
    inspect_folder = getattr(module, "inspect_folder", None)
    if inspect_folder is not None and path.is_dir():
        info["variant"] = getattr(inspect_folder(path), "variant", None)
    from ..loaders import estimates, inspect as model_inspect  # noqa: PLC0415 - reads headers; imports torch

    report = model_inspect.inspect_path(path)
    if report.backend != spec.id:
        return info or None
    est = estimates.estimate(report, options)
    info.update(variant=info.get("variant") or report.variant, params=report.params,
                resting_bytes=est.resting_bytes, peak_vram_bytes=est.peak_vram,
                estimate_for=f"{est.options.weight_dtype}, offload {est.options.offload}")
    return info


def summary(services: Services, key: str, name: str, options: MemoryOptions | None = None) -> dict:
    """What a loader node shows under its model choice: variant, size on disk, what is loaded."""
    keys = folder_keys(services)
    if key not in keys:
        raise RouteError(404, "folder", f"Gentor summary folder: unknown model folder (got {shown(key)}, expected "
                                        f"one of {keys}). Use a folder key of an installed backend.")
    path = resolve_name(services, key, name)
    size, files = disk_bytes(path)
    out: dict[str, Any] = {"folder": key, "name": name, "path": str(path), "disk_bytes": size, "files": files,
                           "backend": None, "variant": None}
    problems = []
    for spec in services.backends():
        if key not in spec.folder_keys:
            continue
        out["backend"] = out["backend"] or spec.id
        describe = services.describe or default_describe
        try:
            info = describe(spec, path, options or MemoryOptions())
        except (GentorError, OSError, ValueError) as exc:  # not this backend's layout: say so, try the next one
            problems.append(str(exc))
            continue
        except Exception as exc:  # noqa: BLE001 - a summary describes what it can; a reader's own bug is logged
            log.exception("Gentor summary of %s failed", path)
            problems.append(f"{spec.display_name} {key}: {path.name} could not be described ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else 'no message'}). See ComfyUI's log.")
            continue
        if info:
            out.update({k: v for k, v in info.items() if k not in out or out[k] is None})
            out["backend"] = spec.id
            problems = []
            break
    loaded = [e for e in services.inspect() if _below(e.get("source", ""), path)]
    out["loaded_bytes"] = sum(int(e.get("bytes", 0)) for e in loaded)
    out["placements"] = sorted({str(e.get("placement")) for e in loaded})
    out["problem"] = problems[0] if problems else None
    out["line"] = summary_line(out)
    return out


def _below(source: str, path: Path) -> bool:
    try:
        return bool(source) and Path(source).resolve().is_relative_to(path)
    except (OSError, ValueError):
        return False


def size_text(n: int) -> str:
    return f"{n / BYTES_PER_GB:.2f} GB" if n >= BYTES_PER_GB else f"{n / BYTES_PER_MB:.1f} MB"


def count_text(n: int) -> str:
    for scale, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def summary_line(s: dict) -> str:
    """One line for the node: 'qwen-image-edit · 1.23 GB on disk · loaded 1.10 GB (cpu)'."""
    parts = [str(s.get("variant") or s.get("backend") or s["folder"])]
    if s.get("params"):
        parts.append(f"{count_text(s['params'])} params")
    parts.append(f"{size_text(s['disk_bytes'])} on disk")
    if s.get("loaded_bytes"):
        parts.append(f"loaded {size_text(s['loaded_bytes'])} ({', '.join(s['placements'])})")
    else:
        parts.append("not loaded")
    if s.get("peak_vram_bytes"):
        parts.append(f"peak VRAM ~{size_text(s['peak_vram_bytes'])} ({s.get('estimate_for', 'default options')})")
    if s.get("problem"):
        parts.append("not usable: " + s["problem"])
    return " · ".join(parts)
