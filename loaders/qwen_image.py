"""Qwen-Image / -2512 / Edit / Edit-2509 / Edit-2511 / 2.1 folders -> cached diffusers components.

Layout: the Hugging Face diffusers pipeline folder (backend_specs.md §4.2). The variant is read
from model_index.json, the transformer config and the transformer's weight header — never from
the folder name. Releases that share an architecture with an earlier one (Qwen-Image-2512 with
Qwen-Image) are told apart by the model card the hub repository ships (README.md). Qwen-Image 2.1
(another architecture) is validated and loaded by loaders/qwen_image21.py.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import registry
from ..errors import ModelFolderError
from .cache import ModelHandle, Session
from .files import list_model_folders, read_json, resolve_model_folder, tensor_shapes, weight_files
from .identify import variant_of
from . import lora as lora_files
from . import qwen_image21, streaming
from .memory import MemoryOptions, Plan, Precision

log = logging.getLogger(__name__)

BACKEND = "Qwen-Image"
FOLDER_KEYS = ("qwen_image", "diffusers")
# model_index.json _class_name -> task family
PIPELINE_TASKS = {
    "QwenImagePipeline": "t2i",
    "QwenImageEditPipeline": "edit",
    "QwenImageEditPlusPipeline": "edit_plus",
    qwen_image21.PIPELINE_CLASS: qwen_image21.TASK,
}
TASK_21 = qwen_image21.TASK
MODEL_CARD = "README.md"
MODEL_CARD_BYTES = 8192  # the title and front matter are at the top
# Release names in a model card -> variant, for releases whose files match an earlier architecture.
CARD_VARIANTS = {"t2i": (("Qwen-Image-2512", "qwen-image-2512"),)}
COMPONENTS = {
    "t2i": ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    "edit": ("transformer", "vae", "text_encoder", "tokenizer", "scheduler", "processor"),
    "edit_plus": ("transformer", "vae", "text_encoder", "tokenizer", "scheduler", "processor"),
}
WEIGHTED = ("transformer", "vae", "text_encoder")
# Cache kinds name the architecture (not the backend), so e.g. a Qwen2.5-VL folder used as a Qwen-Image text
# encoder and by the prompt enhancer is one copy.
KINDS = {
    "transformer": "qwen_image_transformer",
    "vae": "autoencoder_kl_qwen_image",
    "text_encoder": "qwen2_5_vl",
    "tokenizer": "tokenizer",
    "scheduler": "scheduler",
    "processor": "processor",
}
# Telltale transformer keys (as in ComfyUI's own detection): text-stream norm + packed-latent input.
TELLTALE_KEYS = ("txt_norm.weight", "img_in.weight")
PACKED_LATENT_CHANNELS = 64


@dataclass(frozen=True)
class QwenImageInfo:
    task: str  # t2i | edit | edit_plus
    variant: str  # qwen-image | qwen-image-edit | qwen-image-edit-plus | qwen-image-edit-2511
    zero_cond_t: bool
    num_layers: int
    inner_dim: int
    path: Path


def looks_like_pipeline(path: Path) -> bool:
    """Cheap dropdown filter: a model_index.json naming a Qwen-Image pipeline class."""
    index = path / "model_index.json"
    if not index.is_file():
        return False
    try:
        return read_json(index, BACKEND, "model_index.json").get("_class_name") in PIPELINE_TASKS
    except ModelFolderError:
        return False


def list_models() -> list[str]:
    return list_model_folders(FOLDER_KEYS, looks_like_pipeline)


def identify(path: Path) -> str | None:
    """The variant of a Qwen-Image pipeline folder (for loaders/identify.py), or None when it is not one."""
    return variant_of(path, looks_like_pipeline, lambda p: inspect_folder(p).variant, "(incomplete pipeline folder)")


def inspect_folder(path: Path) -> QwenImageInfo:
    """Validate a pipeline folder and detect its variant; errors say what was found."""
    index_path = path / "model_index.json"
    if not index_path.is_file():
        found = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else "no folder"
        raise ModelFolderError(
            f"{BACKEND} model_name: {path.name} is not a Qwen-Image pipeline folder (got {found}, expected "
            "model_index.json with transformer/, vae/, text_encoder/, tokenizer/, scheduler/). "
            "Download the diffusers-format repository (e.g. Qwen/Qwen-Image) into models/qwen_image/.")
    index = read_json(index_path, BACKEND, "model_index.json")
    cls = index.get("_class_name")
    if cls not in PIPELINE_TASKS:
        raise ModelFolderError(
            f"{BACKEND} model_name: {path.name} holds a {cls} pipeline (got _class_name={cls!r}, expected one of "
            f"{', '.join(PIPELINE_TASKS)}). Use the loader for that model family, or pick a Qwen-Image folder.")
    task = PIPELINE_TASKS[cls]
    if task == TASK_21:
        info21 = qwen_image21.inspect_folder(path, index)
        return QwenImageInfo(task, qwen_image21.VARIANT, False, info21.num_layers, info21.inner_dim, path)
    for comp in COMPONENTS[task]:
        if not (path / comp).is_dir():
            raise ModelFolderError(
                f"{BACKEND} model_name: component '{comp}' missing (got no {comp}/ in {path}, expected the "
                f"{cls} components {', '.join(COMPONENTS[task])}). Download the complete model folder.")
    config = read_json(path / "transformer" / "config.json", BACKEND, "transformer config")
    if config.get("_class_name") != "QwenImageTransformer2DModel":
        raise ModelFolderError(
            f"{BACKEND} transformer: wrong model class (got {config.get('_class_name')!r}, expected "
            "'QwenImageTransformer2DModel'). This folder mixes in another model's transformer.")
    for comp in WEIGHTED:
        read_json(path / comp / "config.json", BACKEND, f"{comp} config")
    headers = weight_files(path / "transformer", BACKEND, "transformer")
    shapes = tensor_shapes(headers)
    missing = [k for k in TELLTALE_KEYS if k not in shapes]
    if missing or shapes["img_in.weight"][1] != PACKED_LATENT_CHANNELS:
        raise ModelFolderError(
            f"{BACKEND} transformer: weights are not a Qwen-Image MMDiT (got keys without {missing or 'img_in 64'}, "
            f"expected {', '.join(TELLTALE_KEYS)} with {PACKED_LATENT_CHANNELS} input channels). Re-download it.")
    for comp in ("vae", "text_encoder"):
        weight_files(path / comp, BACKEND, comp)
    layers = len({k.split(".")[1] for k in shapes if k.startswith("transformer_blocks.")})
    zero_cond_t = bool(config.get("zero_cond_t", False))
    variant = {"t2i": "qwen-image", "edit": "qwen-image-edit"}.get(
        task, "qwen-image-edit-2511" if zero_cond_t else "qwen-image-edit-plus")
    variant = _card_variant(path, task) or variant
    return QwenImageInfo(task, variant, zero_cond_t, layers, shapes["img_in.weight"][0], path)


def _card_variant(path: Path, task: str) -> str | None:
    """A release named in the folder's model card (only for releases the weights cannot tell apart)."""
    card = path / MODEL_CARD
    if not card.is_file():
        return None
    with card.open("rb") as f:
        head = f.read(MODEL_CARD_BYTES).decode("utf-8", errors="replace")
    for release, variant in CARD_VARIANTS.get(task, ()):
        if release in head:
            return variant
    return None


