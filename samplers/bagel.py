"""BAGEL-7B-MoT: T2I, edit, multi-image edit, think mode and image understanding.

Policies (backend_specs.md §1.4-1.5): the common ``steps`` / ``cfg`` are num_timesteps / cfg_text_scale;
GentorBagelSettings holds the rest, with "auto" values meaning the official defaults of the task (T2I:
cfg_img 1.0, interval [0.4, 1], global renorm; edit: cfg_img 2.0, interval [0, 1], text_channel renorm).
Sizes: T2I default 1024x1024, sides rounded to 16 px and refused above 1024 (the model's 64x64 latent
position table); edits with width/height 0 take the size the last reference gets from the VAE rule
(long side <= 1024, short >= 512, multiples of 16), as the reference code does; non-zero sides are used. BAGEL has no negative prompt: its "unconditional" branches are the
contexts without the instruction / without the images.
Seeds: one CPU ``torch.Generator`` seeded with the node's seed draws, in order, the autoencoder posterior
noise of each reference, the think tokens when sampling, then the initial noise of each batch item.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from .. import glue, registry
from ..errors import InputError, MemoryEstimateError
from ..loaders import bagel as loader
from ..loaders.cache import CACHE, ModelHandle
from ..loaders.memory import Plan, resolve
from ..modeling.bagel import BagelEngine, FlowSettings
from ..modeling.bagel.embeddings import unpatchify_latent
from ..modeling.bagel.flow import RENORM_TYPES
from ..modeling.bagel.preprocess import MAX_PIXELS, VAE_RULE, VIT_RULE, ResizeRule
from . import speed
from .common import (Request, Result, Settings, check_finite, check_settings, chw_to_image, format_notes,
                     latent_preview, round_size, to_rgb)
from .prompt_text import user_text

log = logging.getLogger(__name__)

DISPLAY = "BAGEL"
SETTINGS_NODE = "Gentor BAGEL Settings"
SPEED_SUPPORT = speed.Support(
    caches=("taylorseer",),
    no_cache="BAGEL's velocity is one call into its Mixture-of-Transformers, not a stack of diffusers blocks: "
             "only taylorseer, which extrapolates the whole velocity, applies",
    no_attention="BAGEL runs its own packed attention, not diffusers' attention dispatcher",
    no_compile="BAGEL's passes change shape with every context, so compiled blocks are not wired for it")
DEFAULT_STEPS = 50
DEFAULT_CFG_TEXT = 4.0
DEFAULT_SIZE = 1024
DEFAULT_SHIFT = 3.0
DEFAULT_THINK_TOKENS = 1000
DEFAULT_ANSWER_TOKENS = 1000  # the reference's max_think_token_n also bounds understanding answers
MAX_TOKENS = 8192
MIN_STEPS = 2  # grid points: steps - 1 Euler updates
AUTO = "auto"
AUTO_NUMBER = -1.0
DEFAULT_QUESTION = "Describe this image in detail."
DEFAULT_PREVIEW_EVERY = 5
# Official defaults per task (inference notebook / app): T2I and edit differ.
TASK_DEFAULTS = {
    "t2i": {"cfg_img": 1.0, "interval": (0.4, 1.0), "renorm": "global", "renorm_min": 0.0},
    "edit": {"cfg_img": 2.0, "interval": (0.0, 1.0), "renorm": "text_channel", "renorm_min": 0.0},
}
RENORM_CHOICES = (AUTO,) + RENORM_TYPES
# ComfyUI's FLUX latent -> RGB preview factors (comfy/latent_formats.py, class Flux): BAGEL uses FLUX's
# autoencoder and its latents are normalised the same way.
LATENT_RGB_FACTORS = torch.tensor([
    [-0.0346, 0.0244, 0.0681], [0.0034, 0.0210, 0.0687], [0.0275, -0.0668, -0.0433], [-0.0174, 0.0160, 0.0617],
    [0.0859, 0.0721, 0.0329], [0.0004, 0.0383, 0.0115], [0.0405, 0.0861, 0.0915], [-0.0236, -0.0185, -0.0259],
    [-0.0245, 0.0250, 0.1180], [0.1008, 0.0755, -0.0421], [-0.0515, 0.0201, 0.0011], [0.0428, -0.0012, -0.0036],
    [0.0817, 0.0765, 0.0749], [-0.1264, -0.0522, -0.1103], [-0.0280, -0.0881, -0.0499], [-0.1262, -0.0982, -0.0778],
]).T.contiguous()
LATENT_RGB_BIAS = torch.tensor([-0.0329, -0.0718, -0.0851])
# Memory estimate: bytes per query token per hidden channel held during one MoT forward (q/k/v, attention
# out, residual, the 3 MLP projections relative to hidden), and per pixel per autoencoder channel.
TOKEN_ACTIVATION_FACTOR = 24
AE_PIXEL_FACTOR = 6
SYSTEM_PROMPT_TOKENS = 64


@dataclass
class BagelJob:
    task: str  # t2i | edit | understand
    prompt: str
    seed: int
    flow: FlowSettings
    size: tuple[int, int]  # (height, width) of the output; edits: from the last reference
    batch: int = 1
    images: list[Image.Image] = field(default_factory=list)
    think: bool = False
    max_tokens: int = DEFAULT_THINK_TOKENS
    temperature: float = 0.0
    vae_rule: ResizeRule = VAE_RULE
    vit_rule: ResizeRule = VIT_RULE
    preview_every: int = DEFAULT_PREVIEW_EVERY


def _bad(name: str, problem: str, got: Any, expected: str, todo: str) -> InputError:
    return InputError(f"{DISPLAY} {name}: {problem} (got {got}, expected {expected}). {todo}.")


def make_settings(cfg_img_scale: float = AUTO_NUMBER, cfg_interval_start: float = AUTO_NUMBER,
                  cfg_interval_end: float = 1.0, cfg_renorm_type: str = AUTO, cfg_renorm_min: float = 0.0,
                  timestep_shift: float = DEFAULT_SHIFT, think: bool = False,
                  think_max_tokens: int = DEFAULT_THINK_TOKENS, think_temperature: float = 0.0,
                  image_max_side: int = VAE_RULE.max_size, image_min_side: int = VAE_RULE.min_size,
                  preview_every: int = DEFAULT_PREVIEW_EVERY) -> Settings:
    """GENTOR_SETTINGS of GentorBagelSettings; -1 / "auto" = the official default of the task."""
    if cfg_img_scale != AUTO_NUMBER and cfg_img_scale < 0:
        raise _bad("cfg_img_scale", "negative scale", cfg_img_scale, "-1 (auto) or >= 0", "Use 2.0 for edits, 1.0 for T2I")
    start = cfg_interval_start
    if (start != AUTO_NUMBER and not 0.0 <= start <= 1.0) or not 0.0 <= cfg_interval_end <= 1.0 or \
            (start != AUTO_NUMBER and start >= cfg_interval_end):
        raise _bad("cfg_interval_start/end", "not an interval inside [0, 1]", f"[{start}, {cfg_interval_end}]",
                   "0 <= start < end <= 1 (start -1 = auto)", "Use [0.4, 1.0] (T2I) or [0.0, 1.0] (edit)")
    if cfg_renorm_type not in RENORM_CHOICES:
        raise _bad("cfg_renorm_type", "unknown renorm type", repr(cfg_renorm_type), " / ".join(RENORM_CHOICES),
                   "Pick one of the listed types")
    if not 0.0 <= cfg_renorm_min <= 1.0:
        raise _bad("cfg_renorm_min", "out of range", cfg_renorm_min, "0..1 (1 disables renorm)", "Use 0.0")
    if timestep_shift <= 0:
        raise _bad("timestep_shift", "not positive", timestep_shift, "> 0", "Use 3.0 (official)")
    if not 1 <= think_max_tokens <= MAX_TOKENS or think_temperature < 0:
        raise _bad("think_max_tokens/think_temperature", "out of range", f"{think_max_tokens} / {think_temperature}",
                   f"1..{MAX_TOKENS} tokens and temperature >= 0 (0 = greedy)", "Use 1000 and 0 (official)")
    if image_min_side < VAE_RULE.stride or image_max_side < image_min_side or image_max_side > VAE_RULE.max_size:
        raise _bad("image_max_side/image_min_side", "impossible resize bounds", f"{image_max_side} / {image_min_side}",
                   f"{VAE_RULE.stride} <= min <= max <= {VAE_RULE.max_size}", "Use 1024 / 512 (official)")
    return Settings("bagel", (
        ("cfg_img_scale", float(cfg_img_scale)), ("cfg_interval_start", float(start)),
        ("cfg_interval_end", float(cfg_interval_end)), ("cfg_renorm_type", cfg_renorm_type),
        ("cfg_renorm_min", float(cfg_renorm_min)), ("timestep_shift", float(timestep_shift)), ("think", bool(think)),
        ("think_max_tokens", int(think_max_tokens)), ("think_temperature", float(think_temperature)),
        ("image_max_side", int(image_max_side)), ("image_min_side", int(image_min_side)),
        ("preview_every", int(preview_every))))


def resize_rules(settings: Settings) -> tuple[ResizeRule, ResizeRule]:
    """The VAE rule from the settings; the ViT rule scaled with it (official 980/224 at 1024/512)."""
    hi, lo = int(settings.get("image_max_side", VAE_RULE.max_size)), int(settings.get("image_min_side", VAE_RULE.min_size))
    if (hi, lo) == (VAE_RULE.max_size, VAE_RULE.min_size):
        return VAE_RULE, VIT_RULE
    p = VIT_RULE.stride
    vit_hi = min(VIT_RULE.max_size, max(p, hi // p * p))
    vit_lo = min(VIT_RULE.min_size, max(p, lo // p * p), vit_hi)
    return ResizeRule(hi, lo, VAE_RULE.stride, MAX_PIXELS), ResizeRule(vit_hi, vit_lo, p, MAX_PIXELS)


def plan_job(task: str, request: Request, max_side: int) -> tuple[BagelJob, list[str]]:
    """Apply the backend's policies to a request; return the job and notes for the user."""
    notes: list[str] = []
    check_settings(request.settings, "bagel", DISPLAY, SETTINGS_NODE)
    settings = request.settings or make_settings()
    images = [to_rgb(i) for i in request.images]
    vae_rule, vit_rule = resize_rules(settings)
    if task not in ("t2i", "edit", registry.TASK_UNDERSTAND):
        raise _bad("model", "unknown task", repr(task), "t2i, edit or understand", "Use a Gentor task node")
    if task in ("edit", registry.TASK_UNDERSTAND) and not images:
        what = "no image to edit" if task == "edit" else "no image to look at"
        raise _bad("image_1", what, "no image inputs", "1 or more images", "Connect an image to image_1")
    if task == "edit" and not request.prompt.strip():
        raise _bad("prompt", "empty instruction", "an empty prompt", "what to change, e.g. 'make the sky purple'",
                   "Write the edit instruction")
    if request.negative.strip() and task != registry.TASK_UNDERSTAND:
        notes.append("BAGEL has no negative prompt: 'negative' ignored (its guidance drops the instruction instead)")
    defaults = TASK_DEFAULTS["edit" if task == "edit" else "t2i"]
    cfg_img = settings.get("cfg_img_scale", AUTO_NUMBER)
    start = settings.get("cfg_interval_start", AUTO_NUMBER)
    renorm = settings.get("cfg_renorm_type", AUTO)
    steps = int(request.steps or DEFAULT_STEPS) if task != registry.TASK_UNDERSTAND else MIN_STEPS
    if steps < MIN_STEPS:
        raise _bad("steps", "too few steps", steps, f"at least {MIN_STEPS} (0 = {DEFAULT_STEPS})",
                   "Raise steps (BAGEL takes steps - 1 Euler updates)")
    flow = FlowSettings(
        steps=steps, cfg_text=float(request.cfg or DEFAULT_CFG_TEXT),
        cfg_img=defaults["cfg_img"] if cfg_img == AUTO_NUMBER else float(cfg_img),
        cfg_interval=(defaults["interval"][0] if start == AUTO_NUMBER else float(start),
                      float(settings.get("cfg_interval_end", 1.0))),
        renorm=defaults["renorm"] if renorm == AUTO else renorm,
        renorm_min=float(settings.get("cfg_renorm_min", defaults["renorm_min"])),
        shift=float(settings.get("timestep_shift", DEFAULT_SHIFT)))
    if task == "t2i":
        height = _side(request.height or DEFAULT_SIZE, "height", notes, max_side)
        width = _side(request.width or DEFAULT_SIZE, "width", notes, max_side)
    else:
        # 0 = the reference's rule (the size the last reference gets); a non-zero side is honoured (DESIGN §3)
        w, h = vae_rule.size(*images[-1].size)
        height = _side(request.height, "height", notes, max_side) if request.height else h
        width = _side(request.width, "width", notes, max_side) if request.width else w
    batch = int(request.batch_size or 1)
    if task == registry.TASK_UNDERSTAND:
        max_tokens = int(request.steps or DEFAULT_ANSWER_TOKENS)
        if not 1 <= max_tokens <= MAX_TOKENS:
            raise _bad("max_new_tokens", "out of range", max_tokens, f"1..{MAX_TOKENS} or 0 for {DEFAULT_ANSWER_TOKENS}",
                       "Set a token budget in that range")
    else:
        max_tokens = int(settings.get("think_max_tokens", DEFAULT_THINK_TOKENS))
    prompt = request.prompt.strip() or (DEFAULT_QUESTION if task == registry.TASK_UNDERSTAND else "")
    job = BagelJob(task, prompt, int(request.seed), flow, (height, width), batch, images,
                   bool(settings.get("think", False)), max_tokens, float(settings.get("think_temperature", 0.0)),
                   vae_rule, vit_rule, max(1, int(settings.get("preview_every", DEFAULT_PREVIEW_EVERY))))
    return job, notes


