"""Qwen-Image's DiffSynth engine: DiffSynth-Studio's own pipeline and model code on the cached weights.

The backend's policies (defaults, sizes, negative " ", seeds, memory estimate, VAE tiling choice) are applied
by the generation's module (``samplers/qwen_image.py``, ``qwen_image21.py``) before a job reaches an engine;
this engine then runs DiffSynth's ``QwenImagePipeline`` — its prompt encoding, its DiT forward (sigmoid-GELU),
its CFG (no norm rescale), its scheduler, its VAE and its VRAM management — on modules that share the cached weights
(``loaders/qwen_image_diffsynth.py``). What differs from the diffusers engine is DiffSynth's own numerics.
Qwen-Image 2.1 jobs (``samplers/qwen_image21.py``) run on its ``QwenImage21Pipeline`` the same way.

Run-time adapters (on our pipeline subclasses, never on the installed package):
- noise: drawn exactly as the diffusers engine draws it (one CPU generator, [B,1,C,H/s,W/s] in the compute
  dtype), one slice per image, so a seed means the same starting point in both engines;
- ``step``: per-step progress, interrupt (Cancel) and latent previews;
- ``vae_output_to_image``: the decoded floats instead of an 8-bit PIL image;
- the prompt unit (1.x): embeddings cut to the job's ``max_sequence_length``, as the diffusers engine cuts them;
- ``load_models_to_device``: DiffSynth empties the device cache through ``torch.<device>.empty_cache``,
  which a CPU torch does not have.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from PIL import Image

from ..loaders import qwen_image_diffsynth as views
from ..loaders.memory import Plan
from .common import chw_to_image, latent_preview
from .prompt_text import pipeline_texts
from .qwen_image_job import OnStep, length_notes, wants_preview
from .vae_preview import decode_preview

LATENT_CHANNELS = 16
VAE_SCALE = 8
LATENT21_CHANNELS = 64  # Qwen-Image 2.1: 64 latent channels, 16x VAE, latents on a 2x2 token grid
VAE21_SCALE = 16
# DiffSynth's "Qwen-Image" schedule (FlowMatchScheduler.set_timesteps_qwen_image), which its 2.1 pipeline samples
# on whatever the folder's scheduler config says; in diffusers' terms:
DIFFSYNTH_SCHEDULE = {"base_image_seq_len": 256, "max_image_seq_len": 8192, "base_shift": 0.5, "max_shift": 0.9,
                      "shift_terminal": 0.02, "time_shift_type": "exponential"}
LIGHTNING_TEMPLATE = "Qwen-Image-Lightning"
NO_CFG = 1.0  # DiffSynth runs the negative branch whenever cfg_scale != 1


@functools.lru_cache(maxsize=1)
def _prompt_unit_class() -> type:
    from diffsynth.pipelines.qwen_image import QwenImageUnit_PromptEmbedder  # noqa: PLC0415

    class LimitedPromptEmbedder(QwenImageUnit_PromptEmbedder):
        """DiffSynth's prompt unit, cut to the job's max_sequence_length as the diffusers engine cuts it."""

        max_tokens: int | None = None

        def process(self, pipe, prompt, edit_image=None) -> dict:  # noqa: ANN001
            out = super().process(pipe, prompt, edit_image)
            if self.max_tokens and "prompt_emb" in out:
                out = {"prompt_emb": out["prompt_emb"][:, :self.max_tokens],
                       "prompt_emb_mask": out["prompt_emb_mask"][:, :self.max_tokens]}
            return out

    return LimitedPromptEmbedder


class PipelineAdapters:
    """Our run-time adapters, mixed into DiffSynth's pipeline classes (see the module docstring)."""

    noise: torch.Tensor | None = None
    on_latents: Callable[[int, torch.Tensor], None] | None = None

    def generate_noise(self, shape, seed=None, rand_device="cpu", rand_torch_dtype=torch.float32,  # noqa: ANN001
                       device=None, torch_dtype=None) -> torch.Tensor:
        if self.noise is None or tuple(self.noise.shape) != tuple(shape):
            raise RuntimeError(f"DiffSynth asked for noise of shape {tuple(shape)}, prepared "
                               f"{None if self.noise is None else tuple(self.noise.shape)}")
        return self.noise.to(dtype=torch_dtype or self.torch_dtype, device=device or self.device)

    def step(self, scheduler, latents, progress_id, noise_pred, **kwargs):  # noqa: ANN001, ANN003
        out = super().step(scheduler, latents=latents, progress_id=progress_id, noise_pred=noise_pred, **kwargs)
        if self.on_latents is not None:
            self.on_latents(progress_id + 1, out)
        return out

    def vae_output_to_image(self, vae_output, pattern="B C H W", min_value=-1, max_value=1):  # noqa: ANN001
        return ((vae_output.float().clamp(min_value, max_value) - min_value) / (max_value - min_value)).cpu()

    def load_models_to_device(self, model_names) -> None:  # noqa: ANN001
        if not self.vram_management_enabled:
            return
        managed = [(n, m) for n, m in self.named_children() if getattr(m, "vram_management_enabled", False)]
        for name, model in managed:
            if name not in model_names:
                _each(model, "offload")
        if self.device_type == "cuda":
            torch.cuda.empty_cache()
        for name, model in managed:
            if name in model_names:
                _each(model, "onload")


