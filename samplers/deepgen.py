"""DeepGen 1.0 text-to-image and (multi-reference) editing: policies, then the official algorithm.

Policies owned here: defaults (50 steps, CFG 4.0, 512x512), the output size of an edit (one reference:
its resized size; several: 512x512 or the size asked for), the reference resize rule (stated in the text
output), the edit negative prompt, the LoRA switch, the memory estimate. The algorithm itself lives in
``modeling/deepgen`` (encode -> bridge -> dynamic SD3 loop -> VAE); every reference joins ONE
multi-reference edit, as the model was trained (not a batch of single edits).
"""
from __future__ import annotations

import dataclasses

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from .. import glue, registry
from ..errors import InputError, MemoryEstimateError
from ..loaders import deepgen as loader
from ..loaders.deepgen_lora import use_lora
from ..loaders.cache import CACHE, ModelHandle
from ..loaders.files import read_json
from ..loaders.memory import Plan, resolve
from ..loaders.placement import Placement, activate
from ..modeling.deepgen.encode import encode
from ..modeling.deepgen.prompts import RESIZE_RULES, VIT_SCALE, reference_size, to_pixels
from ..modeling.deepgen.sampling import decode, denoise, encode_references, generator, initial_noise
from . import speed
from .common import (Request, Result, Settings, check_finite, check_settings, format_notes, latent_preview,
                     round_size, to_rgb)
from .prompt_text import user_text

DISPLAY = "DeepGen"
SETTINGS_NODE = "Gentor DeepGen Settings"
DEFAULT_STEPS = 50
DEFAULT_CFG = 4.0
DEFAULT_SIZE = 512
OUTPUT_STEP = 16  # VAE 8x * DiT patch 2
MIN_STEPS = 1
MAX_STEPS = 1000
DEFAULT_PREVIEW_EVERY = 5
# GEdit-Bench's negative prompt, used by the official edit evaluation (T2I negative default: empty).
EDIT_NEGATIVE = ("blurry, low quality, low resolution, distorted, deformed, broken content, missing parts, damaged "
                 "details, artifacts, glitch, noise, pixelated, grainy, compression artifacts, bad composition, wrong "
                 "proportion, incomplete editing, unfinished, unedited areas.")
ROLES = ("vlm", "bridge", "transformer", "vae")
ATTENTION_FIXED = "DeepGen's DiT runs its own masked joint attention, not diffusers' attention dispatcher"
CACHE_FIXED = ("the SD3 DiT's last block returns no text stream, which diffusers' first_block cache cannot hold; "
               "taylorseer extrapolates the whole DiT output instead")
PROMPT_TOKENS_ESTIMATE = 256  # chat template + a long prompt
TOKEN_ACTIVATION_FACTOR = 16  # bytes held per token per inner channel in a DiT forward (q,k,v, MLP, modulation)
VAE_DECODE_FACTOR = 6  # SD3 VAE decoder: ~6 maps of 128 channels at full resolution
VAE_DECODE_CHANNELS = 128
VIT_TOKEN_PIXELS = 28 * 28
# SD3 latent space -> RGB (ComfyUI's SD3 latent format table), applied to scaled latents.
LATENT_RGB_FACTORS = torch.tensor([
    [-0.0922, -0.0175, 0.0749], [0.0311, 0.0633, 0.0954], [0.1994, 0.0927, 0.0458], [0.0856, 0.0339, 0.0902],
    [0.0587, 0.0272, -0.0496], [-0.0006, 0.1104, 0.0309], [0.0978, 0.0306, 0.0427], [-0.0042, 0.1038, 0.1358],
    [-0.0194, 0.0020, 0.0669], [-0.0488, 0.0130, -0.0268], [0.0922, 0.0988, 0.0951], [-0.0278, 0.0524, -0.0542],
    [0.0332, 0.0456, 0.0895], [-0.0069, -0.0030, -0.0810], [-0.0596, -0.0465, -0.0293], [-0.1448, -0.1463, -0.1189],
]).T.contiguous()
LATENT_RGB_BIAS = torch.tensor([0.2394, 0.2135, 0.1925])


@dataclass
class DeepGenJob:
    """A fully resolved run."""

    task: str
    prompt: str
    negative: str
    seed: int
    steps: int
    cfg: float
    width: int
    height: int
    batch_size: int
    references: list[torch.Tensor] = field(default_factory=list)  # [3, h, w] in [-1, 1]
    lora: bool = True
    preview_every: int = DEFAULT_PREVIEW_EVERY


