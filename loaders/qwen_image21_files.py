"""Qwen-Image 2.1 from Comfy-Org's files: the transformer (``diffusion_models`` / ``unet``, safetensors or GGUF),
the Qwen3-VL-8B text encoder (``text_encoders`` / ``clip``) and the 2.1 VAE (``vae``) — DESIGN.md §4.

``loaders/qwen_image_files.py`` lists and resolves the three files and hands a 2.1 transformer here
(``inspect``); the components built here are the ones the 2.1 diffusers folder gives
(``loaders/qwen_image21.py``), so the same 2.1 pipeline runs on them. Key layouts: ``loaders/comfy_qwen21.py``;
the fused SwiGLU split and the VAE's time kernels: ``loaders/comfy_remap.py``. The processor is ComfyUI's bundled
Qwen2 tokenizer with Qwen3-VL's image settings, the scheduler ComfyUI's sampling of this model (shipped JSON).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .. import registry
from ..errors import ModelFolderError, fmt
from . import comfy_qwen as cq
from . import comfy_qwen21 as cq21
from .cache import ModelHandle, Session
from .comfy_files import FileHeader, read_header, weight_format
from .comfy_loading import fetch, file_loader, load_tokenizer, precision_for, tokenizer_dir, vae_precision
from .comfy_quant import comfy_rename
from .comfy_remap import RemappedTensors, split_format, split_header
from .memory import Plan, Precision

BACKEND = "Qwen-Image"  # comfy_loading.BACKEND
VARIANT = "qwen-image-2.1"
TASK = "qi21"  # loaders/qwen_image21.TASK: the 2.1 generation
KINDS = {"transformer": "qwen_image21_transformer", "vae": "autoencoder_kl_qwen_image21", "text_encoder": "qwen3_vl",
         "processor": "qwen_vl_processor", "scheduler": "scheduler"}
ROLES = {"transformer": "diffusion_model", "text_encoder": "text_encoder", "vae": "vae"}


def _mismatch(what: str, a: tuple[str, Path], b: tuple[str, Path], got: str, expected: str, todo: str) -> ModelFolderError:
    return ModelFolderError(fmt(BACKEND, f"{a[0]} + {b[0]}", f"{what} ({a[1].name} and {b[1].name})", got, expected,
                                todo))


def inspect(th: FileHeader, dm: Path, eh: FileHeader, te: Path, vh: FileHeader, vae: Path) -> None:
    """Check a 2.1 transformer's trio from the headers (no weight read); a mismatch names both files."""
    if eh.container != "safetensors" or cq.text_kind(eh) != "qwen3_vl":
        raise _mismatch("the text encoder is not Qwen-Image 2.1's", ("diffusion_model", dm), ("text_encoder", te),
                        cq.describe(eh), "the Qwen3-VL-8B text encoder (e.g. qwen3vl_8b_bf16.safetensors)",
                        "Pick the Qwen3-VL file released with Qwen-Image 2.1 (Comfy-Org/Qwen-Image-2.1)")
    width, joint = cq21.text_hidden(eh), th.shapes["txt_in.in_layer.weight"][1]
    if width != joint:
        raise _mismatch("text encoder width does not fit the transformer", ("diffusion_model", dm),
                        ("text_encoder", te), f"{width} channels", f"{joint} (the transformer's txt_in input)",
                        "Pick the text encoder released with this transformer")
    in_ch = th.shapes["img_in.weight"][1]
    if cq.vae_kind(vh) != "qwen_image21_vae" or cq.vae_latent_channels(vh) != in_ch:
        raise _mismatch("the VAE does not fit the Qwen-Image 2.1 transformer", ("diffusion_model", dm), ("vae", vae),
                        cq.describe(vh), f"the Qwen-Image 2.1 VAE ({in_ch} latent channels, RGBA)",
                        "Pick qwen_image_2.1_vae_bf16.safetensors, the VAE released with Qwen-Image 2.1")


def configs(handle: ModelHandle) -> tuple[dict, dict]:
    """(transformer config, VAE config) from the headers, for the memory check."""
    th = read_header(handle.path("diffusion_model"), BACKEND, "diffusion_model")
    vh = read_header(handle.path("vae"), BACKEND, "vae")
    return cq21.transformer_config(th), cq21.vae_config(vh)


# ----------------------------------------------------------------------------- one component each
def load_transformer(path: str | Path, prec: Precision, source: Any, skip: tuple[str, ...]) -> Any:
    from diffusers import QwenImage21Transformer2DModel  # noqa: PLC0415

    header = read_header(path, BACKEND, "diffusion_model")
    wfmt = split_format(weight_format(header, BACKEND, "diffusion_model"), cq21.split_fused)
    config = cq21.transformer_config(header)
    build = lambda: QwenImage21Transformer2DModel.from_config(config)  # noqa: E731
    tensors = RemappedTensors(header, cq21.split_fused, display=BACKEND, component="diffusion_model")
    return file_loader(build, split_header(header, cq21.split_fused), wfmt, comfy_rename(header.prefix),
                       "diffusion_model", tensors)(prec, source, skip)


