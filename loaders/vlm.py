"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL Instruct folders -> cached transformers models (the prompt enhancer).

A folder in ``models/vlm/`` (any size) is recognised from its config.json (``model_type``) and checked
against its weights' headers: the text width read from ``embed_tokens`` must match the config and a
vision tower must be present. The size label (e.g. "Qwen2.5-VL-3B") comes from the text model's width and
depth, never from the folder name. The text encoder of a Qwen-Image pipeline is a Qwen2.5-VL too: it is
offered as ``<pipeline>/text_encoder`` and loaded from the very same files, so the enhancer and Qwen-Image
share one cached copy (kind = architecture, DESIGN.md §5).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import registry
from ..errors import InputError, ModelFolderError
from .cache import ModelHandle, Session
from .estimates import human_count
from .files import list_model_folders, read_json, resolve_model_folder, tensor_shapes, weight_files
from .identify import identify as identify_folder, variant_of
from .memory import MemoryOptions, Plan, Precision
from .qwen_chat import QWEN_CHAT_TEMPLATE  # one home for the format; vlm.QWEN_CHAT_TEMPLATE stays valid

log = logging.getLogger(__name__)

BACKEND = "vlm"
DISPLAY = "Qwen-VL"
INPUT = "model_name"
FOLDER_KEYS = ("vlm",)
PIPELINE_FOLDER_KEYS = ("qwen_image", "diffusers")  # Qwen-Image pipelines whose text encoder is a Qwen2.5-VL
TEXT_ENCODER = "text_encoder"
# VLMs inside other backends' folders, offered as '<folder>/<sub-folder>' so the enhancer can share one copy with
# that backend: Qwen-Image pipelines' text encoders, DeepGen-1.0-diffusers' own vlm/ (Qwen2.5-VL-3B).
COMFY_FILES = "text_encoders/"  # Comfy-format text-encoder files are offered under this name prefix
COMFY_LAYOUT = "comfy_file"
NESTED = ((PIPELINE_FOLDER_KEYS, TEXT_ENCODER, ()), (("deepgen",), "vlm", ("connector",)))


@dataclass(frozen=True)
class Architecture:
    kind: str  # the shared-cache kind (architecture, not backend)
    family: str  # display name
    class_name: str  # transformers model class


