"""Gentor Speed Options: step cache, attention backend and compiled blocks for one sampler run."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..samplers.common import check_number
from ..samplers.speed import (ATTENTION_BACKENDS, CACHES, DEFAULT_INTERVAL, DEFAULT_THRESHOLD, DEFAULT_WARMUP,
                              MAX_INTERVAL, MAX_STEPS_RANGE, MAX_THRESHOLD, NODE, SpeedOptions)
from .common import CATEGORY, GentorSpeed


class GentorSpeedOptions(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GentorSpeedOptions", display_name=NODE, category=CATEGORY,
            description="Faster sampling for Qwen-Image, DeepGen and BAGEL: a step cache, another attention "
                        "kernel, compiled blocks. Applied to one run only; the shared model is left as it was.",
            inputs=[
                io.Combo.Input("cache", options=list(CACHES), default="off",
                               tooltip="off: every step computed. first_block: skip the other blocks while the "
                                       "first block's output barely changes (threshold). taylorseer: compute every "
                                       "'interval' steps, extrapolate the steps between. BAGEL: taylorseer only."),
                io.Float.Input("threshold", default=DEFAULT_THRESHOLD, min=0.0, max=MAX_THRESHOLD, step=0.01,
                               tooltip="first_block: relative change of the first block's residual under which "
                                       "the step is reused. 0 = never skip; higher = faster, more drift."),
                io.Int.Input("interval", default=DEFAULT_INTERVAL, min=1, max=MAX_INTERVAL,
                             tooltip="taylorseer: one full step every N steps. 1 = never extrapolate."),
                io.Int.Input("warmup_steps", default=DEFAULT_WARMUP, min=0, max=MAX_STEPS_RANGE,
                             tooltip="Steps always computed at the start (the layout forms there)."),
                io.Int.Input("last_steps", default=0, min=0, max=MAX_STEPS_RANGE,
                             tooltip="Steps always computed at the end (fine detail)."),
                io.Combo.Input("attention", options=list(ATTENTION_BACKENDS), default="auto",
                               tooltip="diffusers attention backend. auto = the model's own. flash / sage / "
                                       "xformers / _native_* need a CUDA GPU (and the package); refused with the "
                                       "reason where unusable."),
                io.Boolean.Input("compile_blocks", default=False,
                                 tooltip="torch.compile each repeated transformer block (the first run compiles, "
                                         "minutes; later runs at the same size are faster)."),
            ],
            outputs=[GentorSpeed.Output("speed", tooltip="Connect to a Gentor task node's 'speed' input.")])

    @classmethod
    def execute(cls, cache, threshold, interval, warmup_steps, last_steps, attention,
                compile_blocks) -> io.NodeOutput:
        threshold = check_number(threshold, "threshold", NODE, 0.0, MAX_THRESHOLD)
        return io.NodeOutput(SpeedOptions(cache, float(threshold), int(interval), int(warmup_steps),
                                          int(last_steps), attention, bool(compile_blocks)))
