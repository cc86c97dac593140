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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .. import glue
from ..errors import InputError, MemoryEstimateError
from ..loaders import qwen_image21 as loader21
from ..loaders.cache import ModelHandle, Session
from ..loaders.files import read_json
from ..loaders.memory import Plan
from . import qwen_image_vae as vae_tiling
from .common import Request, check_settings, round_size, to_rgb
from .prompt_text import pipeline_texts
from .qwen_image_job import (DEFAULT_PREVIEW_EVERY, DISPLAY, Generation, OnStep, Pairs, QwenImageEngine, QwenJob,
                             check_steps, diffusers_callback, make_settings, negative_of, require_image, summary_pairs,
                             transformer_bytes)
from .vae_preview import decode_preview

DEFAULT_STEPS = 40
DEFAULT_TRUE_CFG = 1.0  # 2.1 is sampled without guidance
OUTPUT_RESOLUTION = 1024
SIZE_GRID = 32
PATCH_PX = 16
ALPHA_CHANNEL = 3
REFERENCE_MARGIN = 0.9


@dataclass(kw_only=True)
class Job21(QwenJob):
    """A resolved Qwen-Image 2.1 job."""

    sigmas: list[float] | None = None  # the grid to sample on (None: the pipeline's own for ``steps``)
    sample_sigmas: tuple[float, ...] | None = None  # the folder's own grid (model_index.json), if it sets one
    resolution: int = OUTPUT_RESOLUTION  # the pipeline's output_resolution (reference resize area = its square)


def plan_job(task: str, request: Request, sample_sigmas: tuple[float, ...] | None) -> tuple[Job21, list[str]]:
    """Apply 2.1's defaults and limits to a request."""
    notes: list[str] = []
    check_settings(request.settings, "qwen_image", DISPLAY, "Gentor Qwen-Image Settings")
    settings = request.settings or make_settings()
    if settings.get("schedule", "model") != "model":
        notes.append("schedule applies to Qwen-Image 1.x models: Qwen-Image 2.1 samples on its own schedule")
    images = [_rgba(i) for i in request.images]
    require_image(task, images, loader21.MAX_REFERENCES)
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
    check_steps(steps)
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
    job = Job21(prompt=request.prompt, negative=negative_of(request),
                seed=int(request.seed), steps=int(steps), true_cfg=float(cfg), width=width, height=height,
                batch_size=int(request.batch_size), images=images, sigmas=sigmas, sample_sigmas=sample_sigmas,
                resolution=resolution, preview_every=int(settings.get("preview_every", DEFAULT_PREVIEW_EVERY)),
                vae_tiling=str(settings.get("vae_tiling", vae_tiling.DEFAULT_VAE_TILING)))
    return job, notes


def plan_folder_job(task: str, _handle_task: str, request: Request, path: Path) -> tuple[Job21, list[str]]:
    """``plan_job`` with the folder's own sigma grid (model_index.json ``sample_sigmas``, if set)."""
    index = read_json(path / "model_index.json", DISPLAY, "model_index.json")
    return plan_job(task, request, tuple(index["sample_sigmas"]) if index.get("sample_sigmas") else None)


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
    """Refuse a run that cannot fit before any weight is read; decide the VAE tiling (folder configs)."""
    tcfg = read_json(path / "transformer" / "config.json", DISPLAY, "transformer config")
    vcfg = read_json(path / "vae" / "config.json", DISPLAY, "vae config")
    return memory_check(job, tcfg, vcfg, plan)


