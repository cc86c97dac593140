"""Qwen-VL nodes: the prompt-enhancer loader and Gentor Enhance Prompt."""
from __future__ import annotations

from comfy_api.v0_0_2 import io, ui

from ..loaders import estimates, inspect as inspection
from ..loaders import vlm as loader
from ..samplers import vlm as sampler
from ..samplers import vlm_prompts as prompts
from ..samplers.common import Request, collect_references, library_errors
from .common import CATEGORY, EDIT_IMAGE_INPUTS, MAX_SEED, GentorMemory, GentorModel

SUBCATEGORY = f"{CATEGORY}/Qwen-VL"
ENHANCE_DISPLAY = "Gentor Enhance Prompt"
MAX_IMAGE_PIXELS = 16384 * 28 * 28


class GentorLoadPromptEnhancer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GentorLoadPromptEnhancer", display_name="Gentor Load Prompt Enhancer", category=SUBCATEGORY,
            description="Load a Qwen2-VL, Qwen2.5-VL or Qwen3-VL Instruct model (models/vlm/, any size) for prompt "
                        "enhancement and image understanding. Shares one copy with DeepGen / Qwen-Image when the files "
                        "are the same.",
            inputs=[
                io.Combo.Input("model_name", options=loader.list_models(),
                               tooltip="A Qwen-VL Instruct folder from models/vlm/, or '<Qwen-Image pipeline>/"
                                       "text_encoder' (the same Qwen2.5-VL, no second copy). Detected from its files."),
                GentorMemory.Input("memory", optional=True,
                                   tooltip="Optional Gentor Memory Options (FP8 storage, offload)."),
            ],
            outputs=[GentorModel.Output("model", tooltip="Connect to Gentor Enhance Prompt or Gentor Describe Image.")])

    @classmethod
    def execute(cls, model_name, memory=None) -> io.NodeOutput:
        handle = loader.load_handle(model_name, memory)
        line = estimates.summary(inspection.inspect_path(handle.path()), handle.memory)
        return io.NodeOutput(handle, ui=ui.PreviewText(line))


class GentorEnhancePrompt(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GentorEnhancePrompt", display_name=ENHANCE_DISPLAY, category=CATEGORY,
            description="Rewrite a short prompt into a rich one (T2I) or a precise edit instruction, optionally looking "
                        "at reference images. Wire 'prompt' into a task node's prompt.",
            inputs=[
                GentorModel.Input("model", tooltip="A Qwen-VL model from Gentor Load Prompt Enhancer."),
                io.String.Input("prompt", multiline=True, default="",
                                tooltip="Your short prompt or edit request. Empty with images: describe them."),
                io.Combo.Input("preset", options=list(prompts.PRESETS), default=prompts.PRESET_T2I,
                               tooltip="t2i_rewrite: a detailed text-to-image prompt. edit_rewrite: one precise edit "
                                       "instruction for the connected image(s). free: your own system_prompt."),
                io.Combo.Input("language", options=list(prompts.LANGUAGES), default=prompts.LANG_AUTO,
                               tooltip="auto keeps the prompt's language (Chinese stays Chinese); en / zh force it."),
                io.String.Input("system_prompt", multiline=True, default="",
                                tooltip="Instructions for the free preset (ignored by the other presets)."),
                io.Int.Input("max_new_tokens", default=sampler.DEFAULT_MAX_NEW_TOKENS, min=1,
                             max=sampler.MAX_NEW_TOKENS,
                             tooltip="Most tokens to write. A reply cut here is returned and the notes say so."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=False,
                             tooltip="Sampling seed (same seed + inputs = same text). Unused when sampling is off."),
                io.Boolean.Input("sampling", default=False,
                                 tooltip="Off: greedy decoding (deterministic). On: temperature / top_p sampling."),
                io.Float.Input("temperature", default=sampler.DEFAULT_TEMPERATURE, min=0.01, max=2.0, step=0.05,
                               tooltip="Sampling temperature (Qwen-VL's recommended 0.7)."),
                io.Float.Input("top_p", default=sampler.DEFAULT_TOP_P, min=0.01, max=1.0, step=0.05,
                               tooltip="Nucleus sampling mass (Qwen-VL's recommended 0.8)."),
                io.Int.Input("max_image_pixels", default=sampler.DEFAULT_MAX_IMAGE_PIXELS, min=sampler.MIN_IMAGE_PIXELS,
                             max=MAX_IMAGE_PIXELS, step=28 * 28,
                             tooltip="Pixel budget per image (1280 visual tokens of 28x28 by default)."),
            ] + [io.Image.Input(f"image_{i}", optional=True,
                                tooltip=f"Optional image {i} for the model to look at (the image to edit, references). "
                                        "Large images are resized by the Qwen-VL rule (sides multiples of 28 or 32, "
                                        "area within max_image_pixels); the notes say so.")
                 for i in range(1, EDIT_IMAGE_INPUTS + 1)],
            outputs=[io.String.Output("enhanced_prompt", tooltip="The enhanced prompt, ready for a task node's prompt."),
                     io.String.Output("notes", tooltip="Resizes, a cut at max_new_tokens, memory notes.")],
            is_output_node=True)

    @classmethod
    def execute(cls, model, prompt, preset, language, system_prompt, max_new_tokens, seed, sampling, temperature,
                top_p, max_image_pixels, **images) -> io.NodeOutput:
        refs = collect_references([(f"image_{i}", images.get(f"image_{i}")) for i in range(1, EDIT_IMAGE_INPUTS + 1)],
                                  ENHANCE_DISPLAY, EDIT_IMAGE_INPUTS)
        settings = sampler.make_settings(preset, language, system_prompt, sampling, temperature, top_p,
                                         max_image_pixels=max_image_pixels)
        request = Request(prompt=prompt, seed=seed, steps=max_new_tokens, images=refs, settings=settings)
        with library_errors(loader.DISPLAY, "model", "readable model files",
                            "Check the files of the model picked in Gentor Load Prompt Enhancer and queue again."):
            reply = sampler.enhance(model, request)
        notes = "\n".join(f"- {n}" for n in reply.notes)
        shown = reply.text + (f"\n\n{notes}" if notes else "")
        return io.NodeOutput(reply.text, notes, ui=ui.PreviewText(shown))


NODES = [GentorLoadPromptEnhancer, GentorEnhancePrompt]
