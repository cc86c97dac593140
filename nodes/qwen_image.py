"""Qwen-Image nodes: the loader and the backend's settings."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..loaders import qwen_image as loader
from ..loaders import qwen_image_diffsynth as engines
from ..loaders import qwen_image_files as files_loader
from ..samplers import qwen_image_job
from ..samplers import qwen_image_vae
from ..samplers.common import library_errors
from .common import CATEGORY, GentorMemory, GentorModel, GentorSettings
from .lora import GentorLoRA

SUBCATEGORY = f"{CATEGORY}/Qwen-Image"


class GentorLoadQwenImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GentorLoadQwenImage", display_name="Gentor Load Qwen-Image", category=SUBCATEGORY,
            description="Load Qwen-Image / -2512, Qwen-Image-Edit, Edit-2509/2511 or Qwen-Image 2.1 (diffusers folder "
                        "in models/qwen_image/).",
            inputs=[
                io.Combo.Input("model_name", options=loader.list_models(),
                               tooltip="A diffusers-format Qwen-Image pipeline folder from models/qwen_image/ (or "
                                       "models/diffusers/). The variant is detected from its files."),
                GentorMemory.Input("memory", optional=True,
                                   tooltip="Optional Gentor Memory Options (FP8 storage, offload)."),
                io.Combo.Input("engine", options=list(engines.ENGINES), default=engines.DEFAULT_ENGINE,
                               optional=True,
                               tooltip="diffusers (default) or DiffSynth-Studio's Qwen-Image pipeline (needs "
                                       f"`{engines.PIP_COMMAND}`; same weights in memory, its own numerics and "
                                       "VRAM management). diffsynth-or-diffusers falls back to diffusers where "
                                       "DiffSynth cannot run the model or is not installed."),
            ],
            outputs=[GentorModel.Output("model", tooltip="Connect to Gentor Text to Image or Gentor Edit Image.")])

    @classmethod
    def execute(cls, model_name, memory=None, engine=engines.DEFAULT_ENGINE) -> io.NodeOutput:
        with library_errors("Qwen-Image", "model_name", "a readable diffusers-format Qwen-Image folder",
                            "Check the folder's files and permissions, or download the model again."):
            return io.NodeOutput(loader.load_handle(model_name, memory, engine))


class GentorLoadQwenImageFiles(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GentorLoadQwenImageFiles", display_name="Gentor Load Qwen-Image (ComfyUI files)",
            category=SUBCATEGORY,
            description="Load Qwen-Image / -2512 / Edit / Edit-2509 / Edit-2511 / 2.1 from the single files ComfyUI "
                        "uses (bf16, FP8, scaled FP8, GGUF transformer + Qwen2.5-VL or Qwen3-VL text encoder + VAE).",
            inputs=[
                io.Combo.Input("diffusion_model", options=files_loader.list_transformers(),
                               tooltip="A Qwen-Image transformer file from models/diffusion_models/ or models/unet/ "
                                       "(safetensors bf16 / fp8 / fp8 scaled / fp8mixed, or GGUF)."),
                io.Combo.Input("text_encoder", options=files_loader.list_text_encoders(),
                               tooltip="The text encoder file from models/text_encoders/ or models/clip/: Qwen2.5-VL-7B "
                                       "for Qwen-Image 1.x (e.g. qwen_2.5_vl_7b_fp8_scaled.safetensors), Qwen3-VL-8B "
                                       "for 2.1 (qwen3vl_8b_bf16.safetensors)."),
                io.Combo.Input("vae", options=files_loader.list_vaes(),
                               tooltip="The VAE file from models/vae/: qwen_image_vae.safetensors (1.x) or "
                                       "qwen_image_2.1_vae_bf16.safetensors (2.1)."),
                GentorMemory.Input("memory", optional=True,
                                   tooltip="Optional Gentor Memory Options. Scaled-FP8 and GGUF files keep their "
                                           "stored form; compute dtype and offload apply."),
                io.Combo.Input("engine", options=list(engines.ENGINES), default=engines.DEFAULT_ENGINE,
                               optional=True,
                               tooltip="diffusers (default) or DiffSynth-Studio (bf16 / fp16 / plain FP8 files; "
                                       "diffsynth-or-diffusers falls back to diffusers for scaled FP8 and GGUF)."),
                io.Combo.Input("variant", options=list(files_loader.VARIANT_CHOICES), default=files_loader.AUTO,
                               optional=True,
                               tooltip="auto: detected from the weights. Qwen-Image, -2512, Edit and Edit-2509 have "
                                       "identical weights' shapes: auto runs Text to Image with Qwen-Image's pipeline "
                                       "and Edit Image with Edit-2509's; pick qwen-image-edit for the original Edit. "
                                       "Edit-2511 files are recognised by ComfyUI's marker tensor; 2.1 by its "
                                       "tensors (keep auto)."),
            ],
            outputs=[GentorModel.Output("model", tooltip="Connect to Gentor Text to Image or Gentor Edit Image.")])

    @classmethod
    def execute(cls, diffusion_model, text_encoder, vae, memory=None, engine=engines.DEFAULT_ENGINE,
                variant=files_loader.AUTO) -> io.NodeOutput:
        with library_errors("Qwen-Image", "diffusion_model", "readable Comfy-format Qwen-Image files",
                            "Check the files and permissions, or download them again."):
            return io.NodeOutput(files_loader.load_handle(diffusion_model, text_encoder, vae, memory, engine, variant))


class GentorQwenImageSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GentorQwenImageSettings", display_name="Gentor Qwen-Image Settings", category=SUBCATEGORY,
            description="Qwen-Image knobs that the common sampler inputs do not cover.",
            inputs=[
                io.Int.Input("max_sequence_length", default=qwen_image_job.DEFAULT_MAX_SEQUENCE_LENGTH, min=1,
                             max=qwen_image_job.MAX_SEQUENCE_LENGTH,
                             tooltip="Most prompt tokens the transformer sees (longer prompts are cut)."),
                io.Int.Input("preview_every", default=qwen_image_job.DEFAULT_PREVIEW_EVERY, min=0, max=200,
                             tooltip="Send a preview every N steps (0 = no previews)."),
                io.Combo.Input("schedule", options=list(qwen_image_job.SCHEDULES), default="model",
                               tooltip="Sigma schedule. model = the folder's scheduler; lightning = the Lightning "
                                       "LoRAs' published one (shift 3 fixed, no terminal stretch; use with 8 or 4 "
                                       "steps and cfg 1). Qwen-Image 1.x models only."),
                io.Combo.Input("vae_tiling", options=list(qwen_image_vae.VAE_TILING_MODES),
                               default=qwen_image_vae.DEFAULT_VAE_TILING,
                               tooltip="VAE decode in tiles (and one image at a time). auto = only when the memory "
                                       "estimate says a whole decode would not fit (the text output says so); "
                                       "on / off = force."),
            ],
            outputs=[GentorSettings.Output("settings", tooltip="Connect to a task sampler's 'settings' input.")])

    @classmethod
    def execute(cls, max_sequence_length, preview_every, schedule="model",
                vae_tiling=qwen_image_vae.DEFAULT_VAE_TILING) -> io.NodeOutput:
        return io.NodeOutput(qwen_image_job.make_settings(max_sequence_length, preview_every, schedule, vae_tiling))


NODES = [GentorLoadQwenImage, GentorLoadQwenImageFiles, GentorQwenImageSettings, GentorLoRA]
