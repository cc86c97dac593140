"""File-level helpers shared by every loader: folder listing, name resolution, safetensors checks."""
from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Callable, Iterable

from .. import glue
from ..errors import InputError, ModelFolderError

SAFETENSORS_HEADER_BYTES = 8
MAX_HEADER_BYTES = 100 * 1024 * 1024
WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


def list_model_folders(folder_keys: tuple[str, ...], accept: Callable[[Path], bool]) -> list[str]:
    """Sub-folders (names relative to their root, '/'-separated) that ``accept`` recognises.

    Two roots holding the same name: the first root wins (DESIGN.md §4). Nested folders are
    searched two levels deep so ``org/model`` layouts work.
    """
    seen: dict[str, Path] = {}
    for base in existing_roots(folder_keys):
        for cand in sorted(list(base.glob("*/")) + list(base.glob("*/*/"))):
            if cand.is_dir() and accept(cand):
                name = cand.relative_to(base).as_posix()
                seen.setdefault(name, cand)
    return sorted(seen)


def existing_roots(folder_keys: Iterable[str]) -> list[Path]:
    """The registered roots of ``folder_keys`` that exist as folders, in registration order (first wins)."""
    return [Path(root) for key in folder_keys for root in glue.model_roots(key) if Path(root).is_dir()]


def resolve_model_folder(backend: str, input_name: str, name: str, folder_keys: tuple[str, ...]) -> Path:
    """Turn a dropdown value into a folder inside a registered root; refuse anything else."""
    roots = [Path(r).resolve() for key in folder_keys for r in glue.model_roots(key)]
    if not name or not isinstance(name, str):
        raise InputError(f"{backend} {input_name}: no model selected (got {name!r}, expected a folder name "
                         f"from the list). Put a model folder into models/{folder_keys[0]}/ and refresh.")
    if not roots:
        raise InputError(f"{backend} {input_name}: no model folders are registered (got {name!r}, expected a "
                         f"folder under models/{folder_keys[0]}/). Create that folder and put the model there.")
    parts = safe_name_parts(name)
    if parts is None:
        # Headless API clients can send any string: a name must stay inside the registered roots.
        raise InputError(
            f"{backend} {input_name}: {name!r} is not a plain folder name (got an absolute path, '..' or an "
            f"empty part, expected a name relative to models/{folder_keys[0]}/ such as "
            f"{list_model_names_hint(roots)}). Pick a model from the dropdown; paths outside the model "
            "folders are refused.")
    # The NAME is confined (checked above); what it points at is the user's choice: a folder that is
    # a symlink inside a registered root (models kept on another disk) is followed.
    found = first_under_roots(roots, parts, Path.is_dir)
    if found is not None:
        return found
    raise InputError(
        f"{backend} {input_name}: {name!r} is not a folder inside the registered model folders "
        f"(got {name!r}, expected one of {list_model_names_hint(roots)} under {', '.join(map(str, roots))}). "
        "Pick a model from the dropdown; paths outside the model folders are refused.")


def first_under_roots(roots: Iterable[Path], parts: tuple[str, ...], accept: Callable[[Path], bool]) -> Path | None:
    """``root/parts`` in the first root where ``accept`` takes it, resolved (a symlink is followed); None if none.
    ``parts`` must come from ``safe_name_parts``, so the name itself cannot leave its root."""
    for root in roots:
        cand = Path(root).joinpath(*parts)
        if accept(cand):
            return cand.resolve()
    return None


def safe_name_parts(name: str) -> tuple[str, ...] | None:
    """The '/'-separated parts of a dropdown name, or None when it could leave its root."""
    if "\x00" in name or name.startswith(("/", "\\")) or Path(name).is_absolute() or WINDOWS_DRIVE.match(name):
        return None
    parts = tuple(name.replace("\\", "/").split("/"))
    if any(part in ("", ".", "..") for part in parts):
        return None
    return parts


def list_model_names_hint(roots: list[Path], limit: int = 8) -> list[str]:
    names = sorted({p.name for r in roots if r.is_dir() for p in r.iterdir() if p.is_dir()})
    return names[:limit] + (["..."] if len(names) > limit else [])


def read_json(path: Path, backend: str, what: str) -> dict:
    if not path.is_file():
        raise ModelFolderError(f"{backend} {what}: file missing (got no {path.name} in {path.parent}, expected "
                               f"{path}). Download the complete model folder again.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFolderError(f"{backend} {what}: {path} is not valid JSON ({exc}). "
                               "Re-download this file.") from exc


