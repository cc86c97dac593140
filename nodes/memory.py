"""Gentor Memory Options: FP8 weight storage and offload for any Gentor loader."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..loaders.memory import COMPUTE_DTYPES, OFFLOAD_MODES, WEIGHT_DTYPES, MemoryOptions
from .common import CATEGORY, GentorMemory

MAX_BUDGET_GB = 1024.0


class GentorMemoryOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GentorMemoryOptions", display_name="Gentor Memory Options", category=CATEGORY,
            description="How a Gentor model holds its weights: FP8 storage, compute dtype, CPU offload.",
            inputs=[
                io.Combo.Input("weight_dtype", options=list(WEIGHT_DTYPES), default="auto",
                               tooltip="Storage dtype of the big weights. fp8_* halves memory vs bf16 (layers are "
                                       "up-cast one at a time to compute). auto = bf16 on GPU, fp32 on CPU."),
                io.Combo.Input("compute_dtype", options=list(COMPUTE_DTYPES), default="auto",
                               tooltip="Dtype the math runs in. auto = bf16 on GPU, fp32 on CPU."),
                io.Combo.Input("offload", options=list(OFFLOAD_MODES), default="none",
                               tooltip="none: all weights on the GPU (ComfyUI may evict them). model: one component "
                                       "on the GPU at a time. block: transformer blocks streamed from RAM (least "
                                       "VRAM, slower). No effect on a CPU-only machine."),
                io.Float.Input("vram_budget_gb", default=0.0, min=0.0, max=MAX_BUDGET_GB, step=0.5,
                               tooltip="Most VRAM our weights may take; when 'none' would exceed it, block offload "
                                       "is used. 0 = no limit."),
            ],
            outputs=[GentorMemory.Output("memory", tooltip="Connect to a Gentor loader's 'memory' input.")])

    @classmethod
    def execute(cls, weight_dtype, compute_dtype, offload, vram_budget_gb) -> io.NodeOutput:
        # vram_budget_gb is checked (finite, in range) by the shared input check (nodes/common.checked).
        return io.NodeOutput(MemoryOptions(weight_dtype, compute_dtype, offload, float(vram_budget_gb)))