def memory_check(job: Job21, tcfg: dict, vcfg: dict, plan: Plan) -> list[str]:
    """``check_memory`` on the transformer and VAE configs (from a folder or a Comfy file's headers)."""
    itemsize = torch.finfo(plan.compute).bits // 8
    tokens = (job.width // PATCH_PX) * (job.height // PATCH_PX) + len(job.images) * (job.resolution // PATCH_PX) ** 2
    inner = tcfg.get("num_attention_heads", 32) * tcfg.get("attention_head_dim", 128)
    transformer = transformer_bytes(tokens, inner, itemsize, job)
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

    name = "diffusers"

    def __init__(self, components: dict, sample_sigmas: tuple[float, ...] | None) -> None:
        import diffusers  # noqa: PLC0415

        self.processor = components["processor"].value
        self.pipe = diffusers.QwenImage21Pipeline(
            **{k: e.value for k, e in components.items()}, sample_sigmas=list(sample_sigmas) if sample_sigmas else None)
        self.pipe.set_progress_bar_config(disable=True)

    def total_steps(self, job: Job21) -> int:
        return job.steps  # the whole batch goes through each step at once

    def notes(self) -> list[str]:
        return []

    def generate(self, job: Job21, on_step: OnStep) -> torch.Tensor:
        def preview(pipe: Any, latents: torch.Tensor) -> Image.Image:
            # No published RGB map for the 64-channel latent: a small decode by the model's own VAE.
            return decode_preview(pipe.vae, pipe._unpack_latents(latents[:1], job.height, job.width,
                                                                 pipe.vae_scale_factor))

        callback = diffusers_callback(job, on_step, preview)
        prompt, negative = pipeline_texts(self.pipe, job.prompt, job.negative)
        # References the vision processor would resize again get a resize area inside its pixel range.
        resolution = fit_resolution(job.resolution, self.processor) if job.images else job.resolution
        args: dict[str, Any] = dict(
            prompt=prompt, true_cfg_scale=job.true_cfg, num_inference_steps=job.steps, sigmas=job.sigmas,
            width=job.width, height=job.height, num_images_per_prompt=job.batch_size, output_resolution=resolution,
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


def make_engine(engine: str, components: dict, job: Job21, plan: Plan) -> QwenImageEngine:
    if engine == "diffsynth":
        from .qwen_image_diffsynth import DiffSynthEngine21  # noqa: PLC0415

        return DiffSynthEngine21(components, plan, job.sample_sigmas)
    return Engine21(components, job.sample_sigmas)


def load_components(path: Path, _handle_task: str, plan: Plan, session: Session) -> dict:
    return loader21.load_components(path, plan, session)


def finish(out: torch.Tensor, job: Job21, handle: ModelHandle,
           engine: str) -> tuple[torch.Tensor, torch.Tensor, Pairs]:
    """IMAGE and MASK from the RGBA output; the summary says how many references and whether there was alpha."""
    image, mask = split_rgba(out)
    pairs = [*summary_pairs(handle, job), ("references", len(job.images)),
             ("alpha", "yes" if out.shape[1] > ALPHA_CHANNEL else "no"), ("engine", engine)]
    return image, mask, pairs


def files_generation(handle: ModelHandle, task_notes: list[str]) -> Generation:
    """The 2.1 generation on Comfy-Org's files (loaders/qwen_image21_files.py) instead of a pipeline folder: no
    folder sigma grid (ComfyUI's sampling shift is the scheduler's)."""
    from ..loaders import qwen_image21_files as files21  # noqa: PLC0415

    def plan(task: str, _handle_task: str, request: Request, _path: Path) -> tuple[Job21, list[str]]:
        job, notes = plan_job(task, request, None)
        return job, task_notes + notes

    def check(job: Job21, _path: Path, plan_: Plan) -> list[str]:
        return memory_check(job, *files21.configs(handle), plan_)

    def load(_path: Path, _task: str, plan_: Plan, session: Session) -> dict:
        return files21.load_components(handle, plan_, session)

    return Generation(plan=plan, check_memory=check, load_components=load, make_engine=make_engine, finish=finish,
                      step_caches=GENERATION.step_caches, no_cache=GENERATION.no_cache)


GENERATION = Generation(plan=plan_folder_job, check_memory=check_memory, load_components=load_components,
                        make_engine=make_engine, finish=finish, step_caches=("taylorseer",),
                        no_cache="diffusers' first_block cache does not know the 2.1 transformer's blocks")
