"""Qwen-Image 2.1 T2I and edit (up to 10 references) on diffusers' ``QwenImage21Pipeline``.

Policies (the pipeline's own defaults, which its docstring gives as the model's): 40 steps, no CFG
(true_cfg 1.0; a cfg above 1 turns true CFG on with the negative prompt, " " when empty), 1024x1024 T2I,
edits sized from the LAST reference at ~1 MP, sizes on a 32-pixel grid (16x VAE, 2 latents per token pair).
References are resized to the pipeline's ``output_resolution`` squared area: 1024 by default, the output's
own area when width/height are set (so a small output does not carry ten 1 MP references).
A folder whose model_index.json sets ``sample_sigmas`` samples on that grid when steps = 0.
The VAE outputs RGBA: the IMAGE output gets RGB and the MASK output ComfyUI's mask of the alpha
(mask = 1 - alpha, as Load Image gives it, so Join Image with Alpha puts the same RGBA back together).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from .. import glue, registry
from ..errors import InputError, MemoryEstimateError
from ..loaders import lora as lora_files
from ..loaders import qwen_image21 as loader21
from ..loaders.cache import CACHE, ModelHandle
from ..loaders.files import read_json
from ..loaders.memory import Plan, resolve
from ..loaders.placement import Placement
from . import qwen_image_vae as vae_tiling
from .prompt_text import pipeline_texts
from .common import Request, Result, check_finite, check_settings, format_notes, round_size, to_rgb
from .qwen_image import (DEFAULT_PREVIEW_EVERY, DISPLAY, EMPTY_NEGATIVE, MIN_STEPS, TOKEN_ACTIVATION_FACTOR,
                         make_settings, use_loras)
from .vae_preview import decode_preview

DEFAULT_STEPS = 40
DEFAULT_TRUE_CFG = 1.0  # 2.1 is sampled without guidance
OUTPUT_RESOLUTION = 1024
SIZE_GRID = 32
PATCH_PX = 16
ALPHA_CHANNEL = 3
REFERENCE_MARGIN = 0.9


@dataclass
class Job21:
    prompt: str
    negative: str
    seed: int
    steps: int
    true_cfg: float
    width: int
    height: int
    batch_size: int
    images: list[Image.Image] = field(default_factory=list)
    sigmas: list[float] | None = None
    resolution: int = OUTPUT_RESOLUTION  # the pipeline's output_resolution (reference resize area = its square)
    vae_tiling: str = vae_tiling.DEFAULT_VAE_TILING
    tiled_vae: bool = False
    preview_every: int = DEFAULT_PREVIEW_EVERY


def plan_job(task: str, request: Request, sample_sigmas: tuple[float, ...] | None) -> tuple[Job21, list[str]]:
    """Apply 2.1's defaults and limits to a request."""
    notes: list[str] = []
    check_settings(request.settings, "qwen_image", DISPLAY, "Gentor Qwen-Image Settings")
    settings = request.settings or make_settings()
    if settings.get("schedule", "model") != "model":
        notes.append("schedule applies to Qwen-Image 1.x models: Qwen-Image 2.1 samples on its own schedule")
    images = [_rgba(i) for i in request.images]
    if task == "edit" and not images:
        raise InputError(f"{DISPLAY} image_1: no image to edit (got no image inputs, expected 1.."
                         f"{loader21.MAX_REFERENCES} images). Connect an image to image_1, or use Gentor Text to Image.")
    if len(images) > loader21.MAX_REFERENCES:
        raise InputError(f"{DISPLAY} image_{loader21.MAX_REFERENCES + 1}: too many reference images for Qwen-Image 2.1 "
                         f"(got {len(images)}, expected at most {loader21.MAX_REFERENCES}). Disconnect the extra images.")
    sigmas = None
    if request.steps:
        steps = request.steps
        if sample_sigmas:
            # The folder's grid would override num_inference_steps: an explicit step count gets the plain grid.
            sigmas = np.linspace(1.0, 1.0 / steps, steps).tolist()
    elif sample_sigmas:
        steps, sigmas = len(sample_sigmas), list(sample_sigmas)
    else:
        steps = DEFAULT_STEPS
    if steps < MIN_STEPS:
        raise InputError(f"{DISPLAY} steps: too few steps (got {steps}, expected at least {MIN_STEPS} or 0 for the "
                         "default). Raise steps to 2 or more.")
    if images:
        from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_dimensions  # noqa: PLC0415

        last = images[-1]
        auto_w, auto_h, _ = calculate_dimensions(OUTPUT_RESOLUTION**2, last.width / last.height)
    else:
        auto_w = auto_h = OUTPUT_RESOLUTION
    width = round_size(request.width or auto_w, "width", notes, SIZE_GRID)
    height = round_size(request.height or auto_h, "height", notes, SIZE_GRID)
    cfg = request.cfg or DEFAULT_TRUE_CFG
    resolution = OUTPUT_RESOLUTION
    if request.width or request.height:
        resolution = max(SIZE_GRID, round(math.sqrt(width * height) / SIZE_GRID) * SIZE_GRID)
    job = Job21(prompt=request.prompt, negative=request.negative if request.negative.strip() else EMPTY_NEGATIVE,
                seed=int(request.seed), steps=int(steps), true_cfg=float(cfg), width=width, height=height,
                batch_size=int(request.batch_size), images=images, sigmas=sigmas, resolution=resolution,
                vae_tiling=str(settings.get("vae_tiling", vae_tiling.DEFAULT_VAE_TILING)),
                preview_every=int(settings.get("preview_every", DEFAULT_PREVIEW_EVERY)))
    return job, notes