def load_text_encoder(path: str | Path, prec: Precision | None, source: Any = None, skip: tuple[str, ...] = ()) -> Any:
    """THE loader of a Comfy-format Qwen3-VL file (kind qwen3_vl): Qwen-Image 2.1 and the prompt enhancer share it."""
    from transformers import Qwen3VLForConditionalGeneration  # noqa: PLC0415

    header = read_header(path, BACKEND, "text_encoder")
    wfmt = weight_format(header, BACKEND, "text_encoder")
    config = cq21.text_config(header)
    dtype = prec.base if prec is not None else torch.float32
    comfy, text = comfy_rename(header.prefix), cq21.text_rename("")

    def rename(key: str) -> str | None:
        name = comfy(key)
        return None if name is None else text(name)

    def build() -> Any:
        return Qwen3VLForConditionalGeneration._from_config(config, dtype=dtype)
    model = file_loader(build, header, wfmt, rename, "text_encoder")(prec, source, skip)
    model.gentor_has_lm_head = cq.has_lm_head(header)
    return model


def load_vae(path: str | Path, prec: Precision, source: Any) -> Any:
    from ..modeling.qwen_image.vae import still_image_vae21  # noqa: PLC0415
    from .comfy_files import WeightFormat  # noqa: PLC0415
    header = read_header(path, BACKEND, "vae")
    config = cq21.vae_config(header)
    build = lambda: still_image_vae21().from_config(config)  # noqa: E731
    tensors = RemappedTensors(header, squeeze_time=True, display=BACKEND, component="vae")
    return file_loader(build, header, WeightFormat("vae"), cq21.vae_rename(header), "vae", tensors)(prec, source, ())


def load_processor(tokenizer_dir: Path) -> Any:
    """Qwen3-VL processor: ComfyUI's bundled Qwen2 tokenizer + Qwen3-VL's image settings (shipped JSON)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor  # noqa: PLC0415
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor  # noqa: PLC0415

    from .qwen_chat import QWEN_CHAT_TEMPLATE  # noqa: PLC0415

    cfg = json.loads(cq21.PROCESSOR_CONFIG_FILE.read_text(encoding="utf-8"))
    cfg.pop("_comment", None)
    sizes = {k: cfg[k] for k in ("size", "patch_size", "temporal_patch_size", "merge_size")}
    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessor(**cfg), tokenizer=load_tokenizer(tokenizer_dir),
                            video_processor=Qwen3VLVideoProcessor(**sizes), chat_template=QWEN_CHAT_TEMPLATE)


def load_scheduler() -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: PLC0415

    cfg = json.loads(cq21.SCHEDULER_CONFIG_FILE.read_text(encoding="utf-8"))
    cfg.pop("_comment", None)
    return FlowMatchEulerDiscreteScheduler.from_config(cfg)


# ----------------------------------------------------------------------------- all of them
def load_components(handle: ModelHandle, plan: Plan, session: Session) -> dict[str, Any]:
    """The 2.1 pipeline's five components through the shared cache (one entry per file identity)."""
    spec = registry.get("qwen_image")
    tok = tokenizer_dir()
    out: dict[str, Any] = {}
    for comp, role in ROLES.items():
        path = handle.path(role)
        header = read_header(path, BACKEND, role)
        if comp == "vae":
            prec, skip = vae_precision(plan), ()
            load = lambda p, s, _path=path: load_vae(_path, p, s)  # noqa: E731
        elif comp == "transformer":
            wfmt = split_format(weight_format(header, BACKEND, role), cq21.split_fused)
            prec, skip = precision_for(split_header(header, cq21.split_fused), wfmt, plan, handle.memory,
                                       spec.fp8_skip, True)
            load = lambda p, s, _path=path, _k=skip: load_transformer(_path, p, s, _k)  # noqa: E731
        else:
            prec, skip = precision_for(header, weight_format(header, BACKEND, role), plan, handle.memory,
                                       spec.fp8_skip, False)
            load = lambda p, s, _path=path, _k=skip: load_text_encoder(_path, p, s, _k)  # noqa: E731
        out[comp] = fetch(session, KINDS[comp], role, path, load, prec, skip, f"{BACKEND} 2.1 {comp}")
    out["processor"] = session.get(KINDS["processor"], str(cq21.PROCESSOR_CONFIG_FILE),
                                   lambda _p, _s: load_processor(tok), None, user=f"{BACKEND} 2.1 processor",
                                   display=BACKEND)
    out["scheduler"] = session.get(KINDS["scheduler"], str(cq21.SCHEDULER_CONFIG_FILE),
                                   lambda _p, _s: load_scheduler(), None, user=f"{BACKEND} 2.1 scheduler",
                                   display=BACKEND)
    return out
