"""Qwen-Image T2I / Edit / Edit-Plus: the backend's policies plus an engine that runs them.

Policies (owned here, engine-neutral): defaults, output-size rules per variant (backend_specs.md
§4.4), sizes on a 16-pixel grid, negative " " when empty so true CFG really runs, seeds, memory
estimate. Engines (``QwenImageEngine``): diffusers (default, below) and DiffSynth-Studio
(``qwen_image_diffsynth.py``, optional package), chosen on the loader.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from PIL import Image

from .. import glue, registry
from ..errors import InputError, MemoryEstimateError, MissingDependencyError
from ..loaders import lora as lora_files
from ..loaders import qwen_image as qwen_loader
from ..loaders import qwen_image_diffsynth as ds_views
from ..loaders.cache import CACHE, Entry, ModelHandle, Session
from ..loaders.memory import Plan, resolve
from ..loaders.placement import Placement, has_block_offload, remove_block_offload
from . import qwen_image_vae as vae_tiling
from .prompt_text import pipeline_texts
from .common import (Request, Result, Settings, check_aspect, check_finite, check_settings, chw_to_image, format_notes,
                     latent_preview, round_size, to_rgb)

log = logging.getLogger(__name__)

DISPLAY = "Qwen-Image"
DEFAULT_STEPS = {"t2i": 50, "edit": 50, "edit_plus": 40}
DEFAULT_TRUE_CFG = 4.0
DEFAULT_T2I_SIZE = (1328, 1328)
EDIT_TARGET_AREA = 1024 * 1024
EMPTY_NEGATIVE = " "  # diffusers only runs true CFG when a negative prompt is passed
DEFAULT_MAX_SEQUENCE_LENGTH = 512
MAX_SEQUENCE_LENGTH = 1024
DEFAULT_PREVIEW_EVERY = 5
MAX_EDIT_IMAGES = 4  # Edit-2509 / 2511 (their published use is 1-3 images)
SCHEDULES = ("model", "lightning")
# ModelTC/Qwen-Image-Lightning's published scheduler: shift 3 fixed (exp(mu) = 3 at every size), no terminal
# stretch. The rest of the folder's scheduler config stays.
LIGHTNING_SCHEDULER = {"base_shift": math.log(3), "max_shift": math.log(3), "shift_terminal": None}
MIN_STEPS = 2
LATENT_STEP = 16  # VAE 8x * 2x2 patches
# Rough bytes per token per inner-dim channel held during a transformer forward (q,k,v,attn out,
# 4x MLP hidden, modulated copies) and per pixel per VAE base channel during decode.
TOKEN_ACTIVATION_FACTOR = 16
# Wan-2.1-family latent -> RGB factors (the Qwen-Image VAE shares that latent space).
LATENT_RGB_FACTORS = torch.tensor([
    [-0.1299, -0.1692, 0.2932], [0.0671, 0.0406, 0.0442], [0.3568, 0.2548, 0.1747], [0.0372, 0.2344, 0.1420],
    [0.0313, 0.0189, -0.0328], [0.0296, -0.0956, -0.0665], [-0.3477, -0.4059, -0.2925], [0.0166, 0.1902, 0.1975],
    [-0.0412, 0.0267, -0.1364], [-0.1293, 0.0740, 0.1636], [0.0680, 0.3019, 0.1128], [0.0032, 0.0581, 0.0639],
    [-0.1251, 0.0927, 0.1699], [0.0060, -0.0633, 0.0005], [0.3477, 0.2275, 0.2950], [0.1984, 0.0913, 0.1861],
]).T.contiguous()
LATENT_RGB_BIAS = torch.tensor([-0.1835, -0.0868, -0.3360])


@dataclass
class QwenJob:
    """An engine-neutral, fully resolved Qwen-Image job."""

    task: str
    prompt: str
    negative: str
    seed: int
    steps: int
    true_cfg: float
    width: int
    height: int
    batch_size: int
    images: list[Image.Image] = field(default_factory=list)
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH
    preview_every: int = DEFAULT_PREVIEW_EVERY
    schedule: str = "model"
    vae_tiling: str = vae_tiling.DEFAULT_VAE_TILING  # the setting (auto / on / off)
    tiled_vae: bool = False  # what check_memory decided


class QwenImageEngine(Protocol):
    """Runs a resolved job; ``on_step(done, latent_preview_or_None)`` after every step (``done`` counts up to
    ``total_steps(job)``)."""

    name: str

    def total_steps(self, job: QwenJob) -> int: ...

    def notes(self) -> list[str]: ...

    def generate(self, job: QwenJob, on_step: Callable[[int, Image.Image | None], None]) -> torch.Tensor: ...


def make_settings(max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
                  preview_every: int = DEFAULT_PREVIEW_EVERY, schedule: str = "model",
                  vae_tiling_mode: str = vae_tiling.DEFAULT_VAE_TILING) -> Settings:
    """GentorQwenImageSettings: prompt length, previews, sampling schedule, VAE tiling."""
    if not 1 <= max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise InputError(f"{DISPLAY} max_sequence_length: out of range (got {max_sequence_length}, expected "
                         f"1..{MAX_SEQUENCE_LENGTH}). Use 512 (default) or up to 1024 for long prompts.")
    if schedule not in SCHEDULES:
        raise InputError(f"{DISPLAY} schedule: unknown schedule (got {schedule!r}, expected one of "
                         f"{', '.join(SCHEDULES)}). Pick one from the list.")
    if vae_tiling_mode not in vae_tiling.VAE_TILING_MODES:
        raise InputError(f"{DISPLAY} vae_tiling: unknown mode (got {vae_tiling_mode!r}, expected one of "
                         f"{', '.join(vae_tiling.VAE_TILING_MODES)}). Pick one from the list.")
    return Settings("qwen_image", (("max_sequence_length", max_sequence_length), ("preview_every", preview_every),
                                   ("schedule", schedule), ("vae_tiling", vae_tiling_mode)))


def plan_job(task: str, handle_task: str, request: Request) -> tuple[QwenJob, list[str]]:
    """Apply the backend's policies to a request; return the job and notes for the user."""
    notes: list[str] = []
    check_settings(request.settings, "qwen_image", DISPLAY, "Gentor Qwen-Image Settings")
    _check_task(task, handle_task)
    settings = request.settings or make_settings()
    images = [to_rgb(i) for i in request.images]
    for k, img in enumerate(images, 1):
        check_aspect(img.width, img.height, DISPLAY, f"image_{k}", min_side=1)
    if task == "edit":
        if not images:
            raise InputError(f"{DISPLAY} image_1: no image to edit (got no image inputs, expected 1..{MAX_EDIT_IMAGES} "
                             "images). Connect an image to image_1, or use Gentor Text to Image.")
        if handle_task == "edit_plus" and len(images) > MAX_EDIT_IMAGES:
            raise InputError(f"{DISPLAY} image_{MAX_EDIT_IMAGES + 1}: too many reference images for Qwen-Image-Edit-"
                             f"2509/2511 (got {len(images)}, expected at most {MAX_EDIT_IMAGES}). Disconnect the extra "
                             "images, or load Qwen-Image 2.1 (up to 10 references).")
        if handle_task == "edit" and len(images) > 1:
            notes.append(f"Qwen-Image-Edit takes one image: using image_1, ignoring {len(images) - 1} more "
                         "(use an Edit-2509/2511 model for several)")
            images = images[:1]
    steps = request.steps or DEFAULT_STEPS[handle_task]
    if steps < MIN_STEPS:
        # The scheduler stretches sigmas so the last one is shift_terminal; with one step it divides by zero.
        raise InputError(f"{DISPLAY} steps: too few steps (got {steps}, expected at least {MIN_STEPS} or 0 for the "
                         "default). Raise steps to 2 or more.")
    cfg = request.cfg or DEFAULT_TRUE_CFG
    if task == "t2i":
        width, height = (request.width or DEFAULT_T2I_SIZE[0]), (request.height or DEFAULT_T2I_SIZE[1])
    else:
        # Edit follows the first image, Edit-Plus the last one (as the reference pipelines do).
        ref = images[0] if handle_task == "edit" else images[-1]
        # diffusers' own sizing rule (area at the image's aspect, multiples of 32), so sizes match the reference.
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions  # noqa: PLC0415

        auto_w, auto_h = calculate_dimensions(EDIT_TARGET_AREA, ref.width / ref.height)
        width, height = request.width or auto_w, request.height or auto_h
    width, height = round_size(width, "width", notes), round_size(height, "height", notes)
    check_aspect(width, height, DISPLAY, "width/height")
    negative = request.negative if request.negative.strip() else EMPTY_NEGATIVE
    batch = request.batch_size
    if task == "edit" and batch != 1:
        notes.append("edit runs one image per prompt: batch_size ignored")
        batch = 1
    job = QwenJob(task=handle_task if task == "edit" else "t2i", prompt=request.prompt, negative=negative,
                  seed=int(request.seed), steps=int(steps), true_cfg=float(cfg), width=width, height=height,
                  batch_size=int(batch), images=images,
                  max_sequence_length=int(settings.get("max_sequence_length", DEFAULT_MAX_SEQUENCE_LENGTH)),
                  preview_every=int(settings.get("preview_every", DEFAULT_PREVIEW_EVERY)),
                  schedule=str(settings.get("schedule", "model")),
                  vae_tiling=str(settings.get("vae_tiling", vae_tiling.DEFAULT_VAE_TILING)))
    return job, notes


