"""Qwen-Image from the files ComfyUI users already have: a transformer in ``diffusion_models`` / ``unet``, the
Qwen2.5-VL text encoder in ``text_encoders`` / ``clip``, the VAE in ``vae`` (DESIGN.md §4).

Formats: bf16 / fp16 / plain FP8 / ComfyUI's scaled FP8 (old ``scale_weight`` and new ``comfy_quant`` forms,
mixed files too) safetensors, and GGUF transformers. The three files are checked against each other from their
headers before any weight is read. Configs come from diffusers' class defaults and the JSON in
``configs/qwen_image/``; the tokenizer is ComfyUI's bundled ``qwen25_tokenizer`` (found through glue).

Variants: the weights tell Qwen-Image 1.x from 2.1, and ComfyUI marks Edit-2511 files (``__index_timestep_zero__``).
Qwen-Image, -2512, Edit and Edit-2509 share one architecture and no tensor tells them apart, so ``variant = auto``
lets the task node decide (text to image: Qwen-Image's pipeline; edit: Edit-2509's multi-image pipeline), and
the ``variant`` input names the release where that matters (original Edit's single-image pipeline).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import registry
from ..errors import InputError, ModelFolderError, fmt
from . import comfy_qwen as cq
from . import qwen_image21_files as files21
from .cache import CACHE, ModelHandle, Session
from .comfy_files import FileHeader, WeightFormat, list_files, read_header, resolve_file, weight_format
from .comfy_loading import (AUTO, BACKEND, fetch, file_loader, load_tokenizer, precision_for, tokenizer_dir,
                            vae_precision)
from .comfy_loading import TOKENIZER  # noqa: F401 - this loader's folder name of ComfyUI's tokenizer, as before
from .comfy_quant import comfy_rename
from .memory import MemoryOptions, Plan, Precision

LAYOUT = "comfy_files"
DIFFUSION_KEYS = ("diffusion_models", "unet")
TEXT_KEYS = ("text_encoders", "clip")
VAE_KEYS = ("vae",)
# variant -> (task family, zero_cond_t); "auto" on an unmarked 1.x file: the task node picks (``handle_task``).
VARIANTS = {
    "qwen-image": ("t2i", False), "qwen-image-2512": ("t2i", False), "qwen-image-edit": ("edit", False),
    "qwen-image-edit-2509": ("edit_plus", False), "qwen-image-edit-2511": ("edit_plus", True),
}
VARIANT_CHOICES = (AUTO, *VARIANTS)
ANY_TASK = "any"
TASK_21 = "qi21"  # a Qwen-Image 2.1 trio (loaders/qwen_image21_files.py)
AUTO_VARIANT = "qwen-image-1.x"
AUTO_EDIT_TASK = "edit_plus"  # Edit-2509's pipeline: one or more references (the common Comfy files' release)
INPUTS = ("diffusion_model", "text_encoder", "vae")
KINDS = {"transformer": "qwen_image_transformer", "vae": "autoencoder_kl_qwen_image", "text_encoder": "qwen2_5_vl",
         "tokenizer": "tokenizer", "scheduler": "scheduler", "processor": "processor"}
PATH_ROLES = {"transformer": "diffusion_model", "text_encoder": "text_encoder", "vae": "vae"}


@dataclass(frozen=True)
class Trio:
    transformer: FileHeader
    transformer_format: WeightFormat
    text_encoder: FileHeader
    text_format: WeightFormat
    vae: FileHeader
    variant: str
    task: str  # t2i | edit | edit_plus | any
    zero_cond_t: bool


def list_transformers() -> list[str]:
    return list_files(DIFFUSION_KEYS, cq.is_qwen_transformer)


def list_text_encoders() -> list[str]:
    return list_files(TEXT_KEYS, cq.is_qwen_text_encoder)


def list_vaes() -> list[str]:
    return list_files(VAE_KEYS, cq.is_qwen_vae)


def _mismatch(what: str, a: tuple[str, Path], b: tuple[str, Path], got: str, expected: str, todo: str) -> ModelFolderError:
    return ModelFolderError(fmt(BACKEND, f"{a[0]} + {b[0]}", f"{what} ({a[1].name} and {b[1].name})", got, expected,
                                todo))


def inspect_files(dm: Path, te: Path, vae: Path, variant: str = AUTO) -> Trio:
    """Read the three headers, detect the variant and check the files belong together; no weight is read."""
    if variant not in VARIANT_CHOICES:
        raise InputError(fmt(BACKEND, "variant", "unknown variant", repr(variant), " / ".join(VARIANT_CHOICES),
                             "Pick one from the list"))
    th = read_header(dm, BACKEND, "diffusion_model")
    kind = cq.transformer_kind(th)
    if kind == "qwen_image21":
        return _inspect21(th, dm, te, vae, variant)
    if kind != "qwen_image":
        raise ModelFolderError(fmt(BACKEND, "diffusion_model", f"{dm.name} is not a Qwen-Image transformer",
                                   cq.describe(th), "a file with txt_norm.weight and img_in.weight (Qwen-Image)",
                                   "Pick a Qwen-Image file from models/diffusion_models/ or models/unet/"))
    tfmt = weight_format(th, BACKEND, "diffusion_model")
    eh = read_header(te, BACKEND, "text_encoder")
    if eh.container != "safetensors" or cq.text_kind(eh) != "qwen2_5_vl":
        raise _mismatch("the text encoder is not Qwen-Image's", ("diffusion_model", dm), ("text_encoder", te),
                        cq.describe(eh), "the Qwen2.5-VL-7B text encoder (e.g. qwen_2.5_vl_7b_fp8_scaled.safetensors)",
                        "Pick the Qwen2.5-VL file in models/text_encoders/")
    efmt = weight_format(eh, BACKEND, "text_encoder")
    joint = th.shapes["txt_in.weight"][1]
    if cq.text_hidden(eh) != joint:
        raise _mismatch("text encoder width does not fit the transformer", ("diffusion_model", dm), ("text_encoder", te),
                        f"{cq.text_hidden(eh)} channels", f"{joint} (the transformer's txt_in input)",
                        "Pick the text encoder released with this transformer")
    vh = read_header(vae, BACKEND, "vae")
    if cq.vae_kind(vh) is None:
        raise _mismatch("the VAE is not a Qwen-Image VAE", ("diffusion_model", dm), ("vae", vae), cq.describe(vh),
                        "the Qwen-Image VAE (qwen_image_vae.safetensors)", "Pick qwen_image_vae.safetensors")
    in_ch = th.shapes["img_in.weight"][1]
    z = cq.vae_latent_channels(vh)
    if cq.vae_kind(vh) != "qwen_image_vae" or z * cq.LATENT_PATCH != in_ch:
        raise _mismatch("the VAE does not fit the transformer", ("diffusion_model", dm), ("vae", vae),
                        f"{cq.describe(vh)} with {z} latent channels",
                        f"{in_ch // cq.LATENT_PATCH} latent channels (the transformer's img_in takes {in_ch})",
                        "Pick qwen_image_vae.safetensors, the VAE released with Qwen-Image")
    marked = cq.has_2511_marker(th)
    if variant == AUTO:
        name, task, zero = ("qwen-image-edit-2511", "edit_plus", True) if marked else (AUTO_VARIANT, ANY_TASK, False)
    else:
        name, (task, zero) = variant, VARIANTS[variant]
    return Trio(th, tfmt, eh, efmt, vh, name, task, zero)


def _inspect21(th: FileHeader, dm: Path, te: Path, vae: Path, variant: str) -> Trio:
    if variant != AUTO:
        raise InputError(fmt(BACKEND, "variant", f"{dm.name} is a Qwen-Image 2.1 transformer", repr(variant),
                             "auto (the variants name Qwen-Image 1.x releases)", "Set variant to auto"))
    tfmt = weight_format(th, BACKEND, "diffusion_model")
    eh, vh = read_header(te, BACKEND, "text_encoder"), read_header(vae, BACKEND, "vae")
    files21.inspect(th, dm, eh, te, vh, vae)
    return Trio(th, tfmt, eh, weight_format(eh, BACKEND, "text_encoder"), vh, files21.VARIANT, files21.TASK, False)


def load_handle(diffusion_model: str, text_encoder: str, vae: str, memory: MemoryOptions | None,
                engine: str = "diffusers", variant: str = AUTO) -> ModelHandle:
    """What GentorLoadQwenImageFiles does: resolve the three files, check them, detect; weights load lazily."""
    from .qwen_image_diffsynth import check_engine  # noqa: PLC0415

    check_engine(engine)
    dm = resolve_file(BACKEND, "diffusion_model", diffusion_model, DIFFUSION_KEYS)
    te = resolve_file(BACKEND, "text_encoder", text_encoder, TEXT_KEYS)
    va = resolve_file(BACKEND, "vae", vae, VAE_KEYS)
    trio = inspect_files(dm, te, va, variant)
    stored = trio.transformer_format.keeps_stored_form or trio.text_format.keeps_stored_form
    if stored and engine != "diffusers":
        if engine == "diffsynth":
            raise InputError(fmt(BACKEND, "engine", "the DiffSynth engine cannot compute from this file's stored form",
                                 f"{trio.transformer_format.name} / {trio.text_format.name}",
                                 "bf16, fp16 or plain FP8 files", "Set engine to diffusers (or diffsynth-or-diffusers)"))
        engine = "diffusers"  # diffsynth-or-diffusers: the allowed fallback
    if trio.task == TASK_21:
        from .comfy_qwen21 import transformer_config  # noqa: PLC0415

        cfg = transformer_config(trio.transformer)
    else:
        cfg = cq.transformer_config(trio.transformer, trio.zero_cond_t)
    return ModelHandle("qwen_image", trio.variant, (("diffusion_model", str(dm)), ("text_encoder", str(te)),
                                                     ("vae", str(va))), memory or MemoryOptions(),
                       (("task", trio.task), ("layout", LAYOUT), ("layers", str(cfg["num_layers"])),
                        ("inner_dim", str(cfg["num_attention_heads"] * cq.TRANSFORMER_HEAD_DIM)),
                        ("zero_cond_t", str(trio.zero_cond_t).lower()), ("engine", engine),
                        ("format", trio.transformer_format.name), ("text_format", trio.text_format.name)))


def is_files_handle(handle: ModelHandle) -> bool:
    return handle.info_dict.get("layout") == LAYOUT


def for_task(handle: ModelHandle, task: str) -> tuple[ModelHandle, list[str]]:
    """The handle with its pipeline family resolved for this run (``handle_task``), and the note saying so."""
    import dataclasses  # noqa: PLC0415

    family, notes = handle_task(handle, task)
    info = tuple((k, family if k == "task" else v) for k, v in handle.info)
    return dataclasses.replace(handle, info=info), notes + stored_form_notes(handle)


def stored_form_notes(handle: ModelHandle) -> list[str]:
    """Say when Memory Options' weight_dtype does not apply to a file (a stored form is kept as stored)."""
    wanted = handle.memory.weight_dtype
    if wanted == AUTO:
        return []
    kept = [f"{role} {handle.info_dict[key]}" for role, key in (("diffusion_model", "format"),
                                                                ("text_encoder", "text_format"))
            if handle.info_dict.get(key, "").startswith(("scaled_fp8", "gguf"))]
    if not kept:
        return []
    return [f"weight_dtype {wanted}: {', '.join(kept)} kept as stored (its own quantised form is not converted; "
            "compute dtype and offload apply)"]