def make_settings(reference_resize: str = "dynamic", edit_negative: str = EDIT_NEGATIVE, lora: bool = True,
                  preview_every: int = DEFAULT_PREVIEW_EVERY) -> Settings:
    """What GentorDeepGenSettings outputs (defaults = the official references')."""
    if reference_resize not in RESIZE_RULES:
        raise InputError(f"{DISPLAY} reference_resize: unknown rule (got {reference_resize!r}, expected one of "
                         f"{', '.join(RESIZE_RULES)}). Pick a rule from the list.")
    if preview_every < 0:
        raise InputError(f"{DISPLAY} preview_every: negative (got {preview_every}, expected 0 = off or more). "
                         "Set 0 or a positive step interval.")
    return Settings("deepgen", (("reference_resize", reference_resize), ("edit_negative", edit_negative),
                                ("lora", bool(lora)), ("preview_every", int(preview_every))))


def plan_job(task: str, request: Request) -> tuple[DeepGenJob, list[str]]:
    """Apply the backend's policies to a request; return the job and notes for the user."""
    check_settings(request.settings, "deepgen", DISPLAY, SETTINGS_NODE)
    settings = request.settings or make_settings()
    notes: list[str] = []
    spec = registry.get("deepgen")
    images = [to_rgb(i) for i in request.images] if task == "edit" else []
    if task == "edit":
        if not images:
            raise InputError(f"{DISPLAY} image_1: no image to edit (got no image inputs, expected 1.."
                             f"{spec.max_references} images). Connect an image to image_1, or use Gentor Text to "
                             "Image.")
        if len(images) > spec.max_references:
            raise InputError(f"{DISPLAY} images: too many references (got {len(images)}, expected at most "
                             f"{spec.max_references}). Combine references or drop some.")
        if not request.prompt.strip():
            raise InputError(f"{DISPLAY} prompt: the edit instruction is empty (got {request.prompt!r}, expected "
                             "what to change, e.g. 'make the sky stormy'). Write an instruction.")
    steps = int(request.steps or DEFAULT_STEPS)
    if not MIN_STEPS <= steps <= MAX_STEPS:
        raise InputError(f"{DISPLAY} steps: out of range (got {steps}, expected {MIN_STEPS}..{MAX_STEPS} or 0 for "
                         f"{DEFAULT_STEPS}). Choose a step count in range.")
    cfg = float(request.cfg or DEFAULT_CFG)
    if cfg <= 1.0:
        notes.append(f"cfg {cfg:g} <= 1: no classifier-free guidance (one DiT pass per step)")
    asked = (request.width or DEFAULT_SIZE, request.height or DEFAULT_SIZE)
    references = []
    if images:
        rule = settings.get("reference_resize", "dynamic")
        for i, img in enumerate(images, 1):
            size = reference_size(img.width, img.height, rule, asked)
            if size != img.size:
                notes.append(f"image_{i} {img.width}x{img.height} resized to {size[0]}x{size[1]} (reference_resize "
                             f"{rule}: {_rule_words(rule, asked)})")
            references.append(to_pixels(img, size))
    if images and len(images) == 1 and not (request.width or request.height):
        width, height = references[0].shape[2], references[0].shape[1]  # the official CLI: follow the reference
    else:
        width, height = asked
    width, height = round_size(width, "width", notes, OUTPUT_STEP), round_size(height, "height", notes, OUTPUT_STEP)
    negative = request.negative
    if not negative.strip() and task == "edit":
        negative = settings.get("edit_negative", EDIT_NEGATIVE)
    job = DeepGenJob(task, request.prompt, negative, int(request.seed), steps, cfg, width, height,
                     int(request.batch_size or 1), references, bool(settings.get("lora", True)),
                     int(settings.get("preview_every", DEFAULT_PREVIEW_EVERY)))
    return job, notes


def _rule_words(rule: str, asked: tuple[int, int]) -> str:
    if rule == "dynamic":
        return f"long side at most {max(asked)}, sides rounded up to 32"
    if rule == "fix_pixels":
        return "area 512x512 at the image's aspect, sides rounded up to 32"
    return f"exactly {asked[0]}x{asked[1]}"


