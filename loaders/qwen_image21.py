"""Qwen-Image 2.1 folders (diffusers ``QwenImage21Pipeline``) -> cached components.

Layout (diffusers ``save_pretrained``): ``model_index.json`` (``_class_name`` QwenImage21Pipeline, optional
``sample_sigmas``), ``transformer/`` (QwenImage21Transformer2DModel: single-stream, block-causal, 64 latent
channels unpatched), ``vae/`` (AutoencoderKLQwenImage21: RGBA, 16x), ``text_encoder/`` (a Qwen3-VL
checkpoint), ``processor/`` (Qwen3VLProcessor), ``scheduler/``. Detected from these files, never from the name.

The text encoder is cached under the architecture's kind ``qwen3_vl`` and loaded by the prompt enhancer's own
loader (``loaders.vlm.load_qwen_vl``), so the enhancer naming the same folder shares the one copy.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import registry
from ..errors import ModelFolderError
from . import lora as lora_files
from . import streaming
from .cache import Session
from .files import read_json, tensor_shapes, weight_files
from .memory import Plan, Precision

BACKEND = "Qwen-Image"
PIPELINE_CLASS = "QwenImage21Pipeline"
TASK = "qi21"
VARIANT = "qwen-image-2.1"
COMPONENTS = ("transformer", "vae", "text_encoder", "processor", "scheduler")
WEIGHTED = ("transformer", "vae", "text_encoder")
CLASSES = {"transformer": "QwenImage21Transformer2DModel", "vae": "AutoencoderKLQwenImage21"}
TEXT_MODEL_TYPE = "qwen3_vl"
KINDS = {"transformer": "qwen_image21_transformer", "vae": "autoencoder_kl_qwen_image21",
         "text_encoder": TEXT_MODEL_TYPE, "processor": "qwen_vl_processor", "scheduler": "scheduler"}
TELLTALE_KEYS = ("img_in.weight", "txt_in.in_layer.weight", "modulation.1.weight")
# Qwen3-VL vision placeholders keep each reference's tokens; 10 is the model's published maximum.
MAX_REFERENCES = 10


@dataclass(frozen=True)
class Info:
    num_layers: int
    inner_dim: int
    text_hidden: int
    sample_sigmas: tuple[float, ...] | None


def inspect_folder(path: Path, index: dict) -> Info:
    """Validate a 2.1 folder (configs + weight headers); errors say what was found."""
    for comp in COMPONENTS:
        if not (path / comp).is_dir():
            raise ModelFolderError(
                f"{BACKEND} model_name: component '{comp}' missing (got no {comp}/ in {path}, expected the "
                f"{PIPELINE_CLASS} components {', '.join(COMPONENTS)}). Download the complete model folder.")
    for comp, cls in CLASSES.items():
        config = read_json(path / comp / "config.json", BACKEND, f"{comp} config")
        if config.get("_class_name") != cls:
            raise ModelFolderError(
                f"{BACKEND} {comp}: wrong model class for Qwen-Image 2.1 (got {config.get('_class_name')!r}, "
                f"expected {cls!r}). This folder mixes in another model's {comp}.")
    text = read_json(path / "text_encoder" / "config.json", BACKEND, "text_encoder config")
    if text.get("model_type") != TEXT_MODEL_TYPE:
        raise ModelFolderError(
            f"{BACKEND} text_encoder: not a Qwen3-VL model (got model_type={text.get('model_type')!r}, expected "
            f"{TEXT_MODEL_TYPE!r}). Qwen-Image 2.1 encodes prompts with Qwen3-VL: re-download text_encoder/.")
    shapes = tensor_shapes(weight_files(path / "transformer", BACKEND, "transformer"))
    missing = [k for k in TELLTALE_KEYS if k not in shapes]
    if missing:
        raise ModelFolderError(
            f"{BACKEND} transformer: weights are not a Qwen-Image 2.1 transformer (got no {', '.join(missing)}, "
            f"expected {', '.join(TELLTALE_KEYS)}). Re-download transformer/.")
    for comp in ("vae", "text_encoder"):
        weight_files(path / comp, BACKEND, comp)
    layers = len({k.split(".")[1] for k in shapes if k.startswith("transformer_blocks.")})
    text_hidden = int(text.get("text_config", {}).get("hidden_size", 0))
    sigmas = index.get("sample_sigmas")
    return Info(layers, shapes["img_in.weight"][0], text_hidden, tuple(sigmas) if sigmas else None)


def load_components(path: Path, plan: Plan, session: Session) -> dict[str, Any]:
    """Fetch every 2.1 component through the shared cache (reads from disk only when needed)."""
    import diffusers  # noqa: PLC0415
    from transformers import AutoProcessor  # noqa: PLC0415

    from ..modeling.qwen_image.vae import still_image_vae21  # noqa: PLC0415
    from .vlm import load_qwen_vl  # noqa: PLC0415

    spec = registry.get("qwen_image")
    precision = plan.precision
    full = Precision(precision.base, precision.base)
    skip = spec.fp8_skip

    def diffusers_loader(comp: str):
        # The VAE: diffusers' own, minus the video frame caches on one-frame (still image) encodes and decodes.
        cls = still_image_vae21() if comp == "vae" else getattr(diffusers, CLASSES[comp])

        def load(prec: Precision | None, source: Any) -> Any:
            return streaming.load_diffusers(cls, path / comp, prec, skip, source=lora_files.base_view(source),
                                            display=BACKEND, component=comp)
        return load

    loaders = {
        "transformer": diffusers_loader("transformer"),
        "vae": diffusers_loader("vae"),
        "text_encoder": lambda prec, source: load_qwen_vl(path / "text_encoder", prec, source, skip),
        "processor": lambda _p, _s: AutoProcessor.from_pretrained(path / "processor"),
        "scheduler": lambda _p, _s: diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler"),
    }
    out = {}
    for comp in COMPONENTS:
        prec = (full if comp in spec.fp8_exclude else precision) if comp in WEIGHTED else None
        try:
            out[comp] = session.get(KINDS[comp], str(path / comp), loaders[comp], prec, user=f"{BACKEND} 2.1 {comp}",
                                    display=BACKEND, skip=skip if prec is not None and prec.cast else ())
        except (OSError, ValueError) as exc:
            raise ModelFolderError(f"{BACKEND} {comp}: could not be loaded from {path / comp} ({exc}). "
                                   "Check the component's files or re-download them.") from exc
    return out