def handle_task(handle: ModelHandle, task: str) -> tuple[str, list[str]]:
    """The pipeline family a run uses: the handle's, or for ``auto`` on an unmarked 1.x file the task node's."""
    own = handle.info_dict["task"]
    if own != ANY_TASK:
        return own, []
    if task == "t2i":
        return "t2i", []
    return AUTO_EDIT_TASK, ["variant auto: the weights of Qwen-Image, Edit and Edit-2509 are alike, ran Edit-2509's "
                            "pipeline; set variant = qwen-image-edit on the loader for the original Edit"]


# ----------------------------------------------------------------------------- configs and sizes
def configs(handle: ModelHandle) -> tuple[dict, dict]:
    """(transformer config, VAE config) from the headers, for the memory estimate."""
    th = read_header(handle.path("diffusion_model"), BACKEND, "diffusion_model")
    vh = read_header(handle.path("vae"), BACKEND, "vae")
    return cq.transformer_config(th, handle.info_dict.get("zero_cond_t") == "true"), cq.vae_config(vh)


def bytes_to_load(handle: ModelHandle, plan: Plan) -> int:
    """Resting bytes of the files not cached yet (headers only)."""
    cached = {e.source for e in CACHE.entries()}
    total = 0
    for role in ("diffusion_model", "text_encoder", "vae"):
        path = Path(handle.path(role))
        if str(path.resolve()) in cached:
            continue
        header = read_header(path, BACKEND, role)
        if role != "vae" and weight_format(header, BACKEND, role).keeps_stored_form:
            total += header.stored_bytes()
            continue
        itemsize = plan.precision.base.itemsize if role == "vae" else plan.precision.storage.itemsize
        total += sum(math.prod(s) for s in header.shapes.values()) * itemsize
    return total


