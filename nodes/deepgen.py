"""DeepGen 1.0 nodes: the loader and the backend's settings."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..loaders import deepgen as loader
from ..modeling.deepgen.prompts import RESIZE_RULES
from ..samplers import deepgen as sampler
from ..samplers.common import library_errors
from .common import CATEGORY, GentorMemory, GentorModel, GentorSettings

SUBCATEGORY = f"{CATEGORY}/DeepGen"
MAX_PREVIEW_EVERY = 200


class GentorLoadDeepGen(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GentorLoadDeepGen", display_name="Gentor Load DeepGen", category=SUBCATEGORY,
            description="Load DeepGen 1.0: its checkpoint (model.pt) with a diffusion folder and "
                        "Qwen2.5-VL-3B-Instruct from models/vlm/, or the DeepGen-1.0-diffusers folder with its "
                        "own vlm/.",
            inputs=[
                io.Combo.Input("checkpoint", options=loader.list_checkpoints(),
                               tooltip="models/deepgen/: DeepGen's model.pt (or its .safetensors conversion), or the "
                                       "DeepGen-1.0-diffusers folder (transformer/, vae/, scheduler/, "
                                       "connector/model.safetensors, vlm/). Sizes are read from the weights."),
                io.Combo.Input("diffusion", options=loader.list_diffusion_folders(),
                               default=loader.SAME_FOLDER,
                               tooltip="models/deepgen/: the folder with transformer/, vae/, scheduler/ "
                                       "(UniPic2-SD3.5M-Kontext-2B or SD3.5-Medium). '(checkpoint folder)': the "
                                       "folder the checkpoint sits in, or the diffusers folder itself."),
                io.Combo.Input("vlm", options=loader.list_vlms(),
                               tooltip="With model.pt: Qwen2.5-VL-3B-Instruct from models/vlm/ (shared with the "
                                       "prompt enhancer). With the diffusers folder: '<that folder>/vlm', DeepGen's "
                                       "own VLM with its LoRA merged in (what the official pipeline uses)."),
                GentorMemory.Input("memory", optional=True,
                                   tooltip="Optional Gentor Memory Options (FP8 storage, offload)."),
            ],
            outputs=[GentorModel.Output("model", tooltip="Connect to Gentor Text to Image or Gentor Edit Image.")])

    @classmethod
    def execute(cls, checkpoint, diffusion, vlm, memory=None) -> io.NodeOutput:
        with library_errors("DeepGen", "checkpoint", "a readable DeepGen checkpoint and folders",
                            "Check the files and permissions, or download them again."):
            return io.NodeOutput(loader.load_handle(checkpoint, diffusion, vlm, memory))


class GentorDeepGenSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GentorDeepGenSettings", display_name="Gentor DeepGen Settings", category=SUBCATEGORY,
            description="DeepGen knobs that the common sampler inputs do not cover.",
            inputs=[
                io.Combo.Input("reference_resize", options=list(RESIZE_RULES), default="dynamic",
                               tooltip="How reference images are sized: dynamic = long side at most max(width, "
                                       "height) (512 by default), sides rounded up to 32 (official CLI); fix_pixels = "
                                       "area 512x512 at the image's aspect (training); output_size = exactly the "
                                       "output size."),
                io.String.Input("edit_negative", multiline=True, default=sampler.EDIT_NEGATIVE,
                                tooltip="Negative prompt of edits when the sampler's negative is empty (GEdit "
                                        "evaluation's default)."),
                io.Boolean.Input("lora", default=True,
                                 tooltip="Use the checkpoint's VLM LoRA when it has one (no effect otherwise)."),
                io.Int.Input("preview_every", default=sampler.DEFAULT_PREVIEW_EVERY, min=0, max=MAX_PREVIEW_EVERY,
                             tooltip="Send a preview every N steps (0 = no previews)."),
            ],
            outputs=[GentorSettings.Output("settings", tooltip="Connect to a task sampler's 'settings' input.")])

    @classmethod
    def execute(cls, reference_resize, edit_negative, lora, preview_every) -> io.NodeOutput:
        return io.NodeOutput(sampler.make_settings(reference_resize, edit_negative, lora, preview_every))


NODES = [GentorLoadDeepGen, GentorDeepGenSettings]
