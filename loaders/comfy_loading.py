"""What loading a Comfy-format file takes, whatever the model generation: how its weights rest (``precision_for``),
streaming one file into a module (``file_loader``), the shared cache with the file named on failure (``fetch``),
and ComfyUI's bundled Qwen2 tokenizer (``tokenizer_dir``). Used by ``qwen_image_files.py`` (1.x) and
``qwen_image21_files.py`` (2.1), and the prompt enhancer's Comfy-file path (``vlm.py``).
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from .. import glue
from ..errors import ModelFolderError, fmt
from . import lora as lora_files
from . import streaming
from .cache import Session
from .comfy_files import FileHeader, WeightFormat
from .comfy_quant import GGUFTensors, stored_form_preparer
from .memory import DTYPES, MemoryOptions, Plan, Precision

BACKEND = "Qwen-Image"
TOKENIZER = "qwen25_tokenizer"
AUTO = "auto"


def precision_for(header: FileHeader, wfmt: WeightFormat, plan: Plan, memory: MemoryOptions,
                  skip: tuple[str, ...], identity_names: bool) -> tuple[Precision, tuple[str, ...]]:
    """How a file's weights rest. Stored forms (scaled FP8, GGUF) stay as stored, computed in the plan's dtype;
    a plain-FP8 file under weight_dtype = auto rests in its FP8 (layers the file keeps wider stay wider)."""
    base = plan.precision.base
    if wfmt.keeps_stored_form:
        return Precision(base, base), ()
    if memory.weight_dtype == AUTO and wfmt.name in ("fp8_e4m3fn", "fp8_e5m2"):
        wider = ()
        if identity_names:  # module names = file keys: keep exactly the file's non-FP8 layers out of FP8
            wider = tuple(f"^{re.escape(k[:-len('.weight')])}$" for k, d in header.dtypes.items()
                          if k.endswith(".weight") and not d.startswith("F8"))
        return Precision(DTYPES[wfmt.name], base), tuple(skip) + wider
    return plan.precision, tuple(skip) if plan.precision.cast else ()


def vae_precision(plan: Plan) -> Precision:
    """A VAE rests and computes in the plan's compute dtype (never FP8), as from a pipeline folder."""
    return Precision(plan.precision.base, plan.precision.base)


def file_loader(build, header: FileHeader, wfmt: WeightFormat, rename, component: str,
                tensors: Any = None):
    """``load(precision, source)`` for the cache: stream one file (stored-form layers swapped in first);
    ``tensors`` reads the file in another layout (loaders/comfy_remap.py)."""
    def load(prec: Precision | None, source: Any, skip: tuple[str, ...]) -> Any:
        if source is not None and not wfmt.keeps_stored_form:
            return streaming.load_module(build, prec, skip, source=lora_files.base_view(source), display=BACKEND,
                                         component=component)
        prepare = stored_form_preparer(header, wfmt, prec.base) if wfmt.keeps_stored_form else None
        if tensors is not None:
            source_kw = {"tensors": tensors}
        else:
            source_kw = {"tensors": GGUFTensors(header)} if wfmt.gguf else {"files": (header.path,)}
        return streaming.load_module(build, prec, skip, rename=rename, display=BACKEND, component=component,
                                     prepare=prepare, **source_kw)
    return load


def fetch(session: Session, kind: str, role: str, path: str, load: Any, prec: Precision, skip: tuple[str, ...],
          user: str) -> Any:
    """One file's component through the shared cache; a file that cannot be read is named in the error."""
    try:
        return session.get(kind, path, load, prec, user=user, display=BACKEND, skip=skip)
    except (OSError, ValueError) as exc:
        raise ModelFolderError(fmt(BACKEND, role, f"could not be loaded from {Path(path).name}", exc,
                                   "a readable Comfy-format file", f"Check or re-download {path}")) from exc


def tokenizer_dir() -> Path:
    """ComfyUI's bundled Qwen2.5 tokenizer folder (found through glue), or a clear error."""
    for cand in glue.bundled_tokenizer_dirs(TOKENIZER):
        if (Path(cand) / "vocab.json").is_file():
            return Path(cand)
    raise ModelFolderError(fmt(BACKEND, "text_encoder", "ComfyUI's bundled Qwen2.5 tokenizer was not found",
                               glue.bundled_tokenizer_dirs(TOKENIZER) or "no ComfyUI",
                               f"comfy/text_encoders/{TOKENIZER}/ with vocab.json and merges.txt",
                               "Run inside ComfyUI (it ships the tokenizer), or restore that folder of your ComfyUI"))


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer  # noqa: PLC0415

    return AutoTokenizer.from_pretrained(folder)