# ----------------------------------------------------------------------------- loading
def load_transformer(path: str | Path, prec: Precision, source: Any, skip: tuple[str, ...], zero_cond_t: bool) -> Any:
    from diffusers import QwenImageTransformer2DModel  # noqa: PLC0415

    header = read_header(path, BACKEND, "diffusion_model")
    wfmt = weight_format(header, BACKEND, "diffusion_model")
    config = cq.transformer_config(header, zero_cond_t)
    build = lambda: QwenImageTransformer2DModel.from_config(config)  # noqa: E731
    return file_loader(build, header, wfmt, comfy_rename(header.prefix), "diffusion_model")(prec, source, skip)


def load_text_encoder(path: str | Path, prec: Precision | None, source: Any = None, skip: tuple[str, ...] = ()) -> Any:
    """THE loader of a Comfy-format Qwen2.5-VL file (kind qwen2_5_vl): Qwen-Image and the prompt enhancer share it."""
    from transformers import Qwen2_5_VLForConditionalGeneration  # noqa: PLC0415

    header = read_header(path, BACKEND, "text_encoder")
    wfmt = weight_format(header, BACKEND, "text_encoder")
    config = cq.text_config(header)
    dtype = prec.base if prec is not None else torch.float32

    def build() -> Any:
        return Qwen2_5_VLForConditionalGeneration._from_config(config, dtype=dtype)
    model = file_loader(build, header, wfmt, comfy_rename(header.prefix), "text_encoder")(prec, source, skip)
    model.gentor_has_lm_head = cq.has_lm_head(header)
    return model