def _check_task(task: str, handle_task: str) -> None:
    if task == "t2i" and handle_task != "t2i":
        raise InputError(f"{DISPLAY} model: an edit model cannot generate from text alone (got a "
                         f"{handle_task.replace('_', '-')} model, expected a Qwen-Image text-to-image model). Use "
                         "Gentor Edit Image with this model, or load Qwen-Image for Gentor Text to Image.")
    if task == "edit" and handle_task == "t2i":
        raise InputError(f"{DISPLAY} model: a text-to-image model cannot edit images (got a Qwen-Image T2I model, "
                         "expected Qwen-Image-Edit / -2509 / -2511). Use Gentor Text to Image with this model, or "
                         "load an edit model for Gentor Edit Image.")


def estimate_bytes(job: QwenJob, transformer_cfg: dict, vae_cfg: dict, dtype: torch.dtype,
                   tiled_vae: bool = False) -> int:
    """Activation memory of one run (weights are accounted separately); grows with the batch."""
    itemsize = torch.finfo(dtype).bits // 8
    tokens = (job.width // LATENT_STEP) * (job.height // LATENT_STEP)
    # Each reference image adds its VAE latent (~1 MP) to the image stream.
    tokens += len(job.images) * (EDIT_TARGET_AREA // LATENT_STEP**2)
    tokens += job.max_sequence_length
    cfg_mult = 2 if job.true_cfg > 1 else 1
    inner = transformer_cfg["num_attention_heads"] * transformer_cfg["attention_head_dim"]
    transformer = tokens * inner * itemsize * TOKEN_ACTIVATION_FACTOR * job.batch_size * cfg_mult
    # Untiled, the whole batch is decoded at once, without the video frame caches (modeling/qwen_image/vae.py).
    vae = vae_tiling.decode_bytes(job.width, job.height, job.batch_size, vae_cfg.get("base_dim", 96), itemsize,
                                  tiled_vae, vae_tiling.STILL_IMAGE_DECODE_FACTOR)
    return int(transformer + vae)


def weight_bytes_to_load(path: Path, task: str, plan: Plan) -> int:
    """Resting bytes of the weighted components not in the cache yet (from weight headers, nothing read)."""
    from ..loaders.files import tensor_shapes, weight_files  # noqa: PLC0415

    cached = {e.source for e in CACHE.entries()}
    total = 0
    for comp in qwen_loader.WEIGHTED:
        folder = path / comp
        if str(folder.resolve()) in cached:
            continue
        itemsize = plan.precision.base.itemsize if comp == "vae" else plan.precision.storage.itemsize
        numel = sum(math.prod(shape) for shape in tensor_shapes(weight_files(folder, DISPLAY, comp)).values())
        total += numel * itemsize
    return total


def check_memory(job: QwenJob, path: Path, plan: Plan) -> list[str]:
    """Refuse a run that cannot fit BEFORE any weight is read (configs and weight headers only); decide the
    VAE tiling on the way (sets ``job.tiled_vae``) and return the notes for the text output."""
    from ..loaders.files import read_json  # noqa: PLC0415

    transformer_cfg = read_json(path / "transformer" / "config.json", DISPLAY, "transformer config")
    vae_cfg = read_json(path / "vae" / "config.json", DISPLAY, "vae config")
    # On a CPU the device memory IS the RAM the weights still have to be read into.
    weights = weight_bytes_to_load(path, job.task, plan) if plan.device.type == "cpu" else 0
    free = glue.free_memory_bytes(plan.device)
    whole = estimate_bytes(job, transformer_cfg, vae_cfg, plan.compute, tiled_vae=False)
    job.tiled_vae, note = vae_tiling.choose(job.vae_tiling, whole + weights <= free)
    activations = estimate_bytes(job, transformer_cfg, vae_cfg, plan.compute, tiled_vae=job.tiled_vae)
    need = activations + weights
    if need > free:
        raise MemoryEstimateError(
            f"{DISPLAY} width/height/batch_size: {job.width}x{job.height} x{job.batch_size} needs about "
            f"{need / 1e9:.1f} GB ({activations / 1e9:.1f} GB activations"
            f"{' with a tiled VAE decode' if job.tiled_vae else ''} + {weights / 1e9:.1f} GB weights to load; "
            f"got {free / 1e9:.1f} GB free on {plan.device}, expected at least the estimate). Lower the size or the "
            "batch, or free memory; nothing was allocated.")
    if note and job.vae_tiling == "auto":
        note += f" ({whole / 1e9:.1f} GB whole vs {activations / 1e9:.1f} GB tiled, {free / 1e9:.1f} GB free)"
    return [note] if note else []


# ----------------------------------------------------------------------------- diffusers engine
class DiffusersEngine:
    """Runs jobs on diffusers' Qwen-Image pipelines built from cached components.

    The pipeline object is rebuilt per run (cheap); weights and their placement hooks live on the cached
    modules (the placement layer puts them there), so the engine only runs the pipeline.
    """

    name = "diffusers"

    def __init__(self, components: dict, task: str, schedule: str = "model") -> None:
        import diffusers  # noqa: PLC0415

        cls = {"t2i": diffusers.QwenImagePipeline, "edit": diffusers.QwenImageEditPipeline,
               "edit_plus": diffusers.QwenImageEditPlusPipeline}[task]
        modules = {k: e.value for k, e in components.items()}
        if schedule == "lightning":
            # A fresh scheduler for this run: the cached one stays the folder's own.
            modules["scheduler"] = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
                modules["scheduler"].config, **LIGHTNING_SCHEDULER)
        self.pipe = cls(**modules)
        self.pipe.set_progress_bar_config(disable=True)

    def total_steps(self, job: QwenJob) -> int:
        return job.steps  # the whole batch goes through each step at once

    def notes(self) -> list[str]:
        return []

    def generate(self, job: QwenJob, on_step: Callable[[int, Image.Image | None], None]) -> torch.Tensor:
        pipe = self.pipe

        def callback(_pipe: Any, i: int, _t: Any, kwargs: dict) -> dict:
            preview = None
            if job.preview_every > 0 and (i + 1) % job.preview_every == 0 and i + 1 < job.steps:
                preview = self._preview(kwargs["latents"], job)
            on_step(i + 1, preview)
            return {}

        prompt, negative = pipeline_texts(pipe, job.prompt, job.negative, DISPLAY)
        args: dict[str, Any] = dict(
            prompt=prompt, negative_prompt=negative, true_cfg_scale=job.true_cfg,
            num_inference_steps=job.steps, width=job.width, height=job.height,
            generator=torch.Generator("cpu").manual_seed(job.seed), max_sequence_length=job.max_sequence_length,
            output_type="pt", callback_on_step_end=callback)
        if job.task == "t2i":
            args["num_images_per_prompt"] = job.batch_size
        else:
            args["image"] = job.images[0] if job.task == "edit" else job.images
        vae_tiling.apply(pipe.vae, job.tiled_vae)
        with torch.inference_mode():
            out = pipe(**args).images
        return chw_to_image(out)

    def _preview(self, latents: torch.Tensor, job: QwenJob) -> Image.Image:
        lat = self.pipe._unpack_latents(latents[:1], job.height, job.width, self.pipe.vae_scale_factor)
        return latent_preview(lat[0, :, 0], LATENT_RGB_FACTORS, LATENT_RGB_BIAS)


def choose_engine(handle: ModelHandle, handle_task: str) -> tuple[str, list[str]]:
    """The engine the handle asks for, checked: DiffSynth installed (else the pip command), the model and job
    supported (else an error, or diffusers when the user allowed a fallback)."""
    wanted = handle.info_dict.get("engine", ds_views.DEFAULT_ENGINE)
    ds_views.check_engine(wanted)
    if wanted == "diffusers":
        return "diffusers", []
    fallback = wanted == "diffsynth-or-diffusers"
    reason = ds_views.unsupported_reason(handle_task, handle.variant)
    if reason is None:
        try:
            return "diffsynth", ds_views.require()
        except MissingDependencyError as exc:
            if not fallback:
                raise
            log.warning("Gentor: %s", exc)
            return "diffusers", [f"engine: fell back to diffusers because diffsynth is not installed "
                                 f"({ds_views.PIP_COMMAND})"]
    if not fallback:
        raise InputError(f"{DISPLAY} engine: the DiffSynth engine does not support {reason} (got engine=diffsynth, "
                         "expected a model and settings it runs). Set engine to diffusers, or to "
                         "diffsynth-or-diffusers to fall back automatically.")
    return "diffusers", [f"engine: fell back to diffusers because DiffSynth does not support {reason}"]


def make_engine(name: str, components: dict, task: str, schedule: str, plan: Plan) -> QwenImageEngine:
    if name == "diffsynth":
        from . import qwen_image_diffsynth  # noqa: PLC0415

        preview = qwen_image_diffsynth.preview_from(LATENT_RGB_FACTORS, LATENT_RGB_BIAS)
        return qwen_image_diffsynth.DiffSynthEngine(components, task, schedule, plan, preview)
    return DiffusersEngine(components, task, schedule)


# ----------------------------------------------------------------------------- entry points
def use_loras(session: Session, transformer: Entry, handle: ModelHandle, plan: Plan) -> list[str]:
    """Switch exactly the handle's LoRAs on in the cached transformer for this run (loading each file once)."""
    wanted = lora_files.adapters_for(handle, DISPLAY, plan.compute)
    if any(transformer.adapters.get(a.name) != a.identity for a in wanted) and has_block_offload(transformer.value):
        # Block offload moves the parameters it found when it was applied: take it off while PEFT adds layers,
        # the placement layer applies it again (with the LoRA weights in the blocks) right after.
        remove_block_offload(transformer.value)
        transformer.placement = ""
    session.use_adapters(transformer, wanted)
    return [f"LoRA {lora_files.describe(handle)}"] if wanted else []


def run(handle: ModelHandle, task: str, request: Request,
        listener: Callable[[int, int, Any], None] | None = None) -> Result:
    """Generate with a Qwen-Image handle; ``task`` is "t2i" or "edit"; the engine is the handle's."""
    handle.check_exists(DISPLAY)
    handle_task = handle.info_dict["task"]
    if handle_task == qwen_loader.TASK_21:
        from . import qwen_image21  # noqa: PLC0415

        engine, engine_notes = choose_engine(handle, handle_task)
        return qwen_image21.run(handle, task, request, listener, engine, engine_notes)
    job, notes = plan_job(task, handle_task, request)
    engine, engine_notes = choose_engine(handle, handle_task)
    notes.extend(engine_notes)
    plan = resolve(handle.memory, glue.torch_device())
    notes.extend(plan.notes)
    path = Path(handle.path())
    notes.extend(check_memory(job, path, plan))
    notes.extend(lora_files.lightning_notes(handle, job.steps, job.true_cfg, job.schedule))
    spec = registry.get("qwen_image")
    with CACHE.session() as session:
        components = qwen_loader.load_components(path, handle_task, plan, session)
        notes.extend(use_loras(session, components["transformer"], handle, plan))
        placement = Placement(components, dict(spec.blocks), plan, DISPLAY,
                              mover="diffsynth" if engine == "diffsynth" else "")
        with placement.running() as placed:
            runner = make_engine(engine, components, handle_task, job.schedule, placed)
            progress = glue.Progress(runner.total_steps(job), listener)
            image = runner.generate(job, lambda i, preview: progress.update(i, preview))
            notes.extend(runner.notes())
        notes.extend(placement.notes)
    check_finite(image, DISPLAY, "try compute_dtype fp32 or bf16 in Gentor Memory Options (fp16 overflows easily)")
    pairs = [("model", handle.variant), ("size", f"{job.width}x{job.height}"), ("steps", job.steps),
             ("true_cfg", job.true_cfg), ("seed", job.seed), ("engine", engine)]
    if job.schedule != "model":
        pairs.append(("schedule", job.schedule))
    return Result(image, format_notes(pairs, notes))
