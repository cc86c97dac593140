"""Gentor Describe Image: image(s) + question -> answer, with any backend that understands images."""
from __future__ import annotations

from comfy_api.v0_0_2 import io, ui

from .. import registry
from ..errors import InputError
from ..samplers.common import Request, collect_references, library_errors
from .common import CATEGORY, EDIT_IMAGE_INPUTS, MAX_SEED, GentorModel, settings_input

DISPLAY = "Gentor Describe Image"
MAX_NEW_TOKENS = 8192


def check_understands(model) -> registry.BackendSpec:
    """The model's backend must offer image understanding; say which backends do."""
    spec = registry.get(model.backend)
    if registry.TASK_UNDERSTAND not in spec.tasks:
        able = ", ".join(b.display_name for b in registry.with_task(registry.TASK_UNDERSTAND)) or "none installed"
        raise InputError(f"{DISPLAY} model: {spec.display_name} cannot understand images (got a {spec.display_name} "
                         f"model, expected one of: {able}). Load one of those with its loader and connect it here.")
    return spec


class GentorDescribeImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        images = [io.Image.Input(f"image_{i}", optional=True,
                                 tooltip=f"Image {i} to look at ('Picture {i}'). Sizes may differ; large images are "
                                         "resized by the model's own rule (the text says so).")
                  for i in range(1, EDIT_IMAGE_INPUTS + 1)]  # as many as the edit node
        return io.Schema(
            node_id="GentorDescribeImage", display_name=DISPLAY, category=CATEGORY,
            description="Answer a question about images (or describe them) with a model that understands images "
                        "(Qwen-VL from Gentor Load Prompt Enhancer, BAGEL).",
            inputs=[
                GentorModel.Input("model", tooltip="A Gentor model whose backend understands images."),
                io.String.Input("question", multiline=True, default="",
                                tooltip="What to ask. Empty with images: describe them in detail."),
                io.Int.Input("max_new_tokens", default=0, min=0, max=MAX_NEW_TOKENS,
                             tooltip="Most tokens to write; 0 = the backend's default. A cut answer says so."),
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=False,
                             tooltip="Seed for backends that sample; greedy backends ignore it."),
            ] + images + [settings_input()],
            outputs=[io.String.Output("text", tooltip="The answer, then notes (resizes, a cut), shown on the node.")],
            is_output_node=True)

    @classmethod
    def execute(cls, model, question, max_new_tokens, seed, settings=None, **images) -> io.NodeOutput:
        spec = check_understands(model)
        refs = collect_references([(f"image_{i}", images.get(f"image_{i}")) for i in range(1, EDIT_IMAGE_INPUTS + 1)],
                                  DISPLAY, EDIT_IMAGE_INPUTS)
        # Text tasks carry the token budget in Request.steps (0 = the backend's default).
        request = Request(prompt=question, seed=seed, steps=max_new_tokens, images=refs, settings=settings)
        with library_errors(spec.display_name, "model", "readable model files",
                            f"Check the files of the model picked in {spec.loader_node or 'its loader'} and queue again."):
            result = registry.sampler(model.backend).run(model, registry.TASK_UNDERSTAND, request)
        return io.NodeOutput(result.text, ui=ui.PreviewText(result.text))


NODES = [GentorDescribeImage]
