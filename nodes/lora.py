"""GentorLoRA: add a LoRA (by name and strength) to a Gentor model; chain several."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..loaders import lora
from ..samplers.common import library_errors
from .common import CATEGORY, GentorModel

DISPLAY = "Gentor LoRA"
MAX_STRENGTH = 10.0
STRENGTH_STEP = 0.01


class GentorLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GentorLoRA", display_name=DISPLAY, category=CATEGORY,
            description="Apply a LoRA from models/loras/ to a Gentor model (Qwen-Image). Chain several nodes for "
                        "several LoRAs. The base weights stay shared: graphs with and without the LoRA switch it "
                        "per run without reloading the model.",
            inputs=[
                GentorModel.Input("model", tooltip="A Gentor model (from Gentor Load Qwen-Image or another Gentor LoRA)."),
                io.Combo.Input("lora_name", options=lora.list_loras(),
                               tooltip="A LoRA file from models/loras/ (diffusers/PEFT, ComfyUI or kohya key layout; "
                                       "detected from its keys)."),
                io.Float.Input("strength", default=1.0, min=-MAX_STRENGTH, max=MAX_STRENGTH, step=STRENGTH_STEP,
                               tooltip="LoRA strength (scale of its delta). 0 = no-op: the file is not read."),
            ],
            # Output id differs from the input id: ComfyUI 0.3.64 refuses a node whose input and output share one.
            outputs=[GentorModel.Output("model_with_lora", tooltip="The model with this LoRA added; connect to a "
                                                                   "task node or another Gentor LoRA.")])

    @classmethod
    def execute(cls, model, lora_name, strength) -> io.NodeOutput:
        with library_errors(DISPLAY, "lora_name", "a readable LoRA file",
                            "Check the file's permissions, or download it again."):
            return io.NodeOutput(lora.with_lora(model, lora_name, strength, DISPLAY))


NODES = [GentorLoRA]