@functools.lru_cache(maxsize=1)
def _pipeline_class() -> type:
    from diffsynth.pipelines.qwen_image import QwenImagePipeline, QwenImageUnit_PromptEmbedder  # noqa: PLC0415

    class GentorDiffSynthPipeline(PipelineAdapters, QwenImagePipeline):
        """DiffSynth's Qwen-Image pipeline with our noise, progress, output and prompt-length adapters."""

        def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            super().__init__(*args, **kwargs)
            limited = _prompt_unit_class()
            self.units = [limited() if type(u) is QwenImageUnit_PromptEmbedder else u for u in self.units]
            self.prompt_unit = next(u for u in self.units if isinstance(u, limited))

    return GentorDiffSynthPipeline


@functools.lru_cache(maxsize=1)
def _pipeline21_class() -> type:
    from diffsynth.pipelines.qwen_image_21 import QwenImage21Pipeline  # noqa: PLC0415

    class GentorDiffSynth21Pipeline(PipelineAdapters, QwenImage21Pipeline):
        """DiffSynth's Qwen-Image 2.1 pipeline with our noise, progress and output adapters."""

    return GentorDiffSynth21Pipeline


def _each(model: torch.nn.Module, method: str) -> None:
    if hasattr(model, method):
        getattr(model, method)()
        return
    for module in model.modules():
        if hasattr(module, method):
            getattr(module, method)()


def _quiet(iterable: Any) -> Any:
    return iterable


