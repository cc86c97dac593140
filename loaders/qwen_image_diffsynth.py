"""DiffSynth-Studio as Qwen-Image's second engine: its model classes as views over the cached weights.

DiffSynth identifies checkpoint files by a hash of key names and shapes and its model classes hard-code the
real widths, so it cannot load our files itself (nor tiny test models). It does not need to: its DiT and
VAE use exactly diffusers' parameter names, and its text encoder is transformers' ``Qwen2_5_VLModel`` (for
Qwen-Image 2.1: its 2.1 DiT and VAE, which take diffusers' config fields, and ``Qwen3VLForConditionalGeneration``). So
each DiffSynth module is built empty (no memory) with the sizes read from the cached diffusers module and
then given the cached module's own ``Parameter`` objects — one copy of the weights serves both engines.
LoRA layers of the cached transformer become DiffSynth's hot-loaded LoRA factors (its own unfused path).

DiffSynth's VRAM management is then enabled with the memory plan mapped onto its vram config (see
``vram_config``), with one rule of ours: a wrapper's resting dtype is whatever the cache stored the weight
in, so DiffSynth moves weights between devices but never re-casts a shared weight in place.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InputError, MissingDependencyError
from .memory import Plan

log = logging.getLogger(__name__)

DISPLAY = "Qwen-Image"
PACKAGE = "diffsynth"
TESTED_MIN = (2, 1, 12)  # inclusive
TESTED_BELOW = (2, 2, 0)  # exclusive
TESTED_RANGE = ">=2.1.12,<2.2"
PIP_COMMAND = f'pip install "diffsynth{TESTED_RANGE}"'
ENGINES = ("diffusers", "diffsynth", "diffsynth-or-diffusers")
DEFAULT_ENGINE = "diffusers"
# transformers renamed classes that DiffSynth's VRAM module maps name (old name -> new name); an entry that
# names neither is dropped (that layer type is then handled by its parent, as DiffSynth does for unknown types).
TRANSFORMERS_RENAMES = {
    "Qwen2RMSNorm": "Qwen2_5_VLRMSNorm",  # transformers 5.2
    "Qwen2_5_VisionRotaryEmbedding": "Qwen2_5_VLVisionRotaryEmbedding",  # transformers 5.17
}
DIT_MAP = "diffsynth.models.qwen_image_dit.QwenImageDiT"
VAE_MAP = "diffsynth.models.qwen_image_vae.QwenImageVAE"
TEXT_ENCODER_MAP = "diffsynth.models.qwen_image_text_encoder.QwenImageTextEncoder"
DIT21_MAP = "diffsynth.models.qwen_image_21_dit.QwenImage21DiT"
VAE21_MAP = "diffsynth.models.qwen_image_21_vae.QwenImage21VAE"
TEXT_ENCODER21_MAP = "diffsynth.models.qwen_image_21_text_encoder.QwenImage21TextEncoder"
SUPPORTED_TASKS = ("t2i", "edit", "edit_plus", "qi21")  # the loader's task families (qi21 = Qwen-Image 2.1)
ROPE_THETA = 10000
TIME_PROJ_DIM = 256


def _version_tuple(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts + [0] * (3 - len(parts)))


def installed_version() -> str | None:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_engine(engine: str) -> None:
    if engine not in ENGINES:
        raise InputError(f"{DISPLAY} engine: unknown engine (got {engine!r}, expected one of {', '.join(ENGINES)}). "
                         "Pick one from the list.")


def require() -> list[str]:
    """Raise with the pip command when DiffSynth is missing; a note (and a log warning) outside the tested range."""
    version = installed_version()
    if version is None:
        raise MissingDependencyError(
            f"{DISPLAY} engine: the DiffSynth engine needs the diffsynth package (got no diffsynth installed, "
            f"expected diffsynth{TESTED_RANGE}). Install it into ComfyUI's Python with: {PIP_COMMAND} — or set "
            "engine to diffusers.")
    if not TESTED_MIN <= _version_tuple(version) < TESTED_BELOW:
        note = f"diffsynth {version} is outside the tested range {TESTED_RANGE}: results may differ or fail"
        log.warning("Gentor: %s", note)
        return [note]
    return []


def unsupported_reason(task: str, variant: str) -> str | None:
    """Why our DiffSynth engine cannot run this model, or None (both schedules map onto its templates)."""
    if task not in SUPPORTED_TASKS:
        return (f"{variant} (DiffSynth's Qwen-Image pipelines run Qwen-Image, -2512, Edit, Edit-2509, Edit-2511 "
                "and Qwen-Image 2.1)")
    return None


# ----------------------------------------------------------------------------- views over cached modules
def _share(view: torch.nn.Module, source: Any, what: str) -> torch.nn.Module:
    """Give an empty (meta) DiffSynth module the cached module's own Parameter objects (strict names)."""
    state = source.state_dict(keep_vars=True)
    # assign=True sets each incoming Parameter's requires_grad to the empty one's: keep the cached ones frozen
    # (cached weights may also be inference tensors, which refuse requires_grad=True).
    view.requires_grad_(False)
    view.load_state_dict(state, strict=True, assign=True)
    left = [n for n, p in view.named_parameters() if p.device.type == "meta"]
    if left:
        raise RuntimeError(f"DiffSynth {what}: parameters left empty after sharing: {left[:5]}")
    return view