def load_handle(model_name: str, memory: MemoryOptions | None, engine: str = "diffusers") -> ModelHandle:
    """What GentorLoadQwenImage does: resolve, validate, detect; weights load lazily at first use. The engine
    (diffusers / diffsynth / diffsynth-or-diffusers) is checked when a run starts, where it can fall back."""
    from .qwen_image_diffsynth import check_engine  # noqa: PLC0415

    check_engine(engine)
    path = resolve_model_folder(BACKEND, "model_name", model_name, FOLDER_KEYS)
    info = inspect_folder(path)
    return ModelHandle("qwen_image", info.variant, (("pipeline", str(path)),), memory or MemoryOptions(),
                       (("task", info.task), ("layers", str(info.num_layers)),
                        ("inner_dim", str(info.inner_dim)), ("zero_cond_t", str(info.zero_cond_t).lower()),
                        ("engine", engine)))


def _module_loader(cls: Any, folder: Path, skip: tuple[str, ...], component: str) -> Any:
    """``load(precision, source)`` for the cache: stream the files (converted tensor by tensor to their
    resting dtype, no file left mapped), or convert a cached wider copy without touching the disk."""
    stream = streaming.load_transformers if hasattr(cls, "config_class") else streaming.load_diffusers

    def load(precision: Precision | None, source: Any) -> Any:
        # A cached wider copy may carry LoRA layers: derive from its base weights only.
        return stream(cls, folder, precision, skip, source=lora_files.base_view(source), display=BACKEND,
                      component=component)
    return load


def load_components(path: Path, task: str, plan: Plan, session: Session) -> dict[str, Any]:
    """Fetch every component through the shared cache (reads from disk only when needed)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel  # noqa: PLC0415
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration, Qwen2VLProcessor  # noqa: PLC0415

    from ..modeling.qwen_image.vae import StillImageQwenImageVAE  # noqa: PLC0415

    spec = registry.get("qwen_image")
    precision = plan.precision
    full = Precision(precision.base, precision.base)  # components kept out of FP8
    # The VAE: diffusers' own, minus the video frame caches on one-frame (still image) encodes and decodes.
    classes = {"transformer": QwenImageTransformer2DModel, "vae": StillImageQwenImageVAE,
               "text_encoder": Qwen2_5_VLForConditionalGeneration}
    weightless = {
        "tokenizer": lambda _p, _s: AutoTokenizer.from_pretrained(path / "tokenizer"),
        "scheduler": lambda _p, _s: FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler"),
        "processor": lambda _p, _s: Qwen2VLProcessor.from_pretrained(path / "processor"),
    }
    out = {}
    for comp in COMPONENTS[task]:
        if comp in WEIGHTED:
            prec = full if comp in spec.fp8_exclude else precision
            load = _module_loader(classes[comp], path / comp, spec.fp8_skip, comp)
        else:
            prec, load = None, weightless[comp]
        try:
            entry = session.get(KINDS[comp], str(path / comp), load, prec, user=f"{BACKEND} {comp}",
                                display=BACKEND, skip=spec.fp8_skip if prec is not None and prec.cast else ())
        except (OSError, ValueError) as exc:
            raise ModelFolderError(f"{BACKEND} {comp}: could not be loaded from {path / comp} ({exc}). "
                                   "Check the component's files or re-download them.") from exc
        out[comp] = entry
    return out
