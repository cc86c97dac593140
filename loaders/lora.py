"""LoRA files for Qwen-Image: find, read, detect the key layout, convert through diffusers, check, inject.

Formats (detected from the keys, never from the file name):

- ``diffusers``: ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight`` (what diffusers/PEFT save);
  also without the ``transformer.`` prefix, and PEFT's ``lora_A.default.weight`` spelling.
- ``comfyui``: ``diffusion_model.transformer_blocks.0.attn.to_q.lora_A.weight`` / ``lora_down`` + ``.alpha``.
- ``kohya``: ``lora_unet_transformer_blocks_0_attn_to_q.lora_down.weight`` + ``.alpha`` (flattened names).

Every format goes through diffusers' own Qwen-Image conversion (``QwenImageLoraLoaderMixin.lora_state_dict``:
prefixes, flattened names, alpha folded into the weights). Then every converted key must name a layer of
the loaded transformer with matching shapes, or the run fails listing a few of the keys that match nothing
— a LoRA is never applied partly. Injection is diffusers' ``load_lora_adapter`` (PEFT layers under a name);
switching on/off and strength are the cache's job (``Session.use_adapters``), so the base weights stay
untouched and shared.

LoRA math on FP8-stored layers: PEFT wraps the stored ``Linear`` (its FP8 weight and diffusers' layerwise-
casting hook stay as they are) and adds ``B(A(x)) * scale``. The base product runs with the weight upcast
to the compute dtype for that call; the LoRA factors are kept in the compute dtype (never FP8), so the
LoRA delta itself is not rounded to FP8.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import glue
from ..errors import InputError, ModelFolderError
from .adapters import Adapter, adding_named_adapter
from .cache import ModelHandle, file_identity
from .files import existing_roots, safe_name_parts, safetensors_header

log = logging.getLogger(__name__)

FOLDER_KEY = "loras"
EXTENSIONS = (".safetensors",)
SUPPORTED_BACKENDS = ("qwen_image",)
PREFIX = "transformer"
LIST_LIMIT = 5  # keys named in an error message
ADAPTER_PREFIX = "lora_"
ID_CHARS = 12
LIGHTNING_WORD = "lightning"
# Published Lightning recipe (ModelTC/Qwen-Image-Lightning): 8 (or 4) steps, no true CFG, shift 3 fixed.
LIGHTNING_STEPS = 8
LIGHTNING_CFG = 1.0
LIGHTNING_MAX_STEPS = 16  # above this, the user runs a distilled LoRA far from its recipe: say so
QWEN_MARKERS = ("transformer_blocks", "img_mlp", "txt_mlp", "add_q_proj", "img_mod", "txt_mod")
# Other architectures' LoRAs, recognised from their keys before the Qwen-Image check: several share words with
# Qwen-Image (an SDXL kohya key holds "transformer_blocks", FLUX's double blocks have img_mlp / txt_mod). Keys
# are compared in one spelling (lower case, "." as "_", which is how kohya flattens names). First match wins.
UNET = re.compile(r"(^|_)(down_blocks|up_blocks|input_blocks|output_blocks|mid_block|middle_block)_\d|(^|_)lora_te\d?_"
                  r"|text_model_encoder_layers")
SD1_ONLY = re.compile(r"down_blocks_0_attentions|up_blocks_3_attentions|input_blocks_[12]_1_|output_blocks_(9|1[01])_1_")
SDXL_ONLY = re.compile(r"lora_te2_|text_encoder_2|transformer_blocks_[1-9]")
FOREIGN_FAMILIES = (
    ("HunyuanVideo", re.compile(r"token_refiner|individual_token|double_blocks_(19|[2-9]\d)_|single_blocks_(3[89]|[4-9]\d)_")),
    ("FLUX", re.compile(r"double_blocks_\d|single_blocks_\d|single_transformer_blocks")),
    ("SD3 / SD3.5", re.compile(r"joint_blocks|context_block|ff_context")),
    ("Wan", re.compile(r"(^|_)blocks_\d+_(self_attn|cross_attn|ffn)_")),
    ("Z-Image / Lumina 2", re.compile(r"context_refiner|noise_refiner")),
    ("language-model (LLM)", re.compile(r"layers_\d+_(self_attn_[qkvo]_proj|mlp_(gate|up|down)_proj)")),
)
LORA_KEY = re.compile(r"\.(lora_[AB]|lora_up|lora_down)(\.[^.]+)?\.(weight|bias)$")


@dataclass(frozen=True)
class LoraRef:
    """One LoRA a handle carries: the dropdown name, the resolved file, the strength."""

    name: str
    path: str
    strength: float


# ----------------------------------------------------------------------------- listing / names
def list_loras() -> list[str]:
    """LoRA files under every registered ``loras`` root ('/'-separated names; the first root wins)."""
    seen: dict[str, Path] = {}
    for base in existing_roots((FOLDER_KEY,)):
        for f in sorted(base.rglob("*")):
            if f.is_file() and f.suffix.lower() in EXTENSIONS:
                seen.setdefault(f.relative_to(base).as_posix(), f)
    return sorted(seen)


def resolve_lora(display: str, name: str) -> Path:
    """A dropdown name -> a file inside a registered ``loras`` root; anything else is refused."""
    roots = [Path(r).resolve() for r in glue.model_roots(FOLDER_KEY)]
    parts = safe_name_parts(name) if isinstance(name, str) and name else None
    if parts is None:
        raise InputError(f"{display} lora_name: not a LoRA name from the list (got {name!r}, expected a file name "
                         f"relative to models/{FOLDER_KEY}/). Pick a LoRA from the dropdown.")
    for root in roots:
        cand = root.joinpath(*parts)
        if cand.is_file():
            if cand.suffix.lower() not in EXTENSIONS:
                break
            return cand.resolve()
    raise InputError(f"{display} lora_name: {name!r} is not a LoRA file in the registered folders (got {name!r}, "
                     f"expected a {'/'.join(EXTENSIONS)} file under {', '.join(map(str, roots)) or 'models/loras'}). "
                     "Put the LoRA into models/loras/ and refresh, or pick one from the dropdown.")


def with_lora(handle: ModelHandle, lora_name: str, strength: float, display: str = "Gentor LoRA") -> ModelHandle:
    """What GentorLoRA does: a new handle carrying one more LoRA (strength 0: the same handle, nothing read)."""
    if handle.backend not in SUPPORTED_BACKENDS:
        raise InputError(f"{display} model: LoRAs are not supported for this backend (got a {handle.backend} model, "
                         f"expected one of {', '.join(SUPPORTED_BACKENDS)}). Connect a Qwen-Image loader.")
    path = resolve_lora(display, lora_name)
    if strength == 0:
        return handle  # a no-op: no file read, the same cache entries and adapters as without the node
    keys = header_keys(path, display)
    detect_format(keys, display, path.name)  # foreign / unreadable layouts fail here, before any run
    return dataclasses.replace(handle, adapters=tuple(handle.adapters) + (LoraRef(lora_name, str(path), float(strength)),))


# ----------------------------------------------------------------------------- reading / formats
def header_keys(path: Path, display: str) -> list[str]:
    """The tensor names of a LoRA file, from its header only (a truncated or corrupt file fails here)."""
    try:
        header = safetensors_header(path, display)
    except ModelFolderError as exc:
        raise ModelFolderError(f"{display} lora_name: {path.name} is not a readable LoRA ({exc}). Re-download "
                               "the LoRA file.") from exc
    return [k for k in header if k != "__metadata__"]


def read_lora(path: Path, display: str) -> dict[str, torch.Tensor]:
    """All tensors of a LoRA file (header validated first)."""
    from safetensors import SafetensorError  # noqa: PLC0415
    from safetensors.torch import load_file  # noqa: PLC0415

    header_keys(path, display)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelFolderError(f"{display} lora_name: {path.name} could not be read ({exc}; expected a complete "
                               "safetensors LoRA). Re-download the LoRA file.") from exc


def detect_format(keys: list[str], display: str, file_name: str) -> str:
    """'diffusers' | 'comfyui' | 'kohya' from the key names; another architecture or no LoRA is an error."""
    lora_keys = [k for k in keys if LORA_KEY.search(k) or k.endswith(".alpha")]
    if not lora_keys:
        raise ModelFolderError(
            f"{display} lora_name: {file_name} holds no LoRA weights (got keys such as {keys[:LIST_LIMIT]}, expected "
            "lora_A/lora_B or lora_down/lora_up pairs). This is a full checkpoint or another kind of file: pick a LoRA.")
    family = foreign_family(lora_keys)
    if family is not None or not any(m in k for k in lora_keys for m in QWEN_MARKERS):
        what = f"this is {article(family)} {family} LoRA" if family else "an unknown architecture's LoRA"
        raise ModelFolderError(
            f"{display} lora_name: {file_name} is not a Qwen-Image LoRA: {what} (got keys such as {lora_keys[:3]}; "
            "expected Qwen-Image transformer_blocks keys such as transformer_blocks.0.attn.to_q). Use a LoRA trained "
            f"for Qwen-Image{f' (this one works with {family} models)' if family else ''}.")
    if any(k.startswith("lora_unet_") for k in lora_keys):
        return "kohya"
    if any(k.startswith("diffusion_model.") for k in lora_keys):
        return "comfyui"
    return "diffusers"


def foreign_family(keys: list[str]) -> str | None:
    """The architecture family of a LoRA that is not Qwen-Image's, from its keys (None: not recognised)."""
    flat = [k.lower().replace(".", "_") for k in keys]
    if any(UNET.search(k) for k in flat):
        if any(SDXL_ONLY.search(k) for k in flat):
            return "SDXL"
        return "SD 1.x" if any(SD1_ONLY.search(k) for k in flat) else "SD 1.x / SDXL (UNet)"
    for name, pattern in FOREIGN_FAMILIES:
        if any(pattern.search(k) for k in flat):
            return name
    return None