def build_dit(transformer: torch.nn.Module) -> torch.nn.Module:
    """DiffSynth's ``QwenImageDiT`` with the cached transformer's sizes and base weights (without the LoRA layers
    PEFT may have injected: those are handed over separately, see ``copy_loras``)."""
    from .lora import base_view  # noqa: PLC0415

    return _share(empty_dit(transformer.config), base_view(transformer), "transformer")


def empty_dit(cfg: Any) -> torch.nn.Module:
    """DiffSynth's ``QwenImageDiT`` structure for a diffusers transformer config, weights on meta."""
    from accelerate import init_empty_weights  # noqa: PLC0415
    from diffsynth.models.general_modules import AdaLayerNorm, RMSNorm, TimestepEmbeddings  # noqa: PLC0415
    from diffsynth.models.qwen_image_dit import QwenEmbedRope, QwenImageDiT, QwenImageTransformerBlock  # noqa: PLC0415

    inner = cfg.num_attention_heads * cfg.attention_head_dim
    # QwenImageDiT.__init__ fixes the real widths (3072 / 3584 / rope 16,56,56); only the layer count is a
    # parameter. Its building blocks take the sizes, so the same structure is assembled from the config.
    with init_empty_weights():
        dit = QwenImageDiT.__new__(QwenImageDiT)
        torch.nn.Module.__init__(dit)
        dit.pos_embed = QwenEmbedRope(theta=ROPE_THETA, axes_dim=list(cfg.axes_dims_rope), scale_rope=True)
        dit.time_text_embed = TimestepEmbeddings(TIME_PROJ_DIM, inner, diffusers_compatible_format=True, scale=1000,
                                                 align_dtype_to_timestep=False)
        dit.txt_norm = RMSNorm(cfg.joint_attention_dim, eps=1e-6)
        dit.img_in = torch.nn.Linear(cfg.in_channels, inner)
        dit.txt_in = torch.nn.Linear(cfg.joint_attention_dim, inner)
        dit.transformer_blocks = torch.nn.ModuleList(
            QwenImageTransformerBlock(dim=inner, num_attention_heads=cfg.num_attention_heads,
                                      attention_head_dim=cfg.attention_head_dim) for _ in range(cfg.num_layers))
        dit.norm_out = AdaLayerNorm(inner, single=True)
        dit.proj_out = torch.nn.Linear(inner, cfg.patch_size ** 2 * cfg.out_channels)
    return dit


def build_vae(vae: torch.nn.Module) -> torch.nn.Module:
    """DiffSynth's ``QwenImageVAE`` with the cached VAE's config, weights and latent statistics."""
    from accelerate import init_empty_weights  # noqa: PLC0415
    from diffsynth.models.qwen_image_vae import QwenImageVAE  # noqa: PLC0415

    cfg = vae.config
    with init_empty_weights():
        view = QwenImageVAE(base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult),
                            num_res_blocks=cfg.num_res_blocks, attn_scales=list(cfg.attn_scales),
                            temperal_downsample=list(cfg.temperal_downsample))
    _share(view, vae, "vae")
    # DiffSynth hard-codes the released statistics; the folder's config is the authority.
    view.mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, cfg.z_dim, 1, 1, 1)
    view.std = 1 / torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, cfg.z_dim, 1, 1, 1)
    return view


