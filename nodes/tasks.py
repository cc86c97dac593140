"""Backend-agnostic task samplers: Gentor Text to Image, Gentor Edit Image."""
from __future__ import annotations

from comfy_api.v0_0_2 import io, ui

from .. import registry
from ..samplers.common import Request, tensor_to_pils
from .common import CATEGORY, EDIT_IMAGE_INPUTS, MAX_BATCH, common_inputs, settings_input, task_outputs


def _run(task: str, model, images: list, **kw) -> io.NodeOutput:
    request = Request(images=images, **kw)
    result = registry.sampler(model.backend).run(model, task, request)
    return io.NodeOutput(result.image, result.text, ui=ui.PreviewText(result.text))


class GentorTextToImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GentorTextToImage", display_name="Gentor Text to Image", category=CATEGORY,
            description="Generate images from a prompt with any Gentor model.",
            inputs=common_inputs() + [
                io.Int.Input("batch_size", default=1, min=1, max=MAX_BATCH,
                             tooltip="Images per run (one seed; the batch shares the noise draw)."),
                settings_input()],
            outputs=task_outputs())

    @classmethod
    def execute(cls, model, prompt, negative, seed, steps, cfg, width, height, batch_size,
                settings=None) -> io.NodeOutput:
        return _run("t2i", model, [], prompt=prompt, negative=negative, seed=seed, steps=steps, cfg=cfg,
                    width=width, height=height, batch_size=batch_size, settings=settings)


class GentorEditImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        images = [io.Image.Input(f"image_{i}", optional=True,
                                 tooltip=f"Reference image {i} ('Picture {i}' in the instruction). Sizes may differ; "
                                         "RGBA is composited on white, grayscale expanded.")
                  for i in range(1, EDIT_IMAGE_INPUTS + 1)]
        return io.Schema(
            node_id="GentorEditImage", display_name="Gentor Edit Image", category=CATEGORY,
            description="Edit one image, or combine several reference images, following an instruction.",
            inputs=common_inputs() + images + [settings_input()],
            outputs=task_outputs())

    @classmethod
    def execute(cls, model, prompt, negative, seed, steps, cfg, width, height, settings=None,
                **images) -> io.NodeOutput:
        pils = [pil for i in range(1, EDIT_IMAGE_INPUTS + 1) if images.get(f"image_{i}") is not None
                for pil in tensor_to_pils(images[f"image_{i}"], f"image_{i}", "Gentor Edit Image")]
        return _run("edit", model, pils, prompt=prompt, negative=negative, seed=seed, steps=steps, cfg=cfg,
                    width=width, height=height, settings=settings)