def article(family: str) -> str:
    return "an" if family.startswith("SD") else "a"  # "an SDXL", "a FLUX", "a Wan"


def convert(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any supported layout -> diffusers keys (``transformer.<module>.lora_A.weight``), alphas folded in."""
    from diffusers.loaders.lora_pipeline import QwenImageLoraLoaderMixin  # noqa: PLC0415

    # diffusers' conversion (run for files with alphas, PEFT names, ComfyUI or kohya prefixes) adds the
    # ``transformer.`` prefix itself: hand it the keys without one, so a diffusers file with alphas is not doubled.
    unprefixed = {k.removeprefix(f"{PREFIX}."): v for k, v in state_dict.items()}
    converted = QwenImageLoraLoaderMixin.lora_state_dict(unprefixed)
    # PEFT's own files spell the adapter name into the key (lora_A.default.weight); diffusers' conversion only
    # strips it together with alphas, so a plain PEFT file keeps it: remove it here.
    converted = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
                 for k, v in converted.items()}
    if not all(k.startswith(f"{PREFIX}.") for k in converted):
        converted = {(k if k.startswith(f"{PREFIX}.") else f"{PREFIX}.{k}"): v for k, v in converted.items()}
    return converted


def check_matches(converted: dict[str, torch.Tensor], module: torch.nn.Module, display: str, file_name: str) -> None:
    """Every LoRA key names a Linear of ``module`` with matching shapes; else an error listing a few."""
    modules = dict(module.named_modules())
    unmatched, wrong_shape = [], []
    for key, value in converted.items():
        name = key[len(PREFIX) + 1:]
        target_name = re.sub(r"\.lora_[AB]\.(weight|bias)$", "", name)
        target = modules.get(target_name)
        base = getattr(target, "base_layer", target)  # already wrapped by another adapter
        if not isinstance(base, torch.nn.Linear):
            unmatched.append(name)
            continue
        if name.endswith("lora_A.weight") and value.shape[1] != base.in_features:
            wrong_shape.append(f"{name} {tuple(value.shape)} vs in_features {base.in_features}")
        elif name.endswith("lora_B.weight") and value.shape[0] != base.out_features:
            wrong_shape.append(f"{name} {tuple(value.shape)} vs out_features {base.out_features}")
    if unmatched:
        raise ModelFolderError(
            f"{display} lora_name: {len(unmatched)} of {len(converted)} LoRA keys in {file_name} match no layer of "
            f"this model (got e.g. {unmatched[:LIST_LIMIT]}, expected layers of the Qwen-Image transformer such as "
            "transformer_blocks.0.attn.to_q). The LoRA is for another model or variant: pick a matching LoRA.")
    if wrong_shape:
        raise ModelFolderError(
            f"{display} lora_name: {file_name} was trained for another model size (got {wrong_shape[:LIST_LIMIT]}, "
            "expected the loaded transformer's layer sizes). Pick a LoRA made for this Qwen-Image variant.")


# ----------------------------------------------------------------------------- adapters for a run
def adapter_name(path: str) -> str:
    """A PEFT-safe adapter name (no dots) that is the same for the same file."""
    return ADAPTER_PREFIX + hashlib.sha1(path.encode()).hexdigest()[:ID_CHARS]


def _injector(path: Path, display: str, compute_dtype: torch.dtype):
    def load(module: torch.nn.Module, name: str) -> None:
        converted = convert(read_lora(path, display))
        check_matches(converted, module, display, path.name)
        peft_config = getattr(module, "peft_config", None)
        if peft_config and name in peft_config:
            # The file changed under the same name: its layers were deleted by the cache; drop the config too so
            # diffusers accepts the name again.
            del peft_config[name]
        with adding_named_adapter():
            module.load_lora_adapter(converted, adapter_name=name, prefix=PREFIX)
        keep_lora_in_compute_dtype(module, name, compute_dtype)
    return load


def keep_lora_in_compute_dtype(module: torch.nn.Module, name: str, dtype: torch.dtype) -> None:
    """PEFT gives new LoRA factors the dtype of the layer they wrap: FP8 for an FP8-stored layer. Keep them
    in the compute dtype instead, so the LoRA delta is computed (and stored) without FP8 rounding."""
    for param_name, param in module.named_parameters():
        if f".{name}." in param_name and ("lora_A" in param_name or "lora_B" in param_name) and param.dtype != dtype:
            param.data = param.data.to(dtype)


def adapters_for(handle: ModelHandle, display: str, compute_dtype: torch.dtype) -> list[Adapter]:
    """The handle's LoRAs as cache adapters; one file chained twice counts once with the strengths added."""
    merged: dict[str, tuple[LoraRef, float]] = {}
    for ref in getattr(handle, "adapters", ()):
        prev = merged.get(ref.path)
        merged[ref.path] = (ref, (prev[1] if prev else 0.0) + ref.strength)
    out = []
    for path, (ref, strength) in merged.items():
        if strength == 0:
            continue
        identity = file_identity(path, display, "LoRA") + (str(compute_dtype),)
        out.append(Adapter(adapter_name(path), identity, _injector(Path(path), display, compute_dtype), strength))
    return out


def lightning_notes(handle: ModelHandle, steps: int, cfg: float, schedule: str) -> list[str]:
    """A Lightning (step-distilled) LoRA run far from its published recipe is allowed; say what the recipe is."""
    names = [ref.name for ref in getattr(handle, "adapters", ()) if LIGHTNING_WORD in Path(ref.name).name.lower()]
    if not names:
        return []
    if steps <= LIGHTNING_MAX_STEPS and cfg <= LIGHTNING_CFG and schedule == "lightning":
        return []
    return [f"{names[0]} is a Lightning (step-distilled) LoRA: its published recipe is {LIGHTNING_STEPS} steps "
            f"(4 for the 4-step LoRA), cfg {LIGHTNING_CFG:g} (no true CFG) and the Lightning schedule (shift 3 "
            f"fixed; Gentor Qwen-Image Settings schedule = lightning); running {steps} steps, cfg {cfg:g}, schedule "
            f"{schedule} as asked"]


def describe(handle: ModelHandle) -> str:
    """'a.safetensors@1, b.safetensors@0.5' for the text output ('' without LoRAs)."""
    return ", ".join(f"{Path(r.name).name}@{r.strength:g}" for r in getattr(handle, "adapters", ()))


class BaseView:
    """A module's base weights without its LoRA layers (what the cache derives a narrower copy from).

    PEFT renames a wrapped layer's weights to ``<layer>.base_layer.weight`` and adds ``lora_A/B`` tensors; a
    narrower copy (e.g. FP8 from a cached fp32 copy that carries adapters) must be built from the base only —
    its adapters are injected into it separately, in its own precision.
    """

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module

    def state_dict(self, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        out = {}
        for key, value in self.module.state_dict(keep_vars=keep_vars).items():
            if ".lora_" in key or "lora_magnitude_vector" in key:
                continue
            out[key.replace(".base_layer.", ".")] = value
        return out


def base_view(module: Any) -> Any:
    """``module`` itself, or a BaseView when LoRA layers were injected into it."""
    if isinstance(module, torch.nn.Module) and getattr(module, "peft_config", None):
        return BaseView(module)
    return module