def build_text_encoder(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """DiffSynth's ``QwenImageTextEncoder`` around a ``Qwen2_5_VLModel`` sharing the cached encoder's weights.

    DiffSynth's own constructor builds the 7B config and its file converter expects the pre-transformers-5
    key layout; neither is needed when the weights come from the cached transformers model.
    """
    from accelerate import init_empty_weights  # noqa: PLC0415
    from diffsynth.models.qwen_image_text_encoder import QwenImageTextEncoder  # noqa: PLC0415
    from transformers import Qwen2_5_VLModel  # noqa: PLC0415

    config = text_encoder.config
    view = QwenImageTextEncoder.__new__(QwenImageTextEncoder)
    torch.nn.Module.__init__(view)
    with init_empty_weights():
        view.model = Qwen2_5_VLModel(config)
        view.lm_head = torch.nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
    view.config = config
    _share(view.model, text_encoder.model, "text_encoder")
    _share(view.lm_head, text_encoder.lm_head, "text_encoder lm_head")
    return view


# ----------------------------------------------------------------------------- Qwen-Image 2.1 views
def _from_config(cls: type, config: Any) -> torch.nn.Module:
    """``cls`` built empty (weights on meta) from the diffusers config: DiffSynth's 2.1 classes take the very
    fields diffusers' config holds (an unknown field would mean another architecture, so none is guessed)."""
    from accelerate import init_empty_weights  # noqa: PLC0415

    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in dict(config).items() if k in params}
    with init_empty_weights():
        return cls(**kwargs)


def build_dit21(transformer: torch.nn.Module) -> torch.nn.Module:
    """DiffSynth's ``QwenImage21DiT`` with the cached 2.1 transformer's config and base weights."""
    from diffsynth.models.qwen_image_21_dit import QwenImage21DiT  # noqa: PLC0415

    from .lora import base_view  # noqa: PLC0415

    return _share(_from_config(QwenImage21DiT, transformer.config), base_view(transformer), "transformer")


def build_vae21(vae: torch.nn.Module) -> torch.nn.Module:
    """DiffSynth's ``QwenImage21VAE`` (RGBA, 16x) with the cached VAE's config (latent statistics included)."""
    from diffsynth.models.qwen_image_21_vae import QwenImage21VAE  # noqa: PLC0415

    return _share(_from_config(QwenImage21VAE, vae.config), vae, "vae")


def build_text_encoder21(text_encoder: torch.nn.Module) -> torch.nn.Module:
    """DiffSynth's ``QwenImage21TextEncoder`` around a ``Qwen3VLForConditionalGeneration`` with the cached
    encoder's config and weights (its own constructor builds the 8B config)."""
    from accelerate import init_empty_weights  # noqa: PLC0415
    from diffsynth.models.qwen_image_21_text_encoder import QwenImage21TextEncoder  # noqa: PLC0415
    from transformers import Qwen3VLForConditionalGeneration  # noqa: PLC0415

    view = QwenImage21TextEncoder.__new__(QwenImage21TextEncoder)
    torch.nn.Module.__init__(view)
    with init_empty_weights():
        view.model = Qwen3VLForConditionalGeneration(text_encoder.config)
    view.config = text_encoder.config
    _share(view.model, text_encoder, "text_encoder")
    # As its constructor does: the float32 rotary buffers, put back whenever the wrapper is cast as a whole.
    view._fp32_buffers = {n: b.detach().clone() for n, b in view.model.named_buffers() if b.dtype == torch.float32}
    return view


# ----------------------------------------------------------------------------- LoRA
def copy_loras(transformer: torch.nn.Module, dit: torch.nn.Module) -> int:
    """Hand the cached transformer's ACTIVE PEFT LoRA factors to DiffSynth's hot-load lists (B pre-scaled by
    PEFT's scaling, i.e. strength * alpha / r); returns the number of layers given a LoRA."""
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415

    count = 0
    for name, layer in transformer.named_modules():
        if not isinstance(layer, LoraLayer) or layer.disable_adapters:
            continue
        target = dit.get_submodule(name)
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A:
                continue
            if layer.use_dora.get(adapter):
                raise InputError(f"{DISPLAY} engine: a DoRA adapter cannot run on the DiffSynth engine (got DoRA "
                                 f"weights in {name}, expected plain LoRA). Use engine = diffusers for it.")
            target.lora_A_weights.append(layer.lora_A[adapter].weight)
            target.lora_B_weights.append(layer.lora_B[adapter].weight * layer.scaling[adapter])
            count += 1
    return count


