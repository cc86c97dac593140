"""The process-wide model cache (DESIGN.md §5).

One entry per component copy, keyed by (kind, file identity, resting precision). The kind names the
ARCHITECTURE (``qwen2_5_vl``, ``qwen_image_transformer``, …), never the backend, so two backends — or a
backend and the prompt enhancer — naming the same files share one copy. Loader nodes return a light
``ModelHandle``; the weights live here, bounded by an LRU RAM budget, and can be unloaded or inspected at
any time. A stale handle simply reloads on its next use.

Precision policy (two users wanting different precisions of one component): every precision is its own
entry, and both are kept within the RAM budget. A narrower copy (e.g. FP8) is derived from a cached wider
one (bf16/fp32) in memory, without reading the disk; a wider copy than any cached one is read from disk
once. Alternating between the two then never touches the disk while both fit the budget.

Adapters (LoRA): loaded once into a cached module under a name, recorded on its entry, and switched on per
session (``Session.use_adapters``); every session ends with all adapters off, so the next user of the same
entry sees the base weights without a reload.
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
from ..errors import ModelFolderError
from . import adapters as adapter_ops
from .memory import MemoryOptions, Precision, is_wider, module_bytes

log = logging.getLogger(__name__)

RAM_BUDGET_ENV = "GENTOR_CACHE_RAM_GB"
DEFAULT_RAM_SHARE = 0.5
GIB = 1024**3


@dataclass(frozen=True)
class ModelHandle:
    """What a loader node outputs: which files (role -> path), which backend/variant, which memory options."""

    backend: str
    variant: str
    paths: tuple[tuple[str, str], ...]
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    info: tuple[tuple[str, str], ...] = ()
    adapters: tuple = ()  # LoRAs to switch on per run (loaders.lora.LoraRef), added by GentorLoRA

    def path(self, role: str | None = None) -> str:
        """The path of ``role`` (None: the first, the model's main folder)."""
        if role is None:
            return self.paths[0][1]
        for name, value in self.paths:
            if name == role:
                return value
        raise KeyError(f"{self.backend} handle has no path {role!r} (has {', '.join(n for n, _ in self.paths)})")

    def check_exists(self, display: str) -> None:
        """Fail clearly when a folder was moved or deleted after the loader ran (handles outlive files)."""
        for role, value in self.paths:
            if not Path(value).exists():
                raise ModelFolderError(
                    f"{display} {role}: the files are gone (got no file or folder at {value}, expected the model "
                    "that was loaded from there). It was moved, renamed or deleted after loading: pick it again in "
                    "the loader.")

    @property
    def info_dict(self) -> dict[str, str]:
        return dict(self.info)

    def describe(self) -> str:
        where = ", ".join(f"{k}={v}" for k, v in self.paths) if len(self.paths) > 1 else self.paths[0][1]
        extra = ", ".join(f"{k}={v}" for k, v in self.info)
        return f"{self.backend}/{self.variant} at {where}" + (f" ({extra})" if extra else "")


@dataclass
class Entry:
    key: tuple
    value: Any
    precision: Precision | None
    nbytes: int
    source: str
    kind: str = ""
    placement: str = "cpu"  # where the plan put it: "<offload>@<device>" or "cpu"
    users: set[str] = field(default_factory=set)  # backends / loaders that fetched it
    adapters: dict[str, tuple] = field(default_factory=dict)  # adapter name -> identity
    pins: int = 0
    last_used: float = 0.0
    patcher: Any = None
    patcher_resident: bool = False
    hooks: list[Any] = field(default_factory=list)  # placement hooks (model offload) to remove on re-plan
    # Weightless parts (tokenizer, scheduler, processor) used in the same runs as this weighted entry: they
    # go with it when it is unloaded, unless another live entry still uses them.
    companions: set[tuple] = field(default_factory=set)


def file_identity(path: str | os.PathLike, display: str = "Gentor", what: str = "model") -> tuple:
    """Resolved path plus (name, size, mtime) of every file below it: changes when files change."""
    root = Path(path).resolve()
    if not root.exists():
        raise ModelFolderError(
            f"{display} {what}: the files are gone (got no file or folder at {root}, expected the model that was "
            "loaded from there). It was moved, renamed or deleted after loading: pick it again in the loader.")
    if root.is_file():
        st = root.stat()
        return (str(root), ((root.name, st.st_size, st.st_mtime_ns),))
    files = []
    for p in sorted(root.rglob("*")):
        if p.is_file():
            st = p.stat()
            files.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
    return (str(root), tuple(files))


def _precision_key(precision: Precision | None, skip: tuple[str, ...]) -> tuple:
    # FP8 copies made with different skip lists hold different layers in FP8: not the same copy.
    if precision is None:
        return ()
    return (str(precision.storage), str(precision.base)) + ((skip,) if precision.cast else ())


def default_budget() -> int:
    if os.environ.get(RAM_BUDGET_ENV):
        return int(float(os.environ[RAM_BUDGET_ENV]) * GIB)
    import psutil  # noqa: PLC0415

    return int(psutil.virtual_memory().total * DEFAULT_RAM_SHARE)


Loader = Callable[[Precision | None, Any], Any]  # (precision, wider source module or None) -> component


class ModelCache:
    """LRU cache of loaded components with a RAM budget."""

    def __init__(self, budget_bytes: int | None = None) -> None:
        self.budget = default_budget() if budget_bytes is None else budget_bytes
        self._entries: dict[tuple, Entry] = {}
        self._lock = threading.RLock()
        self.disk_reads = 0
        self.derivations = 0
        # Patchers of dropped entries, emptied but kept alive until the next lookup: releasing one while
        # ComfyUI walks its loaded-model list (free_memory, /free) would let its finalizer edit that list.
        self._retired: list[Any] = []

    # -- lookups
    def get(self, kind: str, path: str, load: Loader, precision: Precision | None = None, user: str = "",
            display: str = "Gentor", skip: tuple[str, ...] = ()) -> Entry:
        """Return the entry for ``kind`` at ``path`` in ``precision``, loading or deriving as needed.

        ``load(precision, source)`` builds the component: from the files when ``source`` is None, else by
        converting ``source`` (a cached wider copy of the same files) without reading the disk.
        """
        identity = file_identity(path, display, kind)
        key = (kind, identity, _precision_key(precision, skip))
        with self._lock:
            self._retired.clear()
            self._drop_stale(kind, identity)
            entry = self._entries.get(key)
            if entry is None:
                source = self._wider_copy(kind, identity, precision)
                entry = self._build(key, kind, identity, load, precision, source)
            entry.last_used = time.monotonic()
            if user:
                entry.users.add(user)
            return entry

    def _drop_stale(self, kind: str, identity: tuple) -> None:
        """Files changed on disk since an entry was loaded: that copy is stale, free it now."""
        for k, e in list(self._entries.items()):
            if k[0] == kind and k[1][0] == identity[0] and k[1] != identity and e.pins == 0:
                log.info("Gentor cache: %s changed on disk: dropping the stale copy", identity[0])
                self._drop(k)

    def _wider_copy(self, kind: str, identity: tuple, precision: Precision | None) -> Entry | None:
        if precision is None:
            return None
        # A copy with adapters injected has PEFT-wrapped layers (base_layer / lora_*): not the plain
        # architecture a derived copy is built as, so it is not used as a source.
        candidates = [e for k, e in self._entries.items() if k[0] == kind and k[1] == identity and not e.adapters
                      and e.precision is not None and is_wider(e.precision, precision)]
        return min(candidates, key=lambda e: e.nbytes, default=None)

    def _build(self, key: tuple, kind: str, identity: tuple, load: Loader, precision: Precision | None,
               source: Entry | None) -> Entry:
        if source is not None:
            source.pins += 1  # keep the source alive while the narrower copy is derived from it
            try:
                value = load(precision, source.value)
            finally:
                source.pins -= 1
            self.derivations += 1
        else:
            value = load(precision, None)
            self.disk_reads += 1
        nbytes = 0
        if isinstance(value, torch.nn.Module):
            value.eval().requires_grad_(False)
            nbytes = module_bytes(value)
        entry = Entry(key, value, precision, nbytes, identity[0], kind=kind)
        self._entries[key] = entry
        self._evict_over_budget(keep=key)
        return entry

    # -- pinning during runs
    @contextlib.contextmanager
    def session(self) -> Iterator["Session"]:
        """Entries fetched through the session stay pinned (safe from LRU eviction) until it ends,
        on error or interrupt too; adapters switched on in it are switched off again."""
        session = Session(self)
        try:
            yield session
        finally:
            with self._lock:
                weightless = {e.key for e in session.entries if not isinstance(e.value, torch.nn.Module)}
                for e in session.entries:
                    e.pins -= 1
                    e.last_used = time.monotonic()
                    if isinstance(e.value, torch.nn.Module):
                        e.companions |= weightless
                for e in session.adapted:
                    if e.value is not None:
                        adapter_ops.deactivate(e.value)

    # -- eviction
    def _evict_over_budget(self, keep: tuple) -> None:
        total = sum(e.nbytes for e in self._entries.values())
        for e in sorted(self._entries.values(), key=lambda x: x.last_used):
            if total <= self.budget:
                return
            if e.key == keep or e.pins > 0:
                continue
            log.info("Gentor cache: evicting %s %s (%.1f MB) to stay within %.1f GB", e.kind, e.source,
                     e.nbytes / 1e6, self.budget / GIB)
            total -= e.nbytes
            self._drop(e.key)
            gc.collect()  # free the evicted weights now (hook reference cycles)
        if total > self.budget:
            log.warning("Gentor cache: %.2f GB in use exceeds the budget of %.2f GB (entries in use). "
                        "Raise %s or unload models.", total / GIB, self.budget / GIB, RAM_BUDGET_ENV)

    def _drop_with_companions(self, key: tuple) -> None:
        """Drop an entry and the weightless parts that no other live entry uses."""
        entry = self._entries.get(key)
        companions = entry.companions if entry is not None else set()
        self._drop(key)
        still_used = set().union(*(e.companions for e in self._entries.values()))
        for k in companions - still_used:
            if k in self._entries and self._entries[k].pins == 0:
                self._drop(k)

    def _drop(self, key: tuple) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            if entry.patcher is not None:
                glue.empty_patcher(entry.patcher)  # the weights go now, the patcher object later
                self._retired.append(entry.patcher)
            entry.patcher = None
            for hook in entry.hooks:
                hook.remove()
            entry.hooks.clear()
            entry.value = None

    def evicted_by_comfyui(self, key: tuple) -> None:
        """ComfyUI unloaded one of our entries from the device (room, "Unload models", /free)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or entry.pins > 0:
                return
            if glue.torch_device().type == "cpu":
                # On a CPU-only ComfyUI the "device" is RAM itself: unloading means freeing this entry (and
                # the weightless parts only it used; never its siblings by folder).
                self._drop_with_companions(key)
            else:
                entry.placement = "cpu"

    def unload(self, key: str | None = None) -> int:
        """Drop every unpinned entry (or those whose id, source path or kind contains ``key``)."""
        with self._lock:
            victims = [k for k, e in self._entries.items()
                       if e.pins == 0 and (key is None or key == entry_id(e) or key in e.source or key == e.kind)]
            for k in victims:
                self._drop_with_companions(k)
        if victims:
            gc.collect()  # diffusers hooks form reference cycles: free the weights now, not at the next GC
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return len(victims)

    def inspect(self) -> list[dict]:
        """What is loaded, where and how big (for the web panel and GentorInspectModel)."""
        with self._lock:
            return [describe_entry(e) for e in sorted(self._entries.values(), key=lambda x: -x.last_used)]

    def total_bytes(self) -> int:
        with self._lock:
            return sum(e.nbytes for e in self._entries.values())

    def entries(self, kind: str | None = None) -> list[Entry]:
        """Live entries (optionally of one kind), most recently used first."""
        with self._lock:
            return sorted((e for e in self._entries.values() if kind is None or e.kind == kind),
                          key=lambda x: -x.last_used)

    def __len__(self) -> int:
        return len(self._entries)


def entry_id(entry: Entry) -> str:
    """A short stable id of an entry (for the REST routes and the web panel)."""
    import hashlib  # noqa: PLC0415

    return hashlib.sha1(repr(entry.key).encode()).hexdigest()[:12]


def bytes_by_device(module: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    if isinstance(module, torch.nn.Module):
        for t in module.state_dict().values():
            out[str(t.device)] = out.get(str(t.device), 0) + t.numel() * t.element_size()
    return out


def describe_entry(e: Entry) -> dict:
    return {
        "id": entry_id(e), "kind": e.kind, "source": e.source, "bytes": e.nbytes,
        "bytes_by_device": bytes_by_device(e.value), "placement": e.placement,
        "storage_dtype": str(e.precision.storage).replace("torch.", "") if e.precision else None,
        "compute_dtype": str(e.precision.base).replace("torch.", "") if e.precision else None,
        "users": sorted(e.users), "adapters": sorted(e.adapters), "in_use": e.pins > 0,
        "last_used_s_ago": round(time.monotonic() - e.last_used, 1),
    }


class Session:
    """See ModelCache.session."""

    def __init__(self, cache: ModelCache) -> None:
        self.cache = cache
        self.entries: list[Entry] = []
        self.adapted: list[Entry] = []

    def get(self, *args: Any, **kwargs: Any) -> Entry:
        with self.cache._lock:
            entry = self.cache.get(*args, **kwargs)
            entry.pins += 1
            self.entries.append(entry)
            return entry

    def use_adapters(self, entry: Entry, wanted: list[adapter_ops.Adapter]) -> None:
        """Switch exactly ``wanted`` on in ``entry``'s module for this session (loading each once)."""
        with self.cache._lock:
            module = entry.value
            for adapter in wanted:
                if entry.adapters.get(adapter.name) != adapter.identity:
                    if adapter.name in entry.adapters:
                        adapter_ops.delete(module, adapter.name)
                    adapter.load(module, adapter.name)
                    entry.adapters[adapter.name] = adapter.identity
                    entry.nbytes = module_bytes(module)
            adapter_ops.activate(module, [(a.name, a.weight) for a in wanted])
            self.adapted.append(entry)


def report(model: ModelHandle | None, entries: list[dict]) -> str:
    """A readable report for GentorInspectModel: the handle (if any), then one line per component."""
    lines = [f"model: {model.describe()}", f"memory: {model.memory}"] if model is not None else []
    lines.append(f"cache: {len(entries)} components, {sum(e['bytes'] for e in entries) / 1e6:.1f} MB")
    for e in entries:
        dtype = f"{e['storage_dtype']}->{e['compute_dtype']}" if e["storage_dtype"] else "-"
        users = f" [{', '.join(e['users'])}]" if e.get("users") else ""
        lines.append(f"  {e['kind']:26s} {e['bytes'] / 1e6:9.1f} MB  {dtype:24s} {e['placement']:12s} "
                     f"{e['source']}{users}")
    return "\n".join(lines)


CACHE = ModelCache()