def _rgba(img: Image.Image) -> Image.Image:
    # 2.1's VAE reads all four channels of a reference (its text encoder gets the white-composited copy).
    return img.convert("RGBA") if img.mode in ("RGBA", "LA", "PA", "P") else to_rgb(img)


def fit_resolution(resolution: int, processor: Any) -> int:
    """Keep the reference resize area inside the vision processor's pixel range.

    The pipeline gives each reference 2x2 latent tokens per vision slot; a reference the processor has to
    resize again (below its min_pixels, above its max_pixels) would no longer line up with its VAE latents.
    The lower bound keeps a margin of 2x per side for aspect-ratio rounding, the upper one 10%."""
    size = getattr(getattr(processor, "image_processor", None), "size", None) or {}
    lo_px, hi_px = size.get("shortest_edge"), size.get("longest_edge")
    lo = 2 * math.ceil(math.sqrt(lo_px) / SIZE_GRID) * SIZE_GRID if lo_px else SIZE_GRID
    hi = math.floor(math.sqrt(hi_px) * REFERENCE_MARGIN / SIZE_GRID) * SIZE_GRID if hi_px else resolution
    return min(max(resolution, lo), max(hi, lo))


def check_memory(job: Job21, path: Path, plan: Plan) -> list[str]:
    """Refuse a run that cannot fit before any weight is read; decide the VAE tiling."""
    tcfg = read_json(path / "transformer" / "config.json", DISPLAY, "transformer config")
    vcfg = read_json(path / "vae" / "config.json", DISPLAY, "vae config")
    itemsize = torch.finfo(plan.compute).bits // 8
    tokens = (job.width // PATCH_PX) * (job.height // PATCH_PX) + len(job.images) * (job.resolution // PATCH_PX) ** 2
    inner = tcfg.get("num_attention_heads", 32) * tcfg.get("attention_head_dim", 128)
    cfg_mult = 2 if job.true_cfg > 1 else 1
    transformer = tokens * inner * itemsize * TOKEN_ACTIVATION_FACTOR * job.batch_size * cfg_mult
    base = vcfg.get("decoder_base_dim") or vcfg.get("base_dim", 96)
    free = glue.free_memory_bytes(plan.device)
    factor = vae_tiling.STILL_IMAGE21_DECODE_FACTOR  # a whole decode runs without the video frame caches
    whole = transformer + vae_tiling.decode_bytes(job.width, job.height, job.batch_size, base, itemsize, False, factor)
    job.tiled_vae, note = vae_tiling.choose(job.vae_tiling, whole <= free)
    need = transformer + vae_tiling.decode_bytes(job.width, job.height, job.batch_size, base, itemsize, job.tiled_vae,
                                                 factor)
    if need > free:
        raise MemoryEstimateError(
            f"{DISPLAY} width/height/batch_size: {job.width}x{job.height} x{job.batch_size} with {len(job.images)} "
            f"references needs about {need / 1e9:.1f} GB of activations (got {free / 1e9:.1f} GB free on "
            f"{plan.device}, expected at least the estimate). Lower the size, the batch or the references.")
    return [note] if note else []


class Engine21:
    """Runs a job on ``QwenImage21Pipeline`` built from the cached components (cheap to rebuild per run)."""

    def __init__(self, components: dict, sample_sigmas: tuple[float, ...] | None) -> None:
        import diffusers  # noqa: PLC0415

        self.pipe = diffusers.QwenImage21Pipeline(
            **{k: e.value for k, e in components.items()}, sample_sigmas=list(sample_sigmas) if sample_sigmas else None)
        self.pipe.set_progress_bar_config(disable=True)

    def total_steps(self, job: Job21) -> int:
        return job.steps  # the whole batch goes through each step at once

    def notes(self) -> list[str]:
        return []

    def generate(self, job: Job21, on_step: Callable[[int, Image.Image | None], None]) -> torch.Tensor:
        def callback(pipe: Any, i: int, _t: Any, kwargs: dict) -> dict:
            preview = None
            if job.preview_every > 0 and (i + 1) % job.preview_every == 0 and i + 1 < job.steps:
                # No published RGB map for the 64-channel latent: a small decode by the model's own VAE.
                preview = decode_preview(pipe.vae, pipe._unpack_latents(kwargs["latents"][:1], job.height, job.width,
                                                                        pipe.vae_scale_factor))
            on_step(i + 1, preview)
            return {}

        prompt, negative = pipeline_texts(self.pipe, job.prompt, job.negative, DISPLAY)
        args: dict[str, Any] = dict(
            prompt=prompt, true_cfg_scale=job.true_cfg, num_inference_steps=job.steps, sigmas=job.sigmas,
            width=job.width, height=job.height, num_images_per_prompt=job.batch_size, output_resolution=job.resolution,
            generator=torch.Generator("cpu").manual_seed(job.seed), output_type="pt", callback_on_step_end=callback)
        if job.true_cfg > 1:
            args["negative_prompt"] = negative
        if job.images:
            args["image"] = job.images
        vae_tiling.apply(self.pipe.vae, job.tiled_vae)
        with torch.inference_mode():
            return self.pipe(**args).images  # [B, 3 or 4, H, W] in 0..1


def split_rgba(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[B,C,H,W] 0..1 -> (IMAGE [B,H,W,3], MASK [B,H,W] = 1 - alpha; zeros when the output has no alpha)."""
    batch = batch.detach().float().clamp(0, 1).cpu()
    image = batch[:, :3].permute(0, 2, 3, 1).contiguous()
    if batch.shape[1] > ALPHA_CHANNEL:
        mask = 1.0 - batch[:, ALPHA_CHANNEL]
    else:
        mask = torch.zeros(batch.shape[0], batch.shape[2], batch.shape[3])
    return image, mask.contiguous()


def make_engine(engine: str, components: dict, sample_sigmas: tuple[float, ...] | None, plan: Plan) -> Any:
    if engine == "diffsynth":
        from .qwen_image_diffsynth import DiffSynthEngine21  # noqa: PLC0415

        return DiffSynthEngine21(components, plan, sample_sigmas)
    return Engine21(components, sample_sigmas)


def run(handle: ModelHandle, task: str, request: Request, listener: Callable[[int, int, Any], None] | None = None,
        engine: str = "diffusers", engine_notes: list[str] | None = None) -> Result:
    """Generate with a Qwen-Image 2.1 handle; ``task`` is "t2i" or "edit"; ``engine`` as chosen (and checked)
    by ``samplers/qwen_image.choose_engine``."""
    path = Path(handle.path())
    index = read_json(path / "model_index.json", DISPLAY, "model_index.json")
    sample_sigmas = tuple(index["sample_sigmas"]) if index.get("sample_sigmas") else None
    job, notes = plan_job(task, request, sample_sigmas)
    notes.extend(engine_notes or [])
    plan = resolve(handle.memory, glue.torch_device())
    notes.extend(plan.notes)
    notes.extend(check_memory(job, path, plan))
    notes.extend(lora_files.lightning_notes(handle, job.steps, job.true_cfg, "model"))
    spec = registry.get("qwen_image")
    with CACHE.session() as session:
        components = loader21.load_components(path, plan, session)
        notes.extend(use_loras(session, components["transformer"], handle, plan))
        placement = Placement(components, dict(spec.blocks), plan, DISPLAY,
                              mover="diffsynth" if engine == "diffsynth" else "")
        if job.images and engine == "diffusers":
            job.resolution = fit_resolution(job.resolution, components["processor"].value)
        with placement.running() as placed:
            runner = make_engine(engine, components, sample_sigmas, placed)
            progress = glue.Progress(runner.total_steps(job), listener)
            out = runner.generate(job, lambda i, preview=None: progress.update(i, preview))
            notes.extend(runner.notes())
        notes.extend(placement.notes)
    image, mask = split_rgba(out)
    check_finite(image, DISPLAY, "try compute_dtype fp32 or bf16 in Gentor Memory Options (fp16 overflows easily)")
    pairs = [("model", handle.variant), ("size", f"{job.width}x{job.height}"), ("steps", job.steps),
             ("true_cfg", job.true_cfg), ("seed", job.seed), ("references", len(job.images)),
             ("alpha", "yes" if out.shape[1] > ALPHA_CHANNEL else "no"), ("engine", engine)]
    return Result(image, format_notes(pairs, notes), mask=mask)
