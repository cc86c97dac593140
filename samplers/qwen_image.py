"""Qwen-Image: the backend's entry point (``run``, which picks the generation) and the 1.x generation.

1.x (T2I / Edit / Edit-Plus) policies, engine-neutral: defaults, output-size rules per variant
(backend_specs.md §4.4), sizes on a 16-pixel grid, seeds, memory estimate. Engines
(``QwenImageEngine``): diffusers (default, below) and DiffSynth-Studio (``qwen_image_diffsynth.py``,
optional package), chosen on the loader. Qwen-Image 2.1 is ``qwen_image21.py``; what both generations
share (settings, job fields, engine choice, LoRAs, the run itself) is ``qwen_image_job.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from .. import glue
from ..errors import InputError, MemoryEstimateError
from ..loaders import qwen_image as qwen_loader
from ..loaders import qwen_image_files as qwen_files
from ..loaders.cache import CACHE, ModelHandle
from ..loaders.memory import Plan
from . import qwen_image21
from . import qwen_image_vae as vae_tiling
from .common import Request, Result, check_aspect, check_settings, chw_to_image, latent_preview, round_size, to_rgb
from .prompt_text import pipeline_texts
from .qwen_image_job import (DEFAULT_MAX_SEQUENCE_LENGTH, DEFAULT_PREVIEW_EVERY, DISPLAY, Generation, OnStep, Pairs,
                             QwenImageEngine, QwenJob, check_steps, diffusers_callback, execute, make_settings,
                             negative_of, require_image, summary_pairs, transformer_bytes, length_notes)

DEFAULT_STEPS = {"t2i": 50, "edit": 50, "edit_plus": 40}
DEFAULT_TRUE_CFG = 4.0
DEFAULT_T2I_SIZE = (1328, 1328)
EDIT_TARGET_AREA = 1024 * 1024
MAX_EDIT_IMAGES = 4  # Edit-2509 / 2511 (their published use is 1-3 images)
# ModelTC/Qwen-Image-Lightning's published scheduler: shift 3 fixed (exp(mu) = 3 at every size), no terminal
# stretch. The rest of the folder's scheduler config stays.
LIGHTNING_SCHEDULER = {"base_shift": math.log(3), "max_shift": math.log(3), "shift_terminal": None}
LATENT_STEP = 16  # VAE 8x * 2x2 patches
# Wan-2.1-family latent -> RGB factors (the Qwen-Image VAE shares that latent space).
LATENT_RGB_FACTORS = torch.tensor([
    [-0.1299, -0.1692, 0.2932], [0.0671, 0.0406, 0.0442], [0.3568, 0.2548, 0.1747], [0.0372, 0.2344, 0.1420],
    [0.0313, 0.0189, -0.0328], [0.0296, -0.0956, -0.0665], [-0.3477, -0.4059, -0.2925], [0.0166, 0.1902, 0.1975],
    [-0.0412, 0.0267, -0.1364], [-0.1293, 0.0740, 0.1636], [0.0680, 0.3019, 0.1128], [0.0032, 0.0581, 0.0639],
    [-0.1251, 0.0927, 0.1699], [0.0060, -0.0633, 0.0005], [0.3477, 0.2275, 0.2950], [0.1984, 0.0913, 0.1861],
]).T.contiguous()
LATENT_RGB_BIAS = torch.tensor([-0.1835, -0.0868, -0.3360])


@dataclass(kw_only=True)
class Job1x(QwenJob):
    """A resolved Qwen-Image 1.x job."""

    task: str  # t2i / edit / edit_plus (the handle's)
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH


def plan_job(task: str, handle_task: str, request: Request) -> tuple[Job1x, list[str]]:
    """Apply the backend's policies to a request; return the job and notes for the user."""
    notes: list[str] = []
    check_settings(request.settings, "qwen_image", DISPLAY, "Gentor Qwen-Image Settings")
    _check_task(task, handle_task)
    settings = request.settings or make_settings()
    images = [to_rgb(i) for i in request.images]
    for k, img in enumerate(images, 1):
        check_aspect(img.width, img.height, DISPLAY, f"image_{k}", min_side=1)
    require_image(task, images, MAX_EDIT_IMAGES)
    if task == "edit":
        if handle_task == "edit_plus" and len(images) > MAX_EDIT_IMAGES:
            raise InputError(f"{DISPLAY} image_{MAX_EDIT_IMAGES + 1}: too many reference images for Qwen-Image-Edit-"
                             f"2509/2511 (got {len(images)}, expected at most {MAX_EDIT_IMAGES}). Disconnect the extra "
                             "images, or load Qwen-Image 2.1 (up to 10 references).")
        if handle_task == "edit" and len(images) > 1:
            notes.append(f"Qwen-Image-Edit takes one image: using image_1, ignoring {len(images) - 1} more "
                         "(use an Edit-2509/2511 model for several)")
            images = images[:1]
    steps = request.steps or DEFAULT_STEPS[handle_task]
    check_steps(steps)
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
    batch = request.batch_size
    if task == "edit" and batch != 1:
        notes.append("edit runs one image per prompt: batch_size ignored")
        batch = 1
    job = Job1x(task=handle_task if task == "edit" else "t2i", prompt=request.prompt, negative=negative_of(request),
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


def estimate_bytes(job: Job1x, transformer_cfg: dict, vae_cfg: dict, dtype: torch.dtype,
                   tiled_vae: bool = False) -> int:
    """Activation memory of one run (weights are accounted separately); grows with the batch."""
    itemsize = torch.finfo(dtype).bits // 8
    tokens = (job.width // LATENT_STEP) * (job.height // LATENT_STEP)
    # Each reference image adds its VAE latent (~1 MP) to the image stream.
    tokens += len(job.images) * (EDIT_TARGET_AREA // LATENT_STEP**2)
    tokens += job.max_sequence_length
    inner = transformer_cfg["num_attention_heads"] * transformer_cfg["attention_head_dim"]
    transformer = transformer_bytes(tokens, inner, itemsize, job)
    # Untiled, the whole batch is decoded at once, without the video frame caches (modeling/qwen_image/vae.py).
    vae = vae_tiling.decode_bytes(job.width, job.height, job.batch_size, vae_cfg.get("base_dim", 96), itemsize,
                                  tiled_vae, vae_tiling.STILL_IMAGE_DECODE_FACTOR)
    return int(transformer + vae)


def weight_bytes_to_load(path: Path, task: str, plan: Plan) -> int:
    """Resting bytes of the weighted components not in the cache yet: the shared estimate from the weight
    headers (loaders/estimates.py; FP8 storage counts only the layers it casts), nothing read."""
    from ..loaders import estimates, inspect as inspection  # noqa: PLC0415

    cached = {e.source for e in CACHE.entries()}
    report = inspection.inspect_path(path)
    return sum(estimates.resting_bytes(c, plan.precision.storage, plan.precision.base) for c in report.components
               if c.role in qwen_loader.WEIGHTED and str(Path(c.path).resolve()) not in cached)


def check_memory(job: Job1x, path: Path, plan: Plan, files: ModelHandle | None = None) -> list[str]:
    """Refuse a run that cannot fit BEFORE any weight is read (configs and weight headers only); decide the
    VAE tiling on the way (sets ``job.tiled_vae``) and return the notes for the text output. ``files``: a handle
    of single Comfy-format files (their headers give the sizes) instead of the pipeline folder at ``path``."""
    from ..loaders.files import read_json  # noqa: PLC0415

    if files is not None:
        transformer_cfg, vae_cfg = qwen_files.configs(files)
    else:
        transformer_cfg = read_json(path / "transformer" / "config.json", DISPLAY, "transformer config")
        vae_cfg = read_json(path / "vae" / "config.json", DISPLAY, "vae config")
    # On a CPU the device memory IS the RAM the weights still have to be read into.
    weights = 0
    if plan.device.type == "cpu":
        weights = (qwen_files.bytes_to_load(files, plan) if files is not None else
                   weight_bytes_to_load(path, job.task, plan))
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
        self.length_notes: list[str] = []

    def total_steps(self, job: Job1x) -> int:
        return job.steps  # the whole batch goes through each step at once

    def notes(self) -> list[str]:
        return self.length_notes

    def generate(self, job: Job1x, on_step: OnStep) -> torch.Tensor:
        pipe = self.pipe
        callback = diffusers_callback(job, on_step, lambda _pipe, latents: self._preview(latents, job))
        prompt, negative = pipeline_texts(pipe, job.prompt, job.negative)
        if job.task == "t2i":  # the edit pipelines do not cut their encoder output
            self.length_notes = length_notes(pipe.tokenizer, job, prompt, negative)
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

    def _preview(self, latents: torch.Tensor, job: Job1x) -> Image.Image:
        lat = self.pipe._unpack_latents(latents[:1], job.height, job.width, self.pipe.vae_scale_factor)
        return latent_preview(lat[0, :, 0], LATENT_RGB_FACTORS, LATENT_RGB_BIAS)


def make_engine(name: str, components: dict, job: Job1x, plan: Plan) -> QwenImageEngine:
    if name == "diffsynth":
        from . import qwen_image_diffsynth  # noqa: PLC0415

        preview = qwen_image_diffsynth.preview_from(LATENT_RGB_FACTORS, LATENT_RGB_BIAS)
        return qwen_image_diffsynth.DiffSynthEngine(components, job.task, job.schedule, plan, preview)
    return DiffusersEngine(components, job.task, job.schedule)


def finish(image: torch.Tensor, job: Job1x, handle: ModelHandle,
           engine: str) -> tuple[torch.Tensor, None, Pairs]:
    pairs = [*summary_pairs(handle, job), ("engine", engine)]
    if job.schedule != "model":
        pairs.append(("schedule", job.schedule))
    return image, None, pairs


GENERATION = Generation(
    plan=lambda task, handle_task, request, _path: plan_job(task, handle_task, request),
    check_memory=check_memory,
    load_components=qwen_loader.load_components, make_engine=make_engine, finish=finish)


# ----------------------------------------------------------------------------- entry point
def run(handle: ModelHandle, task: str, request: Request,
        listener: Callable[[int, int, Any], None] | None = None) -> Result:
    """Generate with a Qwen-Image handle (1.x or 2.1); ``task`` is "t2i" or "edit"; the engine is the handle's."""
    handle.check_exists(DISPLAY)
    if qwen_files.is_files_handle(handle):
        handle, notes = qwen_files.for_task(handle, task)
        if handle.info_dict["task"] == qwen_loader.TASK_21:
            return execute(qwen_image21.files_generation(handle, notes), handle, task, request, listener)
        return execute(files_generation(handle, notes), handle, task, request, listener)
    generation = qwen_image21.GENERATION if handle.info_dict["task"] == qwen_loader.TASK_21 else GENERATION
    return execute(generation, handle, task, request, listener)


def files_generation(handle: ModelHandle, task_notes: list[str]) -> Generation:
    """The 1.x generation on ComfyUI's single files (loaders/qwen_image_files.py) instead of a pipeline folder."""
    def plan(task: str, handle_task: str, request: Request, _path: Path) -> tuple[Job1x, list[str]]:
        job, notes = plan_job(task, handle_task, request)
        return job, task_notes + notes

    return Generation(
        plan=plan, check_memory=lambda job, path, plan_: check_memory(job, path, plan_, handle),
        load_components=lambda _path, handle_task, plan_, session: qwen_files.load_components(
            handle, handle_task, plan_, session),
        make_engine=make_engine, finish=finish)