def draw_noise(job: Any, channels: int, vae_scale: int, dtype: torch.dtype) -> torch.Tensor:
    """The diffusers engine's starting noise (its prepare_latents: [B,1,C,H/s,W/s] from one CPU generator seeded
    with the job's seed, in the compute dtype), so a seed means the same start on both engines."""
    grid = 2 * vae_scale  # latents come in 2x2 token pairs
    shape = (job.batch_size, 1, channels, 2 * (job.height // grid), 2 * (job.width // grid))
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(job.seed), dtype=dtype)


def run_images(pipe: Any, noise: torch.Tensor, args: dict,
               ticker: Callable[[int], Callable[[int, torch.Tensor], None]]) -> torch.Tensor:
    """One DiffSynth pipeline call per image (its pipelines make one image per call), each with its slice of the
    batch's noise and ``ticker(index)`` called after each step; the images concatenated."""
    images = []
    try:
        for index in range(noise.shape[0]):
            pipe.noise = noise[index]
            pipe.on_latents = ticker(index)
            with torch.inference_mode():
                images.append(pipe(**args))
    finally:
        pipe.noise = pipe.on_latents = None
        # Weights back to where the plan keeps them between runs (also after Cancel or an error).
        pipe.load_models_to_device([])
    return torch.cat(images)


def job_args(pipe: Any, job: Any) -> dict[str, Any]:
    """The arguments both DiffSynth pipelines take from a job (prompts as text, never control tokens)."""
    prompt, negative = pipeline_texts(pipe, job.prompt, job.negative)
    return dict(prompt=prompt, negative_prompt=negative,
                # diffusers runs true CFG only above 1; DiffSynth whenever the scale is not 1.
                cfg_scale=job.true_cfg if job.true_cfg > NO_CFG else NO_CFG,
                height=job.height, width=job.width, seed=job.seed, num_inference_steps=job.steps,
                tiled=job.tiled_vae, progress_bar_cmd=_quiet)


def engine_notes(setup: views.VramSetup, lora_layers: int) -> list[str]:
    out = [f"DiffSynth VRAM management: {setup.describe}"]
    if lora_layers:
        out.append(f"LoRA through DiffSynth's hot-loaded (unfused) path on {lora_layers} layers")
    return out


class DiffSynthEngine:
    """Runs resolved Qwen-Image jobs on DiffSynth's pipeline (see the module docstring)."""

    name = "diffsynth"

    def __init__(self, components: dict, task: str, schedule: str, plan: Plan,
                 preview: Callable[[torch.Tensor], Image.Image]) -> None:
        from diffsynth.diffusion import FlowMatchScheduler  # noqa: PLC0415

        self.task = task
        self.plan = plan
        self.preview = preview
        self.setup = views.vram_config(plan)
        transformer = components["transformer"].value
        self.zero_cond_t = bool(getattr(transformer.config, "zero_cond_t", False))
        dit = views.build_dit(transformer)
        vae = views.build_vae(components["vae"].value)
        text_encoder = views.build_text_encoder(components["text_encoder"].value)
        pipe = _pipeline_class()(device=plan.device, torch_dtype=plan.compute)
        pipe.dit = views.enable_vram(dit, views.DIT_MAP, self.setup)
        pipe.vae = views.enable_vram(vae, views.VAE_MAP, self.setup)
        pipe.text_encoder = views.enable_vram(text_encoder, views.TEXT_ENCODER_MAP, self.setup)
        pipe.blockwise_controlnet = None
        pipe.tokenizer = components["tokenizer"].value
        pipe.processor = components["processor"].value if "processor" in components else None
        pipe.vram_management_enabled = True
        if schedule == "lightning":
            pipe.scheduler = FlowMatchScheduler(LIGHTNING_TEMPLATE)
        self.lora_layers = views.copy_loras(transformer, pipe.dit)
        self.pipe = pipe
        self.length_notes: list[str] = []

    def total_steps(self, job: Any) -> int:
        return job.steps * job.batch_size  # DiffSynth's pipeline makes one image per call

    def notes(self) -> list[str]:
        return engine_notes(self.setup, self.lora_layers) + self.length_notes

    def generate(self, job: Any, on_step: OnStep) -> torch.Tensor:
        noise = draw_noise(job, LATENT_CHANNELS, VAE_SCALE, self.plan.compute)
        args = job_args(self.pipe, job)
        if job.task == "t2i":  # DiffSynth's edit prompts hold the images' tokens too: only T2I is counted
            self.length_notes = length_notes(self.pipe.tokenizer, job, args["prompt"], args.get("negative_prompt", ""))
        if job.task != "t2i":
            args.update(edit_image=job.images[0] if job.task == "edit" else list(job.images),
                        edit_image_auto_resize=True, zero_cond_t=self.zero_cond_t)
        self.pipe.prompt_unit.max_tokens = job.max_sequence_length
        return chw_to_image(run_images(self.pipe, noise, args,
                                       lambda index: functools.partial(self._tick, job, on_step, index * job.steps)))

    def _tick(self, job: Any, on_step: OnStep, offset: int, done: int,
              latents: torch.Tensor) -> None:
        on_step(offset + done, self.preview(latents[0]) if wants_preview(job, done) else None)


class DiffSynthEngine21:
    """Runs a Qwen-Image 2.1 job (``samplers/qwen_image21.Job21``) on DiffSynth's 2.1 pipeline: its prompt
    encoding, DiT (with its condition KV cache when the model is block-causal), scheduler and RGBA VAE."""

    name = "diffsynth"

    def __init__(self, components: dict, plan: Plan, sample_sigmas: tuple[float, ...] | None) -> None:
        self.plan = plan
        self.sample_sigmas = list(sample_sigmas) if sample_sigmas else None
        self.setup = views.vram_config(plan)
        self.schedule_note = schedule_note(dict(components["scheduler"].value.config))
        transformer = components["transformer"].value
        # The condition prefix may only be cached when it never attends to the image being made.
        self.kv_cache = bool(getattr(transformer.config, "causal_condition", False))
        pipe = _pipeline21_class()(device=plan.device, torch_dtype=plan.compute)
        pipe.dit = views.enable_vram(views.build_dit21(transformer), views.DIT21_MAP, self.setup)
        pipe.vae = views.enable_vram(views.build_vae21(components["vae"].value), views.VAE21_MAP, self.setup)
        pipe.text_encoder = views.enable_vram(views.build_text_encoder21(components["text_encoder"].value),
                                              views.TEXT_ENCODER21_MAP, self.setup)
        pipe.controlnet = None
        pipe.processor = components["processor"].value
        pipe.vram_management_enabled = True
        self.lora_layers = views.copy_loras(transformer, pipe.dit)
        self.pipe = pipe
        self.preview_vae = components["vae"].value  # the same weights in diffusers' class: decode_preview reads it

    def total_steps(self, job: Any) -> int:
        return job.steps * job.batch_size  # one image per call

    def notes(self) -> list[str]:
        return engine_notes(self.setup, self.lora_layers) + ([self.schedule_note] if self.schedule_note else [])

    def generate(self, job: Any, on_step: OnStep) -> torch.Tensor:
        """[B, 4, H, W] in 0..1 (RGBA, as the diffusers engine returns it)."""
        noise = draw_noise(job, LATENT21_CHANNELS, VAE21_SCALE, self.plan.compute)
        args = job_args(self.pipe, job)
        # The folder's own grid (steps = 0) is passed on, which DiffSynth samples unshifted; an explicit step
        # count gets DiffSynth's own schedule (the plain grid the job carries then is diffusers' input).
        args.update(edit_image=list(job.images) or None, use_kv_cache=self.kv_cache,
                    sigmas=job.sigmas if job.sigmas == self.sample_sigmas else None)

        def ticker(index: int) -> Callable[[int, torch.Tensor], None]:
            def tick(done: int, latents: torch.Tensor) -> None:
                # The same latent space as the diffusers engine: the cached VAE decodes a small preview.
                preview = decode_preview(self.preview_vae, latents) if wants_preview(job, done) else None
                on_step(index * job.steps + done, preview)
            return tick

        return run_images(self.pipe, noise, args, ticker)


def schedule_note(config: dict) -> str | None:
    """A note when the folder's scheduler config is not the schedule DiffSynth's 2.1 pipeline samples on."""
    differs = {k: config.get(k) for k, v in DIFFSYNTH_SCHEDULE.items() if config.get(k) != v}
    if not differs:
        return None
    found = ", ".join(f"{k} {v}" for k, v in differs.items())
    return (f"schedule: DiffSynth samples on its own Qwen-Image schedule (base/max shift 0.5/0.9, shift_terminal "
            f"0.02), not the folder's scheduler config ({found}); the diffusers engine follows the folder")


def preview_from(factors: torch.Tensor, bias: torch.Tensor) -> Callable[[torch.Tensor], Image.Image]:
    """DiffSynth's latents are already unpacked [C,H,W]: the same linear preview as the diffusers engine."""
    return lambda latent: latent_preview(latent, factors, bias)

