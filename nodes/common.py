"""Socket types and widgets shared by the node files."""
from __future__ import annotations

import functools

import torch
from comfy_api.v0_0_2 import io

from .. import registry
from ..loaders.cache import ModelHandle
from ..loaders.memory import MemoryOptions
from ..samplers.common import InputField, Settings, check_inputs

GentorModel = io.Custom("GENTOR_MODEL")
GentorMemory = io.Custom("GENTOR_MEMORY")
GentorSettings = io.Custom("GENTOR_SETTINGS")
GentorSpeed = io.Custom("GENTOR_SPEED")

CATEGORY = "Gentor"
MAX_SIZE = 8192
SIZE_STEP = 16
MAX_SEED = 0xFFFFFFFFFFFFFFFF
MAX_STEPS = 200
MAX_CFG = 30.0
MAX_BATCH = 16
# = registry.max_references() (Qwen-Image 2.1 takes 10); a literal so the static workflow parser can read it
# (tests/test_qwen_image21.py checks that the two agree).
EDIT_IMAGE_INPUTS = 10


def common_inputs() -> list:
    """The inputs every task sampler shares, in contract order (README node reference)."""
    return [
        GentorModel.Input("model", tooltip="A Gentor model from a Gentor loader node (any backend)."),
        io.String.Input("prompt", multiline=True, default="",
                        tooltip="What to generate, or for edits the instruction (e.g. 'make the sky purple')."),
        io.String.Input("negative", multiline=True, default="",
                        tooltip="What to avoid. Empty = the backend's default negative prompt."),
        io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=True,
                     tooltip="Noise seed. Same seed + same inputs = the same image on the same machine."),
        io.Int.Input("steps", default=0, min=0, max=MAX_STEPS,
                     tooltip="Denoising steps. 0 = the backend's default: " + registry.defaults_hint("steps") + "."),
        io.Float.Input("cfg", default=0.0, min=0.0, max=MAX_CFG, step=0.1,
                       tooltip="Guidance scale. 0 = the backend's default: " + registry.defaults_hint("cfg") + "."),
        io.Int.Input("width", default=0, min=0, max=MAX_SIZE, step=SIZE_STEP,
                     tooltip="Output width in pixels. 0 = the backend's size rule: " + registry.defaults_hint("size")
                             + ". Off-grid values are rounded to the backend's grid and reported."),
        io.Int.Input("height", default=0, min=0, max=MAX_SIZE, step=SIZE_STEP,
                     tooltip="Output height in pixels. 0 = the backend's size rule (see width)."),
    ]


def settings_input() -> io.Input:
    return GentorSettings.Input("settings", optional=True,
                                tooltip="Optional per-backend settings (e.g. Gentor Qwen-Image Settings).")


def speed_input() -> io.Input:
    return GentorSpeed.Input("speed", optional=True,
                             tooltip="Optional Gentor Speed Options (step cache, attention, compile) for this run.")


def task_outputs() -> list:
    return [io.Image.Output("image", tooltip="Generated images, [batch, height, width, 3] in 0..1."),
            io.String.Output("text", tooltip="Notes: size, steps, guidance and seed used; reasoning for "
                                             "backends that think. Empty when none."),
            # Appended last so that links to the outputs above keep their slots in saved workflows.
            io.Mask.Output("mask", tooltip="Transparency of models that output RGBA (Qwen-Image 2.1) as a ComfyUI "
                                           "mask (1 = transparent, as Load Image gives it); all 0 otherwise.")]


# ----------------------------------------------------------------------------- the shared input check
# What each socket type carries and what to wire there (an API prompt can send a plain string anywhere).
SOCKETS: dict[str, tuple[type, str]] = {
    "GENTOR_MODEL": (ModelHandle, "the 'model' output of a Gentor loader node (e.g. Gentor Load Qwen-Image)"),
    "GENTOR_MEMORY": (MemoryOptions, "the 'memory' output of Gentor Memory Options"),
    "GENTOR_SETTINGS": (Settings, "the 'settings' output of the model's Gentor settings node"),
    "IMAGE": (torch.Tensor, "an IMAGE output (e.g. Load Image)"),
    "MASK": (torch.Tensor, "a MASK output"),
}
NUMBER_KINDS = {"FLOAT": "float", "INT": "int"}


def input_fields(schema: io.Schema) -> list[InputField]:
    """The schema's inputs as the shared validator sees them (numbers with their ranges, text, sockets)."""
    fields = []
    for item in schema.inputs:
        kind = str(item.get_io_type())
        if kind in NUMBER_KINDS:
            fields.append(InputField(item.id, NUMBER_KINDS[kind], getattr(item, "min", None), getattr(item, "max", None)))
        elif kind == "STRING":
            fields.append(InputField(item.id, "text"))
        elif kind in SOCKETS:
            expected, connect = SOCKETS[kind]
            fields.append(InputField(item.id, "socket", expected=expected, connect=connect))
    return fields


def checked(node: type[io.ComfyNode]) -> type[io.ComfyNode]:
    """Make ``node.execute`` check every input against the node's schema first (once per class).

    One wrapper for every node, applied where the pack lists its nodes, so no node can forget it and each
    node's ``execute`` stays wiring only."""
    if node.__dict__.get("_gentor_checked"):  # this class itself (a subclass has its own schema to check)
        return node
    schema = node.define_schema()
    fields, display = input_fields(schema), schema.display_name or schema.node_id
    run = node.execute.__func__

    @functools.wraps(run)
    def execute(cls, *args, **values):
        check_inputs(display, fields, values)
        return run(cls, *args, **values)

    node.execute = classmethod(execute)
    node._gentor_checked = True
    return node