def _side(value: int, name: str, notes: list[str], max_side: int) -> int:
    rounded = round_size(int(value), name, notes)
    if rounded > max_side:
        # The latent position table covers max_side pixels; a larger side would index past it.
        raise _bad(name, "larger than BAGEL can generate", value, f"at most {max_side} (the model's 64x64 latent "
                   "position table)", f"Set {name} to {max_side} or less (0 = {DEFAULT_SIZE})")
    return rounded


# ----------------------------------------------------------------------------- memory estimate
def context_tokens(job: BagelJob, cfg: Any, tokenizer_bytes_per_token: float = 1.0) -> int:
    """Tokens in the gen context: each reference as a VAE block + a ViT block, the text, think text."""
    total = SYSTEM_PROMPT_TOKENS if job.think else 0
    for image in job.images:
        w, h = job.vae_rule.size(*image.size)
        vw, vh = job.vit_rule.size(w, h)
        if job.task != registry.TASK_UNDERSTAND:
            total += (w // cfg.latent_downsample) * (h // cfg.latent_downsample) + 2
        total += (vw // cfg.vit.patch_size) * (vh // cfg.vit.patch_size) + 2
    total += int(len(job.prompt.encode()) / tokenizer_bytes_per_token) + 2
    if job.think or job.task == registry.TASK_UNDERSTAND:
        total += job.max_tokens + 2
    return total


def estimate_bytes(job: BagelJob, cfg: Any, itemsize: int) -> int:
    """Activation + KV-cache bytes of one run (weights are accounted separately)."""
    llm = cfg.llm
    ctx = context_tokens(job, cfg)
    kv_per_token = llm.num_layers * 2 * llm.num_kv_heads * llm.head_dim * itemsize
    caches = 2 * ctx * kv_per_token  # gen + cfg_text (which holds the images again); cfg_img is text only
    h, w = job.size
    query = (h // cfg.latent_downsample) * (w // cfg.latent_downsample) + 2
    if job.task == registry.TASK_UNDERSTAND:
        query = 1
    step = query * (llm.hidden_size * TOKEN_ACTIVATION_FACTOR + 3 * llm.intermediate_size) * itemsize
    # one layer's merged keys/values (SDPA's fused kernels never hold the score matrix: no scores term)
    step += (ctx + query) * kv_per_token // llm.num_layers
    vit_tokens = max((job.vit_rule.size(*job.vae_rule.size(*i.size))[0] // cfg.vit.patch_size) *
                     (job.vit_rule.size(*job.vae_rule.size(*i.size))[1] // cfg.vit.patch_size)
                     for i in job.images) if job.images else 0
    vit = vit_tokens * (cfg.vit.hidden_size * 8 + cfg.vit.intermediate_size) * itemsize
    ae = h * w * cfg.ae.ch * max(cfg.ae.ch_mult[:1]) * AE_PIXEL_FACTOR * itemsize
    return int(caches + max(step, vit, ae))


def check_memory(job: BagelJob, cfg: Any, path: Path, plan: Plan) -> None:
    """Refuse a run that cannot fit BEFORE any weight is read (configs and weight headers only)."""
    itemsize = plan.compute.itemsize
    need = estimate_bytes(job, cfg, itemsize)
    weights = 0
    if plan.device.type == "cpu" and not CACHE.entries(loader.KIND_MODEL):
        # On a CPU the device memory IS the RAM the weights still have to be read into.
        weights = loader.parameter_count(path) * plan.precision.storage.itemsize
    free = glue.free_memory_bytes(plan.device)
    if need + weights > free:
        refs = f" with {len(job.images)} reference image(s)" if job.images else ""
        raise MemoryEstimateError(
            f"{DISPLAY} image_1..image_{max(1, len(job.images))}/width/height: {job.size[1]}x{job.size[0]}{refs} needs "
            f"about {(need + weights) / 1e9:.1f} GB ({need / 1e9:.1f} GB activations and KV caches + "
            f"{weights / 1e9:.1f} GB weights to load; got {free / 1e9:.1f} GB free on {plan.device}, expected at least "
            "the estimate). Use fewer or smaller references (image_max_side in Gentor BAGEL Settings), a smaller "
            "size, or free memory; nothing was allocated.")


# ----------------------------------------------------------------------------- running
def _preview(x0: torch.Tensor, job: BagelJob, cfg: Any) -> Image.Image:
    h, w = job.size
    d = cfg.latent_downsample
    latent = unpatchify_latent(x0.float().cpu(), h // d, w // d, cfg.latent_patch_size, cfg.ae.z_channels)
    return latent_preview(latent, LATENT_RGB_FACTORS, LATENT_RGB_BIAS)


def _inputs(job: BagelJob, tokenizer: Any) -> list:
    """The reference's input list: images in order, then the instruction (as text, never control tokens)."""
    return list(job.images) + [user_text(tokenizer, job.prompt, "prompt", "bagel")]


def run(handle: ModelHandle, task: str, request: Request,
        listener: Callable[[int, int, Any], None] | None = None) -> Result:
    """Generate (task "t2i" / "edit") or answer ("understand") with a BAGEL handle."""
    from ..loaders.placement import Placement  # noqa: PLC0415

    handle.check_exists(DISPLAY)
    path = Path(handle.path("model"))
    cfg = loader.build_config(path)
    job, notes = plan_job(task, request, cfg.max_image_side)
    plan = resolve(handle.memory, glue.torch_device())
    notes.extend(plan.notes)
    check_memory(job, cfg, path, plan)
    speed.check_usable(request.speed, DISPLAY, plan.device, SPEED_SUPPORT)
    spec = registry.get("bagel")
    generator = torch.Generator("cpu").manual_seed(job.seed)
    with CACHE.session() as session:
        comps = loader.load_components(path, cfg, plan.precision, spec.fp8_skip, session)
        placement = Placement({"model": comps["model"], "ae": comps["ae"]}, dict(spec.blocks), plan, DISPLAY)
        with placement.running() as used, torch.no_grad():
            notes.extend(placement.notes)
            engine = BagelEngine(comps["model"].value, comps["ae"].value, comps["tokenizer"].value, job.vae_rule,
                                 job.vit_rule, device=used.device)
            engine.before_forward = glue.check_interrupt
            if job.task == registry.TASK_UNDERSTAND:
                return _understand(engine, job, generator, notes, handle, listener)
            image, think = _generate(engine, job, generator, cfg, notes, listener, request.speed)
    check_finite(image, DISPLAY, "try compute_dtype bf16 or fp32 in Gentor Memory Options (fp16 overflows easily)")
    f = job.flow
    pairs = [("model", handle.variant), ("task", job.task), ("size", f"{job.size[1]}x{job.size[0]}"),
             ("steps", f.steps), ("cfg_text", f.cfg_text), ("cfg_img", f.cfg_img),
             ("cfg_interval", f"[{f.cfg_interval[0]:g}, {f.cfg_interval[1]:g}]"), ("renorm", f.renorm),
             ("shift", f.shift), ("seed", job.seed), ("references", len(job.images))]
    text = format_notes(pairs, notes)
    return Result(image, (think + "\n\n" + text) if think else text)


def _step_time(_cache: Any, _x: torch.Tensor, _height: int, _width: int, t: float) -> float:
    return t  # velocity(cache, x, height, width, t): the branches of one step share t


def _think_progress(job: BagelJob, listener: Any) -> Callable[[int], None]:
    progress = glue.Progress(job.max_tokens, listener)
    return lambda i: progress.update(i + 1)


def _generate(engine: BagelEngine, job: BagelJob, generator: torch.Generator, cfg: Any, notes: list[str],
              listener: Any, speed_options: speed.SpeedOptions | None = None) -> tuple[torch.Tensor, str]:
    ctx = engine.build_contexts(_inputs(job, engine.tokenizer), generator, job.size, think=job.think)
    ctx.size = job.size  # plan_job's size: the last reference's (as the reference code) unless width/height set
    think = ""
    if job.think:
        ctx = engine.think(ctx, job.max_tokens, _think_progress(job, listener), job.temperature, generator)
        think = ctx.think
        if ctx.think_cut:
            notes.append(f"think text cut at think_max_tokens={job.max_tokens}: the image follows the partial plan "
                         f"(raise think_max_tokens in {SETTINGS_NODE})")
    h, w = job.size
    n = (h // cfg.latent_downsample) * (w // cfg.latent_downsample)
    updates = job.flow.steps - 1
    progress = glue.Progress(updates * job.batch, listener)
    images = []
    plain_velocity, fast = engine.velocity, speed.Report()
    for item in range(job.batch):
        noise = torch.randn((n, cfg.patch_latent_dim), generator=generator)

        def on_step(i: int, x0: torch.Tensor, item: int = item) -> None:
            done = item * updates + i + 1
            show = (i + 1) % job.preview_every == 0 and i + 1 < updates
            progress.update(done, _preview(x0, job, cfg) if show else None)

        # A fresh cache per image (its Taylor states follow one loop); the engine lives for this run only.
        engine.velocity = speed.velocity_cache(plain_velocity, speed_options, updates, _step_time, fast)
        x = engine.generate_image(ctx, noise, job.flow, on_step)
        images.append(engine.decode(x, h, w))
    notes.extend(fast.lines())
    return chw_to_image(torch.stack(images)), think


def _understand(engine: BagelEngine, job: BagelJob, generator: torch.Generator, notes: list[str],
                handle: ModelHandle, listener: Any) -> Result:
    ctx = engine.build_contexts(_inputs(job, engine.tokenizer), generator, job.size, think=job.think, understanding=True)
    answer, cut = engine.generate_text(ctx.gen, job.max_tokens, _think_progress(job, listener), job.temperature,
                                       generator)
    if cut:
        notes.append(f"answer cut at {job.max_tokens} tokens (raise max_new_tokens)")
    pairs = [("model", handle.variant), ("task", "understand"), ("images", len(job.images)),
             ("tokens", job.max_tokens), ("think", job.think)]
    return Result(text=answer.strip() + "\n\n" + format_notes(pairs, notes))
