"""Gentor Inspect Model: which model a handle or folder holds, what it costs, what the shared cache holds."""
from __future__ import annotations

from comfy_api.v0_0_2 import io, ui

from .. import glue
from ..loaders import inspect as inspection
from ..loaders.cache import CACHE, report
from .common import CATEGORY, MAX_SIZE, SIZE_STEP, GentorModel

DEFAULT_SIZE = 1024


class GentorInspectModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GentorInspectModel", display_name="Gentor Inspect Model", category=CATEGORY,
            description="Show which model a Gentor model or folder holds (backend, variant, parameters per component, "
                        "dtype and bytes on disk), estimates of peak VRAM / RAM and work per memory option — read "
                        "from configs and weight headers without loading weights — and what the shared cache holds.",
            inputs=[GentorModel.Input("model", optional=True,
                                      tooltip="Optional: a Gentor model to describe (variant, folder, memory)."),
                    io.Combo.Input("folder", options=[inspection.NO_FOLDER] + inspection.list_inspectable(),
                                   default=inspection.NO_FOLDER, optional=True,
                                   tooltip="Optional: any folder in a Gentor model folder, inspected without loading."),
                    io.Int.Input("width", default=DEFAULT_SIZE, min=SIZE_STEP, max=MAX_SIZE, step=SIZE_STEP,
                                 optional=True, tooltip="Resolution the work and activation estimates assume."),
                    io.Int.Input("height", default=DEFAULT_SIZE, min=SIZE_STEP, max=MAX_SIZE, step=SIZE_STEP,
                                 optional=True, tooltip="Resolution the work and activation estimates assume.")],
            outputs=[io.String.Output("text", tooltip="The report, also shown on the node.")],
            is_output_node=True, not_idempotent=True)

    @classmethod
    def execute(cls, model=None, folder=inspection.NO_FOLDER, width=DEFAULT_SIZE, height=DEFAULT_SIZE) -> io.NodeOutput:
        device = glue.torch_device()
        files = inspection.inspect_text(model, folder, width, height, device if device.type == "cuda" else None)
        text = (files + "\n\n" if files else "") + report(model, CACHE.inspect())
        return io.NodeOutput(text, ui=ui.PreviewText(text))