def load_vae(path: str | Path, prec: Precision, source: Any) -> Any:
    from ..modeling.qwen_image.vae import StillImageQwenImageVAE  # noqa: PLC0415

    header = read_header(path, BACKEND, "vae")
    config = cq.vae_config(header)
    build = lambda: StillImageQwenImageVAE.from_config(config)  # noqa: E731
    wfmt = WeightFormat("vae")
    return file_loader(build, header, wfmt, cq.wan_vae_rename(header), "vae")(prec, source, ())


def load_processor(folder: Path) -> Any:
    """Qwen2-VL processor: ComfyUI's tokenizer + the released image processor settings (shipped JSON)."""
    import json  # noqa: PLC0415

    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor  # noqa: PLC0415
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor  # noqa: PLC0415

    cfg = json.loads((cq.CONFIG_DIR / "preprocessor_config.json").read_text(encoding="utf-8"))
    cfg.pop("_comment", None)
    sizes = {k: cfg[k] for k in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size")}
    return Qwen2VLProcessor(image_processor=Qwen2VLImageProcessor(**cfg), tokenizer=load_tokenizer(folder),
                            video_processor=Qwen2VLVideoProcessor(**sizes))


def load_components(handle: ModelHandle, task: str, plan: Plan, session: Session) -> dict[str, Any]:
    """Fetch the five (six for edits) components through the shared cache (one entry per file identity)."""
    from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: PLC0415

    spec = registry.get("qwen_image")
    memory = handle.memory
    zero = handle.info_dict.get("zero_cond_t") == "true"
    tok = tokenizer_dir()
    out: dict[str, Any] = {}
    for comp, role in PATH_ROLES.items():
        path = handle.path(role)
        header = read_header(path, BACKEND, role)
        if comp == "vae":
            prec, skip = vae_precision(plan), ()
            load = lambda p, s, _path=path: load_vae(_path, p, s)  # noqa: E731
        else:
            wfmt = weight_format(header, BACKEND, role)
            prec, skip = precision_for(header, wfmt, plan, memory, spec.fp8_skip, comp == "transformer")
            if comp == "transformer":
                load = lambda p, s, _path=path, _k=skip: load_transformer(_path, p, s, _k, zero)  # noqa: E731
            else:
                load = lambda p, s, _path=path, _k=skip: load_text_encoder(_path, p, s, _k)  # noqa: E731
        out[comp] = fetch(session, KINDS[comp], role, path, load, prec, skip, f"{BACKEND} {comp}")
    out["tokenizer"] = session.get(KINDS["tokenizer"], str(tok), lambda _p, _s: load_tokenizer(tok), None,
                                   user=f"{BACKEND} tokenizer", display=BACKEND)
    sched = cq.CONFIG_DIR
    out["scheduler"] = session.get(
        KINDS["scheduler"], str(sched / "scheduler_config.json"),
        lambda _p, _s: FlowMatchEulerDiscreteScheduler.from_pretrained(sched), None, user=f"{BACKEND} scheduler",
        display=BACKEND)
    if task != "t2i":
        out["processor"] = session.get("qwen_vl_processor", str(tok), lambda _p, _s: load_processor(tok), None,
                                       user=f"{BACKEND} processor", display=BACKEND)
    return out

