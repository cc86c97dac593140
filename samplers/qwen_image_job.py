"""What the two Qwen-Image generations share, and the one run both go through.

The backend's entry point is ``samplers/qwen_image.run``; it picks a ``Generation`` (1.x in
``qwen_image.py``, 2.1 in ``qwen_image21.py``) and hands it to ``execute``, which plans the job, picks
and checks the engine, refuses a run that cannot fit, loads, places and samples. The generations own
their policies (sizes, defaults, memory estimate, pipelines, output); this module owns the settings node's
values, the job's common fields, the engine contract, the engine choice and the LoRA switch.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import torch
from PIL import Image

from .. import glue, registry
from ..errors import InputError, MissingDependencyError
from ..loaders import lora as lora_files
from ..loaders import qwen_image_diffsynth as ds_views
from ..loaders.cache import CACHE, Entry, ModelHandle, Session
from ..loaders.memory import Plan, resolve
from ..loaders.placement import Placement, has_block_offload, remove_block_offload
from . import qwen_image_vae as vae_tiling
from . import speed
from .common import Request, Result, Settings, check_finite, format_notes

log = logging.getLogger(__name__)

BACKEND = "qwen_image"
DISPLAY = "Qwen-Image"
EMPTY_NEGATIVE = " "  # diffusers only runs true CFG when a negative prompt is passed
DEFAULT_MAX_SEQUENCE_LENGTH = 512
MAX_SEQUENCE_LENGTH = 1024
# Qwen's chat format: the T2I pipelines drop the system turn and "<|im_start|>user\n" from the encoder's output,
# so what max_sequence_length cuts is the prompt plus the turn's closing tokens.
USER_OPEN, USER_CLOSE = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"
DEFAULT_PREVIEW_EVERY = 5
SCHEDULES = ("model", "lightning")
MIN_STEPS = 2
# Rough bytes per token per inner-dim channel held during a transformer forward (q,k,v,attn out,
# 4x MLP hidden, modulated copies).
TOKEN_ACTIVATION_FACTOR = 16
NON_FINITE_HINT = "try compute_dtype fp32 or bf16 in Gentor Memory Options (fp16 overflows easily)"

OnStep = Callable[[int, Image.Image | None], None]  # (steps done, latent preview or None)
Pairs = list[tuple[str, Any]]


@dataclass(kw_only=True)
class QwenJob:
    """The fields every resolved Qwen-Image job has; each generation adds its own."""

    prompt: str
    negative: str
    seed: int
    steps: int
    true_cfg: float
    width: int
    height: int
    batch_size: int
    images: list[Image.Image] = field(default_factory=list)
    preview_every: int = DEFAULT_PREVIEW_EVERY
    schedule: str = "model"
    vae_tiling: str = vae_tiling.DEFAULT_VAE_TILING  # the setting (auto / on / off)
    tiled_vae: bool = False  # what the generation's check_memory decided


class QwenImageEngine(Protocol):
    """Runs a resolved job; ``on_step(done, latent_preview_or_None)`` after every step (``done`` counts up to
    ``total_steps(job)``)."""

    name: str

    def total_steps(self, job: Any) -> int: ...

    def notes(self) -> list[str]: ...

    def generate(self, job: Any, on_step: OnStep) -> torch.Tensor: ...


@dataclass(frozen=True)
class Generation:
    """One Qwen-Image generation's parts, as ``execute`` calls them (in this order)."""

    # (task, handle_task, request, folder) -> (job, notes)
    plan: Callable[[str, str, Request, Path], tuple[Any, list[str]]]
    # (job, folder, plan) -> notes; refuses before any weight is read, decides job.tiled_vae
    check_memory: Callable[[Any, Path, Plan], list[str]]
    # (folder, handle_task, plan, session) -> cached components
    load_components: Callable[[Path, str, Plan, Session], dict]
    # (engine name, components, job, placed plan) -> engine
    make_engine: Callable[[str, dict, Any, Plan], QwenImageEngine]
    # (engine output, job, handle, engine name) -> (IMAGE, MASK or None, summary pairs)
    finish: Callable[[torch.Tensor, Any, ModelHandle, str], tuple[torch.Tensor, torch.Tensor | None, Pairs]]
    # the Speed Options step caches this generation's transformer takes, and why not the others
    step_caches: tuple[str, ...] = speed.DIT_CACHES
    no_cache: str = ""


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
    return Settings(BACKEND, (("max_sequence_length", max_sequence_length), ("preview_every", preview_every),
                              ("schedule", schedule), ("vae_tiling", vae_tiling_mode)))


def encoded_length(tokenizer: Any, text: str) -> int:
    """How many encoder outputs a T2I prompt gives after the system turn is dropped (the prompt's tokens and the
    turn's closing tokens), as max_sequence_length counts them."""
    turn = tokenizer(USER_OPEN + text + USER_CLOSE, add_special_tokens=False).input_ids
    return len(turn) - len(tokenizer(USER_OPEN, add_special_tokens=False).input_ids)