# ----------------------------------------------------------------------------- VRAM management
@dataclass(frozen=True)
class VramSetup:
    """DiffSynth's vram config for one plan, and the layer-level limit (GB of device memory in use)."""

    config: dict
    limit_gb: float | None
    describe: str


def vram_config(plan: Plan) -> VramSetup:
    """Map our plan onto DiffSynth's states (offload -> onload -> preparing -> computation).

    none  : everything on the device (its "no VRAM management" layout; FP8 layers up-cast per forward).
    model : whole models moved to the device for their stage, back to the CPU after (its component offload).
    block : weights rest on the CPU; each layer is copied to the device for its forward, and kept there while
            device memory in use stays under the budget (its layer-level ``vram_limit``; 0 = never kept).
    """
    device, compute = plan.device, plan.compute
    if plan.offload == "none" or device.type == "cpu":
        # On a CPU there is no second device: every state is the CPU (offload has no effect, as in diffusers).
        places = (device, device, device)
        limit, text = None, "resident on the device"
    elif plan.offload == "model":
        places = ("cpu", device, device)
        limit, text = None, "model offload (one model on the device per stage)"
    else:
        places = ("cpu", "cpu", device)
        limit = plan.budget_bytes / 2**30 if plan.budget_bytes else 0.0
        text = f"layer offload (vram_limit {limit:.1f} GB)"
    offload, onload, preparing = (torch.device(p) if isinstance(p, str) else p for p in places)
    config = dict(offload_dtype=compute, offload_device=offload, onload_dtype=compute, onload_device=onload,
                  preparing_dtype=compute, preparing_device=preparing, computation_dtype=compute,
                  computation_device=device)
    return VramSetup(config, limit, text)


def _resolve(dotted: str) -> type | None:
    module_name, _, attr = dotted.rpartition(".")
    module = importlib.import_module(module_name)
    found = getattr(module, attr, None)
    if found is None and attr in TRANSFORMERS_RENAMES:
        found = getattr(module, TRANSFORMERS_RENAMES[attr], None)
    return found


def module_map(model_key: str) -> dict[type, type]:
    """DiffSynth's VRAM module map for a model class, with class names resolved against the installed
    transformers (renamed classes mapped to their new names; names that exist nowhere dropped)."""
    from diffsynth.configs.vram_management_module_maps import VRAM_MANAGEMENT_MODULE_MAPS  # noqa: PLC0415

    out: dict[type, type] = {}
    for source, target in VRAM_MANAGEMENT_MODULE_MAPS[model_key].items():
        cls = _resolve(source)
        if cls is None:
            log.debug("Gentor: DiffSynth VRAM map names %s, which this transformers does not have", source)
            continue
        out[cls] = _resolve(target)
    return out


def enable_vram(view: torch.nn.Module, model_key: str, setup: VramSetup) -> torch.nn.Module:
    """DiffSynth's VRAM management on a view; each wrapper rests in the dtype its shared weights are stored in."""
    from diffsynth.core.vram.layers import AutoTorchModule, enable_vram_management  # noqa: PLC0415

    view = enable_vram_management(view, module_map(model_key), vram_config=dict(setup.config),
                                  vram_limit=setup.limit_gb)
    for wrapper in view.modules():
        if not isinstance(wrapper, AutoTorchModule):
            continue
        stored = next((p.dtype for p in wrapper.parameters(recurse=True) if p.is_floating_point()), None)
        if stored is not None:
            # A shared Parameter cast in place would change the cached copy for every user (e.g. FP8 -> bf16,
            # or an FP8-skipped norm -> FP8): DiffSynth only ever moves it.
            wrapper.offload_dtype = wrapper.onload_dtype = wrapper.preparing_dtype = stored
    return view