# config.json model_type -> architecture. The kind equals the model_type so that every backend loading
# the same files (DeepGen's VLM, Qwen-Image's text encoder) names the same cache entry.
ARCHITECTURES = {
    "qwen2_vl": Architecture("qwen2_vl", "Qwen2-VL", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": Architecture("qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": Architecture("qwen3_vl", "Qwen3-VL", "Qwen3VLForConditionalGeneration"),
    "qwen3_vl_moe": Architecture("qwen3_vl_moe", "Qwen3-VL-MoE", "Qwen3VLMoeForConditionalGeneration"),
}
# (model_type, text hidden size, text layers) -> released size name (the published configs' values).
SIZE_NAMES = {
    ("qwen2_vl", 1536, 28): "2B", ("qwen2_vl", 3584, 28): "7B", ("qwen2_vl", 8192, 80): "72B",
    ("qwen2_5_vl", 2048, 36): "3B", ("qwen2_5_vl", 3584, 28): "7B", ("qwen2_5_vl", 5120, 64): "32B",
    ("qwen2_5_vl", 8192, 80): "72B",
    ("qwen3_vl", 2048, 28): "2B", ("qwen3_vl", 2560, 36): "4B", ("qwen3_vl", 4096, 36): "8B",
    ("qwen3_vl", 5120, 64): "32B", ("qwen3_vl_moe", 2048, 48): "30B-A3B", ("qwen3_vl_moe", 4096, 94): "235B-A22B",
}  # fmt: skip
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
TOKENIZER_FILES = ("tokenizer.json", "vocab.json")
IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
# The Qwen chat format all Qwen-VL Instruct models were trained on, used only when a folder ships no chat
# template (a Qwen-Image pipeline's tokenizer): system/user/assistant turns between <|im_start|> and
# <|im_end|>, each image as <|vision_start|><|image_pad|><|vision_end|> where it appears in the turn.
COMFY_KINDS = ("qwen2_5_vl", "qwen3_vl")  # Comfy-format text encoders that can generate (with their lm_head)


@dataclass(frozen=True)
class VlmInfo:
    """What a folder holds, read from config.json and the weights' headers (never the folder name)."""

    model_type: str
    arch: Architecture
    variant: str  # e.g. "Qwen2.5-VL-3B", or "Qwen2.5-VL (0.02B, 64x2)" for unreleased sizes
    params: int
    hidden: int
    layers: int
    vision_depth: int
    model_dir: Path  # config + weights
    processor_dir: Path | None  # image processor (+ tokenizer); None: text only
    tokenizer_dir: Path
    chat_template: bool  # the folder ships its own chat template


def spec() -> registry.BackendSpec:
    return registry.get(BACKEND)


def _model_type(folder: Path) -> str | None:
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None  # unreadable: not offered in the dropdown; selecting it anyway gives the full error


def looks_like_vlm(folder: Path) -> bool:
    """Cheap dropdown filter: config.json names a Qwen-VL architecture."""
    return _model_type(folder) in ARCHITECTURES


def _nested_filter(sub: str, markers: tuple[str, ...]):
    """A pipeline folder (model_index.json + the backend's marker folders) whose ``sub`` folder is a Qwen-VL."""
    def ok(folder: Path) -> bool:
        return ((folder / "model_index.json").is_file() and all((folder / m).is_dir() for m in markers)
                and looks_like_vlm(folder / sub))
    return ok


def list_models() -> list[str]:
    """Qwen-VL folders in models/vlm/, then VLMs inside other backends' folders as '<folder>/<sub-folder>'
    (Qwen-Image pipelines' text encoders, DeepGen diffusers folders' vlm/)."""
    own = list_model_folders(FOLDER_KEYS, looks_like_vlm)
    nested = [f"{n}/{sub}" for keys, sub, markers in NESTED
              for n in list_model_folders(keys, _nested_filter(sub, markers))]
    return own + [n for n in dict.fromkeys(nested) if n not in own] + _comfy_text_encoders()


def _comfy_text_encoders() -> list[str]:
    """ComfyUI's Qwen2.5-VL text-encoder files that can generate text (they hold lm_head), as 'text_encoders/<file>':
    the same file Gentor Load Qwen-Image (ComfyUI files) reads, so the two share one cached copy."""
    from . import qwen_image_files  # noqa: PLC0415

    return [COMFY_FILES + n for n in qwen_image_files.list_files(qwen_image_files.TEXT_KEYS, _generates)]


def _generates(path: Path) -> bool:
    from . import comfy_qwen  # noqa: PLC0415
    from .comfy_files import read_header  # noqa: PLC0415

    header = read_header(path, DISPLAY, INPUT)
    return comfy_qwen.text_kind(header) in COMFY_KINDS and comfy_qwen.has_lm_head(header)


def _comfy_file_handle(path: Path, memory: MemoryOptions | None) -> ModelHandle:
    """A handle on a Comfy-format Qwen2.5-VL / Qwen3-VL file: ComfyUI's bundled tokenizer, the released image
    processor settings."""
    from . import comfy_qwen, comfy_qwen21, qwen_image_files  # noqa: PLC0415
    from .comfy_files import read_header, weight_format  # noqa: PLC0415

    header = read_header(path, DISPLAY, INPUT)
    kind = comfy_qwen.text_kind(header)
    if kind not in COMFY_KINDS or not comfy_qwen.has_lm_head(header):
        raise ModelFolderError(
            f"{DISPLAY} {INPUT}: {path.name} cannot generate text (got {comfy_qwen.describe(header)}"
            f"{'' if comfy_qwen.has_lm_head(header) else ' without lm_head'}, expected a Qwen2.5-VL or Qwen3-VL file "
            "with its lm_head). Pick a Qwen-VL Instruct folder from models/vlm/.")
    weight_format(header, DISPLAY, INPUT)
    config = (comfy_qwen21 if kind == "qwen3_vl" else comfy_qwen).text_config(header)
    hidden, layers = config.text_config.hidden_size, config.text_config.num_hidden_layers
    params = sum(_numel(s) for s in header.shapes.values())
    arch = ARCHITECTURES[kind]
    tok = qwen_image_files.tokenizer_dir()
    return ModelHandle(BACKEND, _variant(kind, arch, hidden, layers, params),
                       (("model", str(path)), ("tokenizer", str(tok)), ("processor", str(tok))),
                       memory or MemoryOptions(), (
        ("architecture", kind), ("params", human_count(params)), ("layers", str(layers)),
        ("hidden", str(hidden)), ("images", "yes"), ("chat_template", "built-in Qwen format"),
        ("layout", COMFY_LAYOUT)))


def resolve(name: str) -> Path:
    """A dropdown value -> folder inside the registered roots (vlm first, then the nested VLMs), or a Comfy-format
    text-encoder file ('text_encoders/<file>')."""
    if isinstance(name, str) and name.startswith(COMFY_FILES):
        from .comfy_files import resolve_file  # noqa: PLC0415
        from .qwen_image_files import TEXT_KEYS  # noqa: PLC0415

        return resolve_file(DISPLAY, INPUT, name[len(COMFY_FILES):], TEXT_KEYS)
    try:
        return resolve_model_folder(DISPLAY, INPUT, name, FOLDER_KEYS)
    except InputError:
        # Not under models/vlm/: it may be '<pipeline>/text_encoder' or '<DeepGen folder>/vlm' (same confinement).
        for keys, sub, _ in NESTED:
            if isinstance(name, str) and name.endswith("/" + sub):
                try:
                    return resolve_model_folder(DISPLAY, INPUT, name, keys)
                except InputError:
                    continue
        return resolve_model_folder(DISPLAY, INPUT, name, FOLDER_KEYS)  # the message about models/vlm/


def _variant(model_type: str, arch: Architecture, hidden: int, layers: int, params: int) -> str:
    size = SIZE_NAMES.get((model_type, hidden, layers))
    if size:
        return f"{arch.family}-{size}"
    return f"{arch.family} ({human_count(params)} params, {layers} layers x {hidden})"


def _not_vlm(folder: Path, found: str) -> ModelFolderError:
    what = identify_folder(folder)
    said = f"{found}; it looks like {what.backend_display} {what.variant}" if what else found
    return ModelFolderError(
        f"{DISPLAY} {INPUT}: {folder.name} is not a Qwen-VL model (got {said}, expected a Qwen2-VL, Qwen2.5-VL or "
        "Qwen3-VL Instruct folder: config.json with model_type qwen2_vl / qwen2_5_vl / qwen3_vl, safetensors "
        "weights, tokenizer and preprocessor files). Pick another folder, or use the loader of that model.")


def identify(path: Path) -> str | None:
    """The variant of a Qwen-VL folder (for loaders/identify.py), or None when it is not one."""
    return variant_of(path, looks_like_vlm, lambda p: inspect_folder(p).variant, "(incomplete Qwen-VL folder)")


def inspect_folder(folder: Path, tokenizer_dir: Path | None = None) -> VlmInfo:
    """Validate a Qwen-VL folder and detect its architecture and size; errors say what was found.

    ``tokenizer_dir``: where the caller found the tokenizer (a user that needs no image processor, e.g. DeepGen,
    whose vision input is preprocessed by its own code); the folder's processor files are then optional."""
    if not folder.is_dir():
        raise _not_vlm(folder, "no folder")
    if not (folder / "config.json").is_file():
        raise _not_vlm(folder, f"no config.json among {sorted(p.name for p in folder.iterdir())[:10]}")
    config = read_json(folder / "config.json", DISPLAY, "config.json")
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise _not_vlm(folder, f"config.json model_type={model_type!r}")
    arch = ARCHITECTURES[model_type]
    text = config.get("text_config") or config  # transformers 5 nests it; the hub's Qwen2/2.5 configs are flat
    hidden, layers = int(text.get("hidden_size", 0)), int(text.get("num_hidden_layers", 0))
    vision = config.get("vision_config") or {}
    headers = weight_files(folder, DISPLAY, "weights")
    shapes = tensor_shapes(headers)
    params = sum(_numel(s) for s in shapes.values())
    embeds = [s for k, s in shapes.items() if k.endswith("embed_tokens.weight")]
    if not embeds or len(embeds[0]) != 2 or embeds[0][1] != hidden:
        got = f"embed_tokens {embeds[0]}" if embeds else "no embed_tokens weight"
        raise ModelFolderError(
            f"{DISPLAY} weights: they do not match config.json (got {got}, expected [vocab, {hidden}] as config.json "
            "says). The weights belong to another model: re-download the folder.")
    if not any(k.startswith(("visual.", "model.visual.")) for k in shapes):
        raise ModelFolderError(
            f"{DISPLAY} weights: no vision tower (got only language-model weights, expected visual.* tensors). This is "
            "a text-only checkpoint: download the full Qwen-VL Instruct folder.")
    in_pipeline = folder.name == TEXT_ENCODER and (folder.parent / "model_index.json").is_file()
    if tokenizer_dir is None:
        processor_dir, tokenizer_dir = _companions(folder, in_pipeline)
    else:
        processor_dir = folder if any((folder / f).is_file() for f in IMAGE_PROCESSOR_FILES) else None
    chat = any((d / f).is_file() for d in {processor_dir or folder, tokenizer_dir} for f in CHAT_TEMPLATE_FILES) or \
        _tokenizer_has_template(tokenizer_dir)
    return VlmInfo(model_type, arch, _variant(model_type, arch, hidden, layers, params), params, hidden, layers,
                   int(vision.get("depth", 0)), folder, processor_dir, tokenizer_dir, chat)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _companions(folder: Path, in_pipeline: bool) -> tuple[Path | None, Path]:
    """(image processor folder or None, tokenizer folder) for a VLM folder or a pipeline's text encoder."""
    if in_pipeline:
        root = folder.parent
        processor = root / "processor"
        has_proc = any((processor / f).is_file() for f in IMAGE_PROCESSOR_FILES)
        tokenizer = processor if has_proc else root / "tokenizer"
        if not any((tokenizer / f).is_file() for f in TOKENIZER_FILES):
            raise ModelFolderError(
                f"{DISPLAY} tokenizer: missing (got no tokenizer files in {tokenizer}, expected tokenizer.json or "
                "vocab.json + merges.txt). Download the pipeline's tokenizer/ folder.")
        return (processor if has_proc else None), tokenizer
    if not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise ModelFolderError(
            f"{DISPLAY} tokenizer: missing (got no tokenizer.json or vocab.json in {folder}, expected the tokenizer "
            "files of the Instruct repository). Download the complete model folder.")
    if not any((folder / f).is_file() for f in IMAGE_PROCESSOR_FILES):
        raise ModelFolderError(
            f"{DISPLAY} preprocessor: missing (got no preprocessor_config.json in {folder}, expected the image "
            "processor settings of the Instruct repository). Download the complete model folder.")
    return folder, folder


def _tokenizer_has_template(folder: Path) -> bool:
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return False
    return bool(read_json(config, DISPLAY, "tokenizer_config.json").get("chat_template"))


def load_handle(model_name: str, memory: MemoryOptions | None) -> ModelHandle:
    """What GentorLoadPromptEnhancer does: resolve, validate, detect; weights load lazily at first use."""
    folder = resolve(model_name)
    if folder.is_file():
        return _comfy_file_handle(folder, memory)
    info = inspect_folder(folder)
    paths = [("model", str(info.model_dir)), ("tokenizer", str(info.tokenizer_dir))]
    if info.processor_dir is not None:
        paths.append(("processor", str(info.processor_dir)))
    return ModelHandle(BACKEND, info.variant, tuple(paths), memory or MemoryOptions(), (
        ("architecture", info.model_type), ("params", human_count(info.params)), ("layers", str(info.layers)),
        ("hidden", str(info.hidden)), ("images", "yes" if info.processor_dir else "no"),
        ("chat_template", "folder" if info.chat_template else "built-in Qwen format")))


# ----------------------------------------------------------------------------- building components
def model_class(model_type: str) -> type:
    import transformers  # noqa: PLC0415

    return getattr(transformers, ARCHITECTURES[model_type].class_name)


def load_qwen_vl(folder: str | Path, precision: Precision | None, source: Any = None, skip: tuple[str, ...] = ()) -> Any:
    """THE loader of kinds qwen2_vl / qwen2_5_vl / qwen3_vl: every backend sharing these files uses it, so
    the cached copy is the same class whoever loads it first (streams tensors; old and new key layouts)."""
    from .streaming import load_transformers  # noqa: PLC0415

    folder = Path(folder)
    if folder.is_file():  # a Comfy-format file: its own loader (shared with Qwen-Image's file loaders)
        from . import qwen_image21_files, qwen_image_files  # noqa: PLC0415
        from .comfy_files import read_header  # noqa: PLC0415
        from .comfy_qwen import text_kind  # noqa: PLC0415

        qwen3 = text_kind(read_header(folder, DISPLAY, INPUT)) == "qwen3_vl"
        return (qwen_image21_files if qwen3 else qwen_image_files).load_text_encoder(folder, precision, source, skip)
    model_type = _model_type(folder)
    if model_type not in ARCHITECTURES:
        raise _not_vlm(folder, f"config.json model_type={model_type!r}")
    return load_transformers(model_class(model_type), folder, precision, skip, source, DISPLAY, "model")


def load_processor(tokenizer_dir: str | Path, processor_dir: str | Path | None) -> Any:
    """The processor (tokenizer + image processor) or, without image processor files, the tokenizer alone.

    A folder without a chat template gets the Qwen chat format (QWEN_CHAT_TEMPLATE)."""
    from transformers import AutoProcessor, AutoTokenizer  # noqa: PLC0415

    try:
        if processor_dir is not None:
            proc = AutoProcessor.from_pretrained(processor_dir)
            tok = proc.tokenizer
        else:
            proc = tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelFolderError(f"{DISPLAY} tokenizer: could not be read from {processor_dir or tokenizer_dir} "
                               f"({exc}). Re-download the tokenizer and preprocessor files.") from exc
    if not getattr(proc, "chat_template", None):
        proc.chat_template = QWEN_CHAT_TEMPLATE
    if not getattr(tok, "chat_template", None):
        tok.chat_template = QWEN_CHAT_TEMPLATE
    return proc


def kind_of(handle: ModelHandle) -> str:
    return ARCHITECTURES[handle.info_dict["architecture"]].kind


def load_components(handle: ModelHandle, plan: Plan, session: Session) -> dict[str, Any]:
    """Fetch the model and its processor through the shared cache (reads the disk only when needed)."""
    s = spec()
    model_dir = handle.path("model")
    processor_dir = dict(handle.paths).get("processor")
    tokenizer_dir = handle.path("tokenizer")
    skip = tuple(s.fp8_skip)
    precision = plan.precision
    if handle.info_dict.get("layout") == COMFY_LAYOUT:
        # As Qwen-Image's file loader decides for the same file, so both name one cache entry.
        from .comfy_files import read_header, weight_format  # noqa: PLC0415
        from .qwen_image_files import load_processor as comfy_processor, precision_for  # noqa: PLC0415

        header = read_header(model_dir, DISPLAY, INPUT)
        precision, skip = precision_for(header, weight_format(header, DISPLAY, INPUT), plan, handle.memory, skip,
                                        False)
        if handle.info_dict["architecture"] == "qwen3_vl":  # the processor Qwen-Image 2.1's file loader caches
            from .comfy_qwen21 import PROCESSOR_CONFIG_FILE  # noqa: PLC0415
            from .qwen_image21_files import load_processor as comfy_processor21  # noqa: PLC0415

            key, make = str(PROCESSOR_CONFIG_FILE), comfy_processor21
        else:
            key, make = tokenizer_dir, comfy_processor
        processor = session.get("qwen_vl_processor", key, lambda _p, _s: make(Path(tokenizer_dir)),
                                None, user=BACKEND, display=DISPLAY)
        processor.value.chat_template = processor.value.chat_template or QWEN_CHAT_TEMPLATE
        processor.value.tokenizer.chat_template = processor.value.tokenizer.chat_template or QWEN_CHAT_TEMPLATE
    model = session.get(kind_of(handle), model_dir,
                        lambda prec, source: load_qwen_vl(model_dir, prec, source, skip),
                        precision, user=BACKEND, display=DISPLAY, skip=skip)
    if handle.info_dict.get("layout") == COMFY_LAYOUT:
        return {"model": model, "processor": processor}
    processor = session.get("qwen_vl_processor", processor_dir or tokenizer_dir,
                            lambda _precision, _source: load_processor(tokenizer_dir, processor_dir),
                            None, user=BACKEND, display=DISPLAY)
    return {"model": model, "processor": processor}