def truncation_notes(tokenizer: Any, texts: list[tuple[str, str]], limit: int) -> list[str]:
    """A note for each (input name, text) longer than ``limit`` encoder outputs: its end is cut, not used."""
    notes = []
    for name, text in texts:
        n = encoded_length(tokenizer, text)
        if n > limit:
            todo = (f"raise max_sequence_length in Gentor Qwen-Image Settings (up to {MAX_SEQUENCE_LENGTH}) or "
                    f"shorten the {name}") if limit < MAX_SEQUENCE_LENGTH else f"shorten the {name}"
            notes.append(f"{name}: {n} tokens, only the first {limit} were used (the rest was cut); {todo}")
    return notes


def length_notes(tokenizer: Any, job: Any, prompt: str, negative: str) -> list[str]:
    """Say when max_sequence_length cut a 1.x T2I prompt (and the negative one, when true CFG runs it)."""
    texts = [("prompt", prompt)] + ([("negative", negative)] if job.true_cfg > 1 else [])
    return truncation_notes(tokenizer, texts, job.max_sequence_length)


def negative_of(request: Request) -> str:
    """The negative prompt to run with: " " when empty, so a true-CFG run really has one."""
    return request.negative if request.negative.strip() else EMPTY_NEGATIVE


def require_image(task: str, images: list, most: int) -> None:
    if task == "edit" and not images:
        raise InputError(f"{DISPLAY} image_1: no image to edit (got no image inputs, expected 1..{most} "
                         "images). Connect an image to image_1, or use Gentor Text to Image.")


def check_steps(steps: int) -> None:
    if steps < MIN_STEPS:
        # The scheduler stretches sigmas so the last one is shift_terminal; with one step it divides by zero.
        raise InputError(f"{DISPLAY} steps: too few steps (got {steps}, expected at least {MIN_STEPS} or 0 for the "
                         "default). Raise steps to 2 or more.")


def transformer_bytes(tokens: int, inner: int, itemsize: int, job: QwenJob) -> int:
    """Activation bytes of the transformer forward over ``tokens`` (true CFG runs it twice)."""
    cfg_mult = 2 if job.true_cfg > 1 else 1
    return tokens * inner * itemsize * TOKEN_ACTIVATION_FACTOR * job.batch_size * cfg_mult


def wants_preview(job: QwenJob, done: int) -> bool:
    """A preview after step ``done`` (1-based): every ``preview_every`` steps, never after the last."""
    return job.preview_every > 0 and done % job.preview_every == 0 and done < job.steps


def diffusers_callback(job: QwenJob, on_step: OnStep,
                       preview: Callable[[Any, torch.Tensor], Image.Image]) -> Callable[..., dict]:
    """diffusers' ``callback_on_step_end``: progress after every step, ``preview(pipe, latents)`` when due."""
    def callback(pipe: Any, i: int, _t: Any, kwargs: dict) -> dict:
        on_step(i + 1, preview(pipe, kwargs["latents"]) if wants_preview(job, i + 1) else None)
        return {}
    return callback


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


def summary_pairs(handle: ModelHandle, job: QwenJob) -> Pairs:
    """The summary line's leading pairs, the same for both generations."""
    return [("model", handle.variant), ("size", f"{job.width}x{job.height}"), ("steps", job.steps),
            ("true_cfg", job.true_cfg), ("seed", job.seed)]


def execute(generation: Generation, handle: ModelHandle, task: str, request: Request,
            listener: Callable[[int, int, Any], None] | None = None) -> Result:
    """Plan, check and run one request on ``generation`` with the handle's engine, memory options and LoRAs."""
    handle_task = handle.info_dict["task"]
    path = Path(handle.path())
    job, notes = generation.plan(task, handle_task, request, path)
    engine, engine_notes = choose_engine(handle, handle_task)
    notes.extend(engine_notes)
    plan = resolve(handle.memory, glue.torch_device())
    notes.extend(plan.notes)
    notes.extend(generation.check_memory(job, path, plan))
    notes.extend(lora_files.lightning_notes(handle, job.steps, job.true_cfg, job.schedule))
    speed.check_usable(request.speed, DISPLAY, plan.device,
                       speed.engine_support(engine, plan, generation.step_caches, generation.no_cache))
    spec = registry.get(BACKEND)
    with CACHE.session() as session:
        components = generation.load_components(path, handle_task, plan, session)
        notes.extend(use_loras(session, components["transformer"], handle, plan))
        placement = Placement(components, dict(spec.blocks), plan, DISPLAY,
                              mover="diffsynth" if engine == "diffsynth" else "")
        with placement.running() as placed:
            runner = generation.make_engine(engine, components, job, placed)
            progress = glue.Progress(runner.total_steps(job), listener)
            with speed.applied(components["transformer"].value, request.speed, DISPLAY, job.steps,
                               speed.cfg_branches(job.true_cfg)) as fast:
                out = runner.generate(job, lambda i, preview: progress.update(i, preview))
            notes.extend(runner.notes() + fast.lines())
        notes.extend(placement.notes)
    image, mask, pairs = generation.finish(out, job, handle, engine)
    check_finite(image, DISPLAY, NON_FINITE_HINT)
    return Result(image, format_notes(pairs, notes), mask=mask)
