"""Backend-agnostic task samplers: Gentor Text to Image, Gentor Edit Image."""
from __future__ import annotations

import torch
from comfy_api.v0_0_2 import io, ui

from .. import registry
from ..samplers.common import Request, collect_references, library_errors
from .common import (CATEGORY, EDIT_IMAGE_INPUTS, MAX_BATCH, common_inputs, settings_input, speed_input,
                     task_outputs)

T2I_DISPLAY = "Gentor Text to Image"
EDIT_DISPLAY = "Gentor Edit Image"


def reference_limits() -> str:
    """'Qwen-Image 10, DeepGen 4, …': the most references each registered backend takes (its largest model's)."""
    return ", ".join(f"{b.display_name} {b.max_references}" for b in registry.BACKENDS if b.max_references)


def _run(task: str, display: str, model, images: list, **kw) -> io.NodeOutput:
    spec = registry.get(model.backend)
    request = Request(images=images, **kw)
    # Weights are read lazily by the sampler: a file-system / tokenizer / PIL failure names the model input.
    with library_errors(spec.display_name, "model", "readable model files",
                        f"Check the files of the model picked in {spec.loader_node or 'its loader'} "
                        "(permissions, free disk space, a complete download) and queue again."):
        result = registry.sampler(model.backend).run(model, task, request)
    mask = result.mask
    if mask is None:  # an opaque image: ComfyUI's mask of "nothing transparent"
        mask = torch.zeros(result.image.shape[:3], dtype=torch.float32)
    return io.NodeOutput(result.image, result.text, mask, ui=ui.PreviewText(result.text))


class GentorTextToImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GentorTextToImage", display_name=T2I_DISPLAY, category=CATEGORY,
            description="Generate images from a prompt with any Gentor model.",
            inputs=common_inputs() + [
                io.Int.Input("batch_size", default=1, min=1, max=MAX_BATCH,
                             tooltip="Images per run (one seed; the batch shares the noise draw)."),
                settings_input(), speed_input()],
            outputs=task_outputs())

    @classmethod
    def execute(cls, model, prompt, negative, seed, steps, cfg, width, height, batch_size,
                settings=None, speed=None) -> io.NodeOutput:
        return _run("t2i", T2I_DISPLAY, model, [], prompt=prompt, negative=negative, seed=seed, steps=steps,
                    cfg=cfg, width=width, height=height, batch_size=batch_size, settings=settings, speed=speed)


class GentorEditImage(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        images = [io.Image.Input(f"image_{i}", optional=True,
                                 tooltip=f"Reference image {i} ('Picture {i}' in the instruction), one image per "
                                         "input. Sizes may differ; RGBA is composited on white, grayscale "
                                         f"expanded. At most: {reference_limits()} (a model that takes fewer, "
                                         "e.g. single-image Qwen-Image-Edit, names its own limit). The editor "
                                         "shows the connected inputs and one free one.")
                  for i in range(1, EDIT_IMAGE_INPUTS + 1)]
        return io.Schema(
            node_id="GentorEditImage", display_name=EDIT_DISPLAY, category=CATEGORY,
            description="Edit one image, or combine several reference images, following an instruction.",
            inputs=common_inputs() + images + [settings_input(), speed_input()],
            outputs=task_outputs())

    @classmethod
    def execute(cls, model, prompt, negative, seed, steps, cfg, width, height, settings=None, speed=None,
                **images) -> io.NodeOutput:
        spec = registry.get(model.backend)
        pils = collect_references([(f"image_{i}", images.get(f"image_{i}")) for i in range(1, EDIT_IMAGE_INPUTS + 1)],
                                  f"{spec.display_name} ({EDIT_DISPLAY})", spec.max_references)
        return _run("edit", EDIT_DISPLAY, model, pils, prompt=prompt, negative=negative, seed=seed, steps=steps,
                    cfg=cfg, width=width, height=height, settings=settings, speed=speed)