def safetensors_header(path: Path, backend: str) -> dict:
    """Parse and validate a safetensors header; detect truncated or corrupt files cheaply."""
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(SAFETENSORS_HEADER_BYTES)
        if len(raw) < SAFETENSORS_HEADER_BYTES:
            raise _corrupt(backend, path, f"{size} bytes, shorter than a safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if n <= 0 or n > MAX_HEADER_BYTES or n + SAFETENSORS_HEADER_BYTES > size:
            raise _corrupt(backend, path, f"header length {n} for a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _corrupt(backend, path, f"unreadable header ({exc})") from exc
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if SAFETENSORS_HEADER_BYTES + n + end != size:
        raise _corrupt(backend, path, f"{size} bytes on disk, header describes {SAFETENSORS_HEADER_BYTES + n + end}")
    return header


def _corrupt(backend: str, path: Path, got: str) -> ModelFolderError:
    return ModelFolderError(f"{backend} weights: {path.name} is truncated or corrupt (got {got}, expected a "
                            f"complete safetensors file). Re-download {path}.")


def weight_files(folder: Path, backend: str, component: str) -> dict[str, dict]:
    """Validate a component's safetensors weights (single file or sharded + index).

    Returns {file name: header}. Every shard the index names must exist and be complete.
    """
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index = read_json(indexes[0], backend, f"{component} index")
        shards = sorted(set(index.get("weight_map", {}).values()))
        if not shards:
            raise ModelFolderError(f"{backend} {component}: {indexes[0].name} names no shards (got an empty "
                                   "weight_map, expected shard file names). Re-download the index file.")
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise ModelFolderError(f"{backend} {component}: shard missing (got no {', '.join(missing)} in {folder}, "
                                   f"expected all {len(shards)} shards named in {indexes[0].name}). "
                                   "Download the missing shard files.")
        return {s: safetensors_header(folder / s, backend) for s in shards}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "no folder"
        raise ModelFolderError(f"{backend} {component}: no weights (got {found} in {folder}, expected "
                               "*.safetensors or a sharded index). Download the component's weight files.")
    return {f.name: safetensors_header(f, backend) for f in files}


def tensor_shapes(headers: dict[str, dict]) -> dict[str, list[int]]:
    """Key -> shape over all shards' headers."""
    return {k: v["shape"] for h in headers.values() for k, v in h.items() if k != "__metadata__"}


# ----------------------------------------------------------------------------- torch.save checkpoints
ZIP_MAGIC = b"PK\x03\x04"  # torch >= 1.6 saves a zip archive (and only that can be memory-mapped)
PICKLE_PROTO = 0x80  # a pickle of protocol 2+ starts with PROTO <n>; older torch saved plain pickles
MAX_SHOWN_GLOBALS = 6


def checkpoint_kind(path: Path) -> str:
    """'zip' (torch.save archive), 'pickle' (legacy torch.save) or 'other', from the first bytes."""
    with path.open("rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if head == ZIP_MAGIC:
        return "zip"
    return "pickle" if len(head) >= 2 and head[0] == PICKLE_PROTO and 2 <= head[1] <= 5 else "other"


UNSAFE_TODO = "Use the release's safetensors, or convert this file once where you trust it"


def read_checkpoint(path: Path, backend: str, what: str = "weights", unsafe_todo: str = UNSAFE_TODO) -> object:
    """A torch.save file through ``torch.load(weights_only=True)`` only (memory-mapped when it is a zip):
    never unpickles code. A file that is no checkpoint, or pickles classes besides tensors, is refused
    saying what was found (the classes are read from the archive without loading it); ``unsafe_todo`` is
    what such a refusal tells the user to do."""
    import pickle  # noqa: PLC0415
    import zipfile  # noqa: PLC0415

    import torch  # noqa: PLC0415

    kind = checkpoint_kind(path)
    size = path.stat().st_size
    if kind == "other":
        with path.open("rb") as f:
            head = f.read(8).hex(" ")
        raise ModelFolderError(f"{backend} {what}: {path.name} is not a torch checkpoint (got {size} bytes starting "
                               f"{head or 'with nothing'}, neither a zip archive nor a pickle; expected a torch.save "
                               f"file or safetensors). Re-download it, or remove it from {path.parent}.")
    if kind == "zip":
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
        except (RuntimeError, ValueError, zipfile.BadZipFile, pickle.UnpicklingError) as exc:
            raise _unreadable(backend, what, path, f"a damaged zip archive ({exc})") from exc
        if unsafe:
            shown = ", ".join(sorted(unsafe)[:MAX_SHOWN_GLOBALS]) + (" ..." if len(unsafe) > MAX_SHOWN_GLOBALS else "")
            raise ModelFolderError(
                f"{backend} {what}: {path.name} cannot be read safely (got a torch checkpoint that pickles {shown} "
                f"besides tensors, expected only tensors for torch.load(weights_only=True)). {unsafe_todo}.")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=kind == "zip")
    except pickle.UnpicklingError as exc:  # a legacy pickle: torch names the refused global in its message
        found = sorted(set(re.findall(r"GLOBAL ([\w.]+)", str(exc))))
        raise ModelFolderError(
            f"{backend} {what}: {path.name} cannot be read safely (got a legacy torch pickle holding "
            f"{', '.join(found) or 'objects torch refuses to load without running code'}, expected only tensors "
            f"for torch.load(weights_only=True)). {unsafe_todo}.") from exc
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise _unreadable(backend, what, path, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc


def _unreadable(backend: str, what: str, path: Path, got: str) -> ModelFolderError:
    return ModelFolderError(f"{backend} {what}: {path.name} could not be read (got {got}, expected a complete "
                            f"torch.save checkpoint). Re-download {path}.")
