"""BAGEL nodes: the loader and the backend's settings (understanding goes through Gentor Describe Image)."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..loaders import bagel as loader
from ..samplers import bagel as sampler
from ..samplers.common import library_errors
from .common import CATEGORY, GentorMemory, GentorModel, GentorSettings

SUBCATEGORY = f"{CATEGORY}/BAGEL"


class GentorLoadBagel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GentorLoadBagel", display_name="Gentor Load BAGEL", category=SUBCATEGORY,
            description="Load BAGEL-7B-MoT (ema.safetensors, ae.safetensors, llm_config.json, vit_config.json, "
                        "tokenizer files in models/bagel/). T2I, edit, multi-image edit, think, understanding.",
            inputs=[
                io.Combo.Input("model_name", options=loader.list_models(),
                               tooltip="A BAGEL folder from models/bagel/ (e.g. ByteDance-Seed/BAGEL-7B-MoT). Sizes "
                                       "are read from its configs and weights."),
                GentorMemory.Input("memory", optional=True,
                                   tooltip="Optional Gentor Memory Options. FP8 storage + block offload fit a 24 GB "
                                           "card (the full model is ~29 GB in bf16)."),
            ],
            outputs=[GentorModel.Output("model", tooltip="Connect to Gentor Text to Image, Gentor Edit Image or "
                                                         "Gentor Describe Image.")])

    @classmethod
    def execute(cls, model_name, memory=None) -> io.NodeOutput:
        with library_errors("BAGEL", "model_name", "a readable BAGEL-7B-MoT folder",
                            "Check the folder's files and permissions, or download the model again."):
            return io.NodeOutput(loader.load_handle(model_name, memory))


class GentorBagelSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GentorBagelSettings", display_name="Gentor BAGEL Settings", category=SUBCATEGORY,
            description="BAGEL knobs the common inputs do not cover (cfg = cfg_text_scale, steps = num_timesteps). "
                        "-1 / auto = the official default of the task: T2I cfg_img 1.0, interval [0.4, 1], global "
                        "renorm; edit cfg_img 2.0, interval [0, 1], text_channel renorm.",
            inputs=[
                io.Float.Input("cfg_img_scale", default=sampler.AUTO_NUMBER, min=sampler.AUTO_NUMBER, max=10.0,
                               step=0.1, tooltip="Image guidance (keeps the edit close to the references). -1 = "
                                                 "auto (T2I 1.0, edit 2.0). Only applies while cfg > 1."),
                io.Float.Input("cfg_interval_start", default=sampler.AUTO_NUMBER, min=sampler.AUTO_NUMBER, max=1.0,
                               step=0.05, tooltip="Guidance applies for t in (start, end]. -1 = auto (T2I 0.4, edit 0.0)."),
                io.Float.Input("cfg_interval_end", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Upper end of the guidance interval (t runs from 1 to 0)."),
                io.Combo.Input("cfg_renorm_type", options=list(sampler.RENORM_CHOICES), default="auto",
                               tooltip="Rescale of the guided velocity: global (whole latent), channel (per token), "
                                       "text_channel (per token, text guidance only). auto = global for T2I, "
                                       "text_channel for edits. Blurry edits: try global."),
                io.Float.Input("cfg_renorm_min", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Lower clamp of the renorm ratio; 1.0 disables renorm."),
                io.Float.Input("timestep_shift", default=sampler.DEFAULT_SHIFT, min=0.1, max=20.0, step=0.1,
                               tooltip="Shift of the flow timesteps (official 3.0)."),
                io.Boolean.Input("think", default=False,
                                 tooltip="Plan in text before generating (or reason before answering). The plan "
                                         "comes out of the text output."),
                io.Int.Input("think_max_tokens", default=sampler.DEFAULT_THINK_TOKENS, min=1, max=sampler.MAX_TOKENS,
                             tooltip="Most tokens of the think text (official 1000). A cut plan is reported."),
                io.Float.Input("think_temperature", default=0.0, min=0.0, max=2.0, step=0.05,
                               tooltip="0 = greedy decoding (official default); > 0 samples (the seed applies)."),
                io.Int.Input("image_max_side", default=1024, min=16, max=1024, step=16,
                             tooltip="Reference images are resized so the long side is at most this (official "
                                     "1024); edits come out at that size. Lower = faster, less memory."),
                io.Int.Input("image_min_side", default=512, min=16, max=1024, step=16,
                             tooltip="...and the short side at least this (official 512)."),
                io.Int.Input("preview_every", default=sampler.DEFAULT_PREVIEW_EVERY, min=1, max=200,
                             tooltip="Send a preview every N steps."),
            ],
            outputs=[GentorSettings.Output("settings", tooltip="Connect to a task node's 'settings' input.")])

    @classmethod
    def execute(cls, cfg_img_scale, cfg_interval_start, cfg_interval_end, cfg_renorm_type, cfg_renorm_min,
                timestep_shift, think, think_max_tokens, think_temperature, image_max_side, image_min_side,
                preview_every) -> io.NodeOutput:
        return io.NodeOutput(sampler.make_settings(cfg_img_scale, cfg_interval_start, cfg_interval_end,
                                                   cfg_renorm_type, cfg_renorm_min, timestep_shift, think,
                                                   think_max_tokens, think_temperature, image_max_side,
                                                   image_min_side, preview_every))


NODES = [GentorLoadBagel, GentorBagelSettings]
