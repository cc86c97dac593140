"""Emu3.5 nodes: the loader and the backend's settings."""
from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..loaders import emu35 as loader
from ..modeling.emu35 import tokens as T
from ..samplers import emu35 as sampler
from ..samplers.common import library_errors
from .common import CATEGORY, GentorMemory, GentorModel, GentorSettings

SUBCATEGORY = f"{CATEGORY}/Emu3.5"


class GentorLoadEmu35(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GentorLoadEmu35", display_name="Gentor Load Emu3.5", category=SUBCATEGORY,
            description="Load Emu3.5 or Emu3.5-Image (HF folder) with the Emu3.5 vision tokenizer (models/emu35/).",
            inputs=[
                io.Combo.Input("model_name", options=loader.list_models(),
                               tooltip="An Emu3.5 / Emu3.5-Image folder (config.json model_type Emu3 + safetensors) "
                                       "from models/emu35/. Sizes and the variant are read from its files."),
                io.Combo.Input("vision_tokenizer", options=loader.list_vision_tokenizers(),
                               tooltip="The Emu3.5-VisionTokenizer folder from models/emu35/ (config.yaml + "
                                       "model.ckpt, or its transformers form: config.json + model.safetensors)."),
                io.Combo.Input("tokenizer", options=loader.list_tokenizers(), default=loader.FROM_MODEL_FOLDER,
                               tooltip="Where emu3.tiktoken + emu3_vision_tokens.txt are: the model folder, or a "
                                       "separate folder in models/emu35/."),
                io.Combo.Input("placement", options=list(loader.PLACEMENTS), default="auto",
                               tooltip="auto: split the LLM's layers over all visible GPUs under device_budgets "
                                       "(one GPU: the memory options apply, e.g. FP8 + block offload). 'single "
                                       "device': always one device with the memory options."),
                io.String.Input("device_budgets", default="",
                                tooltip="Per-GPU budgets in GB for 'auto', e.g. 'cuda:0=70, cuda:1=75'. Empty = the "
                                        "free memory of every visible GPU."),
                io.Combo.Input("vq_device", options=list(loader.VQ_DEVICES), default="auto",
                               tooltip="Where the vision tokenizer runs: auto = the compute device, or cpu."),
                GentorMemory.Input("memory", optional=True,
                                   tooltip="Optional Gentor Memory Options (FP8 storage, offload)."),
                io.Combo.Input("variant", options=list(loader.VARIANTS), default="auto", optional=True,
                               tooltip="Which release this is; it only sets defaults (cfg 5.0 T2I / 3.0 edit, "
                                       "1 MP, image top-k 5120 for Emu3.5-Image; cfg 2.0, 0.5 MP, top-k 10240, "
                                       "auto size for Emu3.5). auto: the model card's pipeline_tag decides "
                                       "(both releases ship the same config.json); without one, Emu3.5-Image "
                                       "is assumed and the text output says so."),
            ],
            outputs=[GentorModel.Output("model", tooltip="Connect to Gentor Text to Image or Gentor Edit Image.")])

    @classmethod
    def execute(cls, model_name, vision_tokenizer, tokenizer, placement, device_budgets, vq_device,
                memory=None, variant="auto") -> io.NodeOutput:
        with library_errors("Emu3.5", "model_name", "readable Emu3.5 model and vision tokenizer folders",
                            "Check the folders' files and permissions, or download them again."):
            return io.NodeOutput(loader.load_handle(model_name, vision_tokenizer, tokenizer, placement,
                                                    device_budgets, vq_device, "ibq", memory, variant))


class GentorEmu35Settings(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="GentorEmu35Settings", display_name="Gentor Emu3.5 Settings", category=SUBCATEGORY,
            description="Emu3.5 knobs that the common sampler inputs do not cover (defaults = the official configs).",
            inputs=[
                io.Int.Input("max_new_tokens", default=T.MAX_NEW_TOKENS, min=1, max=sampler.MAX_NEW_TOKENS_LIMIT,
                             tooltip="Most tokens the model may write (text + image). A 64x64-token image needs 4167."),
                io.Int.Input("image_area", default=0, min=0, max=sampler.IMAGE_AREA_MAX, step=256,
                             tooltip="Pixels references are resized to (and the T2I size at other than 1 MP). "
                                     "0 = the variant's default (1048576 Emu3.5-Image, 518400 Emu3.5)."),
                io.Int.Input("image_top_k", default=0, min=0, max=131072,
                             tooltip="Top-k for image tokens. 0 = the variant's default (5120 Emu3.5-Image, 10240 Emu3.5)."),
                io.Int.Input("text_top_k", default=T.TEXT_TOP_K, min=0, max=151854,
                             tooltip="Top-k for text tokens (0 = off)."),
                io.Float.Input("text_top_p", default=T.TEXT_TOP_P, min=0.01, max=1.0, step=0.01,
                               tooltip="Nucleus mass for text tokens."),
                io.Combo.Input("aspect", options=list(sampler.ASPECTS), default="default",
                               tooltip="T2I output grid when width/height are 0: default = 4:3 (55x73 tokens) with "
                                       "Emu3.5-Image, auto with Emu3.5; auto = the model writes the size."),
                io.Combo.Input("vq_type", options=list(loader.VQ_TYPES), default="ibq",
                               tooltip="Vision tokenizer type: only ibq is released; dcae is refused with a reason."),
            ],
            outputs=[GentorSettings.Output("settings", tooltip="Connect to a task sampler's 'settings' input.")])

    @classmethod
    def execute(cls, max_new_tokens, image_area, image_top_k, text_top_k, text_top_p, aspect,
                vq_type) -> io.NodeOutput:
        return io.NodeOutput(sampler.make_settings(max_new_tokens, image_area, image_top_k, text_top_k, text_top_p,
                                                   aspect, vq_type))


NODES = [GentorLoadEmu35, GentorEmu35Settings]
