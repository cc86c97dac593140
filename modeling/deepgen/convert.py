"""Convert a DeepGen pickle checkpoint (``model.pt``) to safetensors next to it, and verify the round trip.

The command line is ``cli.py`` beside this file, run as a plain file so it works whatever the pack's
folder is called::

    python <pack folder>/modeling/deepgen/cli.py /path/to/model.pt [--allow-global module.Class ...]

It writes ``model.safetensors`` beside the original (``--out`` to choose), reloads it and checks that
every tensor is bit-identical. Pickles are only ever read with ``torch.load(weights_only=True)``; a file
that pickles other objects (e.g. training metadata classes) is refused, naming the class; if you trust
the file, allow exactly that class with ``--allow-global`` (it must be importable).

This file imports nothing from the pack (only torch and safetensors) for that reason: ``cli.py`` imports it
as a top-level module.
"""
from __future__ import annotations

import importlib
import pickle
import re
from pathlib import Path
from typing import Any, Sequence

import torch

# Containers that training frameworks wrap a state dict in (DeepSpeed "module", mmengine "state_dict").
WRAPPER_KEYS = ("module", "state_dict", "model")
STRIP_PREFIXES = ("module.",)
GLOBAL_RE = re.compile(r"GLOBAL ([\w.]+)")
ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTO = 0x80
CLI_FILE = "cli.py"  # the command line, beside this file


class ConversionRefused(Exception):
    """The file cannot be read safely; the message says what to do (``found``: the refused classes,
    ``command``: the conversion command for this file, when one applies)."""

    def __init__(self, message: str, found: Sequence[str] = (), command: str = "") -> None:
        super().__init__(message)
        self.found = tuple(found)
        self.command = command


def command_for(path: str | Path) -> str:
    """The exact command that converts ``path`` (shown in loader errors)."""
    return f'python "{Path(__file__).resolve().with_name(CLI_FILE)}" "{path}"'


def _import_global(dotted: str) -> Any:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def load_pickle(path: str | Path, allow: Sequence[str] = ()) -> Any:
    """``torch.load(weights_only=True)``, with ``allow``-listed classes; refusals name the class (or say the
    file is no torch checkpoint at all)."""
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive (newer) or a pickle starting with PROTO 2..5 (older).
    if head != ZIP_MAGIC and not (len(head) >= 2 and head[0] == PICKLE_PROTO and 2 <= head[1] <= 5):
        raise ConversionRefused(f"{Path(path).name} is not a torch checkpoint: neither a zip archive nor a pickle "
                                f"(its first bytes are {head.hex(' ') or 'missing: the file is empty'})")
    try:
        with torch.serialization.safe_globals([_import_global(g) for g in allow]):
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as exc:
        found = sorted(set(GLOBAL_RE.findall(str(exc))))
        what = f"it pickles {', '.join(found)}" if found else "it pickles objects other than tensors"
        command = command_for(path) + "".join(f" --allow-global {g}" for g in found)
        raise ConversionRefused(f"{Path(path).name} cannot be read with torch.load(weights_only=True): {what}. If you "
                                f"trust the file, convert it once: {command}", found, command) from exc


def _is_zip(path: str | Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == ZIP_MAGIC  # torch >= 1.6 zip format supports mmap


def unwrap(obj: Any) -> dict[str, torch.Tensor]:
    """The flat tensor dict inside a checkpoint (``module`` / ``state_dict`` wrappers and ``module.`` removed)."""
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict):
        raise ConversionRefused(f"the checkpoint holds a {type(obj).__name__}, not a state dict of tensors")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            continue  # e.g. step counters next to the weights
        for prefix in STRIP_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    if not out:
        raise ConversionRefused("the checkpoint holds no tensors")
    return out


def convert(path: str | Path, out: str | Path | None = None, allow: Sequence[str] = ()) -> tuple[Path, int]:
    """Write the checkpoint's tensors as safetensors and verify them bit for bit; return (path, tensors)."""
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    src = Path(path)
    dst = Path(out) if out else src.with_suffix(".safetensors")
    if dst.resolve() == src.resolve():
        raise ConversionRefused(f"the output {dst} would overwrite the input")
    state = unwrap(load_pickle(src, allow))
    # safetensors refuses shared or non-contiguous storages: give every tensor its own contiguous copy
    plain = {k: v.detach().contiguous().clone() for k, v in state.items()}
    tmp = dst.with_name(dst.name + ".partial")
    save_file(plain, str(tmp), metadata={"format": "pt", "converted_from": src.name})
    back = load_file(str(tmp))
    bad = [k for k in plain if k not in back or back[k].dtype != plain[k].dtype or not torch.equal(back[k], plain[k])]
    if bad or set(back) != set(plain):
        tmp.unlink()
        raise ConversionRefused(f"round trip failed for {len(bad) or 'some'} tensors (e.g. {bad[:3]}); nothing written")
    tmp.replace(dst)
    return dst, len(plain)