def estimate_bytes(job: DeepGenJob, dit_config: dict, device: torch.device, itemsize: int) -> int:
    """Activation memory of one run (weights are accounted by the placement layer)."""
    inner = int(dit_config["num_attention_heads"]) * int(dit_config["attention_head_dim"])
    heads = int(dit_config["num_attention_heads"])
    image = (job.width // OUTPUT_STEP) * (job.height // OUTPUT_STEP)
    image += sum((r.shape[1] // OUTPUT_STEP) * (r.shape[2] // OUTPUT_STEP) for r in job.references)
    vit = sum(int(r.shape[1] * r.shape[2] * VIT_SCALE**2) // VIT_TOKEN_PIXELS for r in job.references)
    text = PROMPT_TOKENS_ESTIMATE + vit
    rows = job.batch_size * (2 if job.cfg > 1 else 1)
    tokens = image + text
    total = rows * tokens * inner * itemsize * TOKEN_ACTIVATION_FACTOR
    if device.type == "cpu":
        total += rows * heads * tokens * tokens * 4  # SDPA's math path holds the score matrix in fp32
    total += job.batch_size * job.width * job.height * VAE_DECODE_CHANNELS * itemsize * VAE_DECODE_FACTOR
    return int(total)


def check_memory(job: DeepGenJob, handle: ModelHandle, plan: Plan) -> None:
    """Refuse before anything is loaded when the activations would not fit the device."""
    config_path = Path(handle.path(loader.DIFFUSION_INPUT)) / "transformer" / "config.json"
    config = read_json(config_path, DISPLAY, "transformer config")
    need = estimate_bytes(job, config, plan.device, torch.finfo(plan.compute).bits // 8)
    free = glue.free_memory_bytes(plan.device)
    if need > free:
        what = f"{len(job.references)} reference image(s) and " if job.references else ""
        raise MemoryEstimateError(
            f"{DISPLAY} images: {what}a {job.width}x{job.height} output need about {need / 1e9:.1f} GB for "
            f"activations (got {free / 1e9:.1f} GB free on {plan.device}, expected at least the estimate). Use fewer "
            "or smaller references (reference_resize), a smaller size or batch; nothing was allocated.")


def generate(components: dict[str, Any], job: DeepGenJob, device: torch.device,
             on_step: Callable[[int, Image.Image | None], None], offload: str = "none") -> torch.Tensor:
    """The official algorithm on loaded components; returns ComfyUI IMAGE [B, H, W, 3]."""
    vlm, bridge = components["vlm"].value, components["bridge"].value
    dit, vae = components["transformer"].value, components["vae"].value
    processor = components["processor"].value
    tokenizer = getattr(processor, "tokenizer", processor)
    b = job.batch_size
    gen = generator(job.seed)
    noise = initial_noise(gen, b, job.height, job.width)  # drawn first, then the reference posteriors
    ref_latents = encode_references(vae, job.references, gen, device) if job.references else []
    if offload == "model":
        # The VLM is driven through grandchildren (model.visual, model.language_model), which model offload's
        # hooks on the component and its direct children do not see: put it on the device explicitly.
        activate(components["vlm"], device)
    cond = encode(vlm, tokenizer, bridge, [user_text(tokenizer, job.prompt, "prompt", "deepgen")] * b,
                  [user_text(tokenizer, job.negative, "negative", "deepgen")] * b, job.references, device)
    positive, negative = cond.halves()

    def step(i: int, latents: torch.Tensor) -> None:
        preview = None
        if job.preview_every and i % job.preview_every == 0 and i < job.steps:
            preview = latent_preview(latents[0], LATENT_RGB_FACTORS, LATENT_RGB_BIAS)
        on_step(i, preview)

    latents = denoise(dit, components["scheduler"], noise.to(device), positive, negative, ref_latents, job.steps,
                      job.cfg, step)
    images = decode(vae, latents)
    return images.permute(0, 2, 3, 1).contiguous().cpu()


def run(handle: ModelHandle, task: str, request: Request,
        listener: Callable[[int, int, Any], None] | None = None) -> Result:
    """Generate with a DeepGen handle; ``task`` is "t2i" or "edit"."""
    handle.check_exists(DISPLAY)
    job, notes = plan_job(task, request)
    plan = resolve(handle.memory, glue.torch_device())
    notes.extend(plan.notes)
    check_memory(job, handle, plan)
    support = dataclasses.replace(speed.engine_support("diffusers", plan, ("taylorseer",), CACHE_FIXED),
                                  no_attention=ATTENTION_FIXED)
    speed.check_usable(request.speed, DISPLAY, plan.device, support)
    progress = glue.Progress(job.steps, listener)
    spec = registry.get("deepgen")
    with CACHE.session() as session:
        components = loader.load_components(handle, plan, session)
        lora = use_lora(handle, session, components["vlm"], job.lora)
        placement = Placement({r: components[r] for r in ROLES}, dict(spec.blocks), plan, DISPLAY)
        with placement.running() as placed, torch.inference_mode():
            # CFG runs as one batched pass per step: one branch for the cache's step count.
            with speed.applied(components["transformer"].value, request.speed, DISPLAY, job.steps,
                               whole_model=True) as fast:
                image = generate(components, job, placed.device, progress.update, placed.offload)
        notes.extend(placement.notes + fast.lines())
    check_finite(image, DISPLAY, "try compute_dtype fp32 or bf16 in Gentor Memory Options (fp16 overflows easily)")
    pairs = [("model", handle.variant), ("size", f"{job.width}x{job.height}"), ("steps", job.steps),
             ("cfg", job.cfg), ("seed", job.seed), ("references", len(job.references)),
             ("lora", "on" if lora else ("off" if handle.info_dict.get("lora_rank", "0") != "0" else "none"))]
    return Result(image, format_notes(pairs, notes))
