"""The process-wide model cache (DESIGN.md §5).

One entry per component (kind + file identity + adapters). Loader nodes return a light
``ModelHandle``; the weights live here, bounded by an LRU RAM budget, and can be unloaded or
inspected at any time. A stale handle simply reloads on its next use.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .. import glue
from .memory import MemoryOptions, Precision, can_convert, convert, module_bytes

log = logging.getLogger(__name__)

RAM_BUDGET_ENV = "GENTOR_CACHE_RAM_GB"
DEFAULT_RAM_SHARE = 0.5
GIB = 1024**3


@dataclass(frozen=True)
class ModelHandle:
    """What a loader node outputs: which files, which backend/variant, which memory options."""

    backend: str
    variant: str
    path: str
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    info: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in self.info)
        return f"{self.backend}/{self.variant} at {self.path}" + (f" ({extra})" if extra else "")


@dataclass
class Entry:
    key: tuple
    value: Any
    precision: Precision | None
    nbytes: int
    source: str
    placement: str = "cpu"  # cpu | device | block | model
    pins: int = 0
    last_used: float = 0.0
    patcher: Any = None
    patcher_resident: bool = False


def file_identity(path: str | os.PathLike) -> tuple:
    """Resolved path plus (name, size, mtime) of every file below it: changes when files change."""
    root = Path(path).resolve()
    if root.is_file():
        st = root.stat()
        return (str(root), ((root.name, st.st_size, st.st_mtime_ns),))
    files = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            files.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
    return (str(root), tuple(files))


def default_budget() -> int:
    if os.environ.get(RAM_BUDGET_ENV):
        return int(float(os.environ[RAM_BUDGET_ENV]) * GIB)
    import psutil  # noqa: PLC0415

    return int(psutil.virtual_memory().total * DEFAULT_RAM_SHARE)


class ModelCache:
    """LRU cache of loaded components with a RAM budget."""

    def __init__(self, budget_bytes: int | None = None) -> None:
        self.budget = default_budget() if budget_bytes is None else budget_bytes
        self._entries: dict[tuple, Entry] = {}
        self._lock = threading.RLock()
        self.disk_reads = 0
        self.conversions = 0
        # Patchers of dropped entries, emptied but kept alive until the next lookup: releasing one while
        # ComfyUI walks its loaded-model list (free_memory, /free) would let its finalizer edit that list.
        self._retired: list[Any] = []

    # -- lookups
    def get(self, kind: str, path: str, load: Callable[[torch.dtype | None], Any],
            precision: Precision | None = None, skip: tuple[str, ...] = (),
            adapters: tuple = ()) -> Entry:
        """Return the entry for ``kind`` at ``path``, loading or converting as needed.

        ``load(dtype)`` reads the component from disk in ``dtype``; the cache then converts it to
        ``precision`` (e.g. FP8 storage). A cached copy is reused when the wanted precision is
        reachable from it without loss; otherwise it is re-read.
        """
        key = (kind, file_identity(path), adapters)
        with self._lock:
            self._retired.clear()
            entry = self._entries.get(key)
            if entry is not None and precision is not None and entry.precision != precision:
                if can_convert(entry.precision, precision) and isinstance(entry.value, torch.nn.Module):
                    convert(entry.value, entry.precision, precision, skip)
                    entry.precision = precision
                    entry.nbytes = module_bytes(entry.value)
                    self.conversions += 1
                else:
                    log.info("Gentor cache: re-reading %s %s (cached copy lost precision)", kind, path)
                    self._drop(key)
                    entry = None
            if entry is None:
                entry = self._read(key, kind, path, load, precision, skip)
            entry.last_used = time.monotonic()
            return entry

    def _read(self, key: tuple, kind: str, path: str, load: Callable, precision: Precision | None,
              skip: tuple[str, ...]) -> Entry:
        value = load(precision.base if precision is not None else None)
        self.disk_reads += 1
        nbytes = 0
        if isinstance(value, torch.nn.Module):
            value.eval().requires_grad_(False)
            if precision is not None:
                convert(value, Precision(precision.base, precision.base), precision, skip)
            nbytes = module_bytes(value)
        entry = Entry(key, value, precision, nbytes, str(path))
        self._entries[key] = entry
        self._evict_over_budget(keep=key)
        return entry

    # -- pinning during runs
    @contextlib.contextmanager
    def session(self) -> Iterator["Session"]:
        """Entries fetched through the session stay pinned (safe from LRU eviction) until it ends,
        on error or interrupt too."""
        session = Session(self)
        try:
            yield session
        finally:
            with self._lock:
                for e in session.entries:
                    e.pins -= 1
                    e.last_used = time.monotonic()

    # -- eviction
    def _evict_over_budget(self, keep: tuple) -> None:
        total = sum(e.nbytes for e in self._entries.values())
        for e in sorted(self._entries.values(), key=lambda x: x.last_used):
            if total <= self.budget:
                return
            if e.key == keep or e.pins > 0:
                continue
            log.info("Gentor cache: evicting %s (%.1f MB) to stay within %.1f GB", e.source,
                     e.nbytes / 1e6, self.budget / GIB)
            total -= e.nbytes
            self._drop(e.key)
            gc.collect()  # free the evicted weights now (hook reference cycles)
        if total > self.budget:
            log.warning("Gentor cache: %.2f GB in use exceeds the budget of %.2f GB (entries in use). "
                        "Raise %s or unload models.", total / GIB, self.budget / GIB, RAM_BUDGET_ENV)

    def _drop(self, key: tuple) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            if entry.patcher is not None:
                glue.empty_patcher(entry.patcher)  # the weights go now, the patcher object later
                self._retired.append(entry.patcher)
            entry.patcher = None
            entry.value = None

    def evicted_by_comfyui(self, key: tuple) -> None:
        """ComfyUI unloaded our weights from the device (room, "Unload models", /free)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.pins > 0:
                return
            if glue.torch_device().type == "cpu":
                # On a CPU-only ComfyUI the "device" is RAM itself: unloading means freeing it, with
                # the weightless parts (tokenizer, scheduler, ...) of the same model folder.
                folder = Path(entry.source).parent
                for k, e in list(self._entries.items()):
                    if e.pins == 0 and Path(e.source).parent == folder:
                        self._drop(k)
            else:
                entry.placement = "cpu"

    def unload(self, key: str | None = None) -> int:
        """Drop every unpinned entry (or those whose source path or kind contains ``key``)."""
        with self._lock:
            victims = [k for k, e in self._entries.items()
                       if e.pins == 0 and (key is None or key in e.source or key == k[0])]
            for k in victims:
                self._drop(k)
        if victims:
            gc.collect()  # diffusers hooks form reference cycles: free the weights now, not at the next GC
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return len(victims)

    def inspect(self) -> list[dict]:
        """What is loaded, where and how big (for the web panel and GentorInspectModel)."""
        with self._lock:
            return [{
                "kind": e.key[0], "source": e.source, "bytes": e.nbytes, "placement": e.placement,
                "storage_dtype": str(e.precision.storage).replace("torch.", "") if e.precision else None,
                "compute_dtype": str(e.precision.base).replace("torch.", "") if e.precision else None,
                "in_use": e.pins > 0,
            } for e in sorted(self._entries.values(), key=lambda x: -x.last_used)]

    def total_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)


class Session:
    """See ModelCache.session."""

    def __init__(self, cache: ModelCache) -> None:
        self.cache = cache
        self.entries: list[Entry] = []

    def get(self, *args: Any, **kwargs: Any) -> Entry:
        with self.cache._lock:
            entry = self.cache.get(*args, **kwargs)
            entry.pins += 1
            self.entries.append(entry)
            return entry


def report(model: ModelHandle | None, entries: list[dict]) -> str:
    """A readable report for GentorInspectModel: the handle (if any), then one line per component."""
    lines = [f"model: {model.describe()}", f"memory: {model.memory}"] if model is not None else []
    lines.append(f"cache: {len(entries)} components, {sum(e['bytes'] for e in entries) / 1e6:.1f} MB")
    for e in entries:
        dtype = f"{e['storage_dtype']}->{e['compute_dtype']}" if e["storage_dtype"] else "-"
        lines.append(f"  {e['kind']:26s} {e['bytes'] / 1e6:9.1f} MB  {dtype:24s} {e['placement']:12s} {e['source']}")
    return "\n".join(lines)


CACHE = ModelCache()
