"""Gentor Inspect Model: what a handle points at and what the shared cache holds."""
from __future__ import annotations

from comfy_api.v0_0_2 import io, ui

from ..loaders.cache import CACHE, report
from .common import CATEGORY, GentorModel


class GentorInspectModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GentorInspectModel", display_name="Gentor Inspect Model", category=CATEGORY,
            description="Show a Gentor model's files and variant, and what the shared model cache holds.",
            inputs=[GentorModel.Input("model", optional=True,
                                      tooltip="Optional: a Gentor model to describe (variant, folder, memory).")],
            outputs=[io.String.Output("text", tooltip="The report, also shown on the node.")],
            is_output_node=True, not_idempotent=True)

    @classmethod
    def execute(cls, model=None) -> io.NodeOutput:
        text = report(model, CACHE.inspect())
        return io.NodeOutput(text, ui=ui.PreviewText(text))
