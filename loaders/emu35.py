"""Emu3.5 / Emu3.5-Image folders -> cached LLM, IBQ vision tokenizer and text tokenizer.

Layouts (backend_specs.md §3.2): the model is an HF causal-LM folder (``config.json`` with
``model_type: Emu3``, safetensors, optionally sharded); the vision tokenizer a folder with
``config.yaml`` + ``model.ckpt`` (a torch state dict, loaded with ``weights_only=True`` only; a
``model.safetensors`` beside or instead of it is preferred). The hub repo also carries a transformers
remote-code form (``config.json`` with model_type ``Emu3p5VisionVQ``, flat ddconfig fields and
``codebook_size``, same state-dict keys): read when ``config.yaml`` is absent, its code is never run.
The text tokenizer's data files
(``emu3.tiktoken``, ``emu3_vision_tokens.txt``) sit in the model folder or in a separate folder.
Sizes, the codebook and the variant are read from the files, never from folder names.

Variant (Emu3.5-Image vs the general Emu3.5): the released ``config.json`` files do not tell them apart
(BAAI/Emu3.5 commit c48ad67 has ``image_area: 518400``; BAAI/Emu3.5-Image's config.json has the same
930-byte size, so almost certainly the same value; the official inference code never reads
``image_area`` from it: each task's Python config sets it). What differs in the released folders is the model card's ``pipeline_tag``
(``text-to-image`` on Emu3.5-Image, ``any-to-any`` on Emu3.5). Order: the loader's explicit ``variant``,
then the card, then a config carrying Emu3.5-Image's 1048576 area; otherwise Emu3.5-Image is assumed
(the official recommendation for T2I/X2I, the only tasks here) and the run's notes say so.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import glue
from ..errors import InputError, ModelFolderError
from ..modeling.emu35 import tokens as T
from ..modeling.emu35.decoder import build_decoder, qwen3_config
from ..modeling.emu35.ibq import IBQ, IBQConfig
from ..modeling.emu35.tokenizer import TIKTOKEN_FILE, VISION_TOKENS_FILE, Emu35Tokenizer, find_files
from .cache import ModelHandle, Session
from .files import list_model_folders, read_checkpoint, read_json, resolve_model_folder, tensor_shapes
from .identify import variant_of
from .memory import MemoryOptions, Precision
from .streaming import component_files, load_module

log = logging.getLogger(__name__)

BACKEND = "Emu3.5"
FOLDER_KEYS = ("emu35",)
MODEL_TYPES = ("Emu3", "emu3")
VQ_CONFIG = "config.yaml"
VQ_HF_CONFIG = "config.json"  # the remote-code form's config (flat fields)
VQ_HF_TYPE = "Emu3p5VisionVQ"
VQ_WEIGHTS = ("model.safetensors", "model.ckpt", "model.pt")
FROM_MODEL_FOLDER = "(model folder)"
PLACEMENTS = ("auto", "single device")
VQ_DEVICES = ("auto", "cpu")
VQ_TYPES = ("ibq", "dcae")
IMAGE_VARIANT = "emu3.5-image"
GENERAL_VARIANT = "emu3.5"
# Loader choices -> variant ("auto" detects from the files).
VARIANTS = ("auto", "Emu3.5-Image", "Emu3.5")
VARIANT_CHOICES = dict(zip(VARIANTS, (None, IMAGE_VARIANT, GENERAL_VARIANT)))
MODEL_CARD = "README.md"
MODEL_CARD_BYTES = 4096  # the YAML front matter sits at the top of the card
# The hub's pipeline_tag of each release's model card (BAAI/Emu3.5-Image discussion #2, BAAI/Emu3.5 commit f06c4cf).
CARD_PIPELINE_TAGS = {"text-to-image": IMAGE_VARIANT, "any-to-any": GENERAL_VARIANT}
# A config.json with Emu3.5-Image's own image area (not what the released files carry, see above).
IMAGE_VARIANT_AREA = T.IMAGE_AREA
ASSUMED = "assumed"
EMBED_KEY = "model.embed_tokens.weight"
HEAD_KEY = "lm_head.weight"


@dataclass(frozen=True)
class Emu35Info:
    variant: str  # "emu3.5-image" | "emu3.5"
    vocab: int
    hidden: int
    layers: int
    n_codes: int  # visual tokens the vocabulary holds
    config: dict
    variant_source: str = ASSUMED  # what decided the variant: "model card ...", "config.json ...", "loader input"


def looks_like_model(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return read_json(cfg, BACKEND, "config.json").get("model_type") in MODEL_TYPES
    except ModelFolderError:
        return False


def identify(path: Path) -> str | None:
    """The variant of an Emu3.5 model folder (for loaders/identify.py), or None when it is not one."""
    return variant_of(path, looks_like_model, lambda p: inspect_model(p).variant, "(incomplete Emu3.5 folder)")


def looks_like_vq(path: Path) -> bool:
    return vq_config_file(path) is not None and any((path / w).is_file() for w in VQ_WEIGHTS)


def vq_config_file(path: Path) -> Path | None:
    """config.yaml, else a remote-code config.json of the vision tokenizer; None when neither is there."""
    if (path / VQ_CONFIG).is_file():
        return path / VQ_CONFIG
    cfg = path / VQ_HF_CONFIG
    if cfg.is_file():
        try:
            data = read_json(cfg, BACKEND, VQ_HF_CONFIG)
            if isinstance(data, dict) and data.get("model_type") == VQ_HF_TYPE:
                return cfg
        except ModelFolderError:  # an unreadable config.json is not a vision tokenizer; listing goes on
            return None
    return None


def list_models() -> list[str]:
    return list_model_folders(FOLDER_KEYS, looks_like_model)


def list_vision_tokenizers() -> list[str]:
    return list_model_folders(FOLDER_KEYS, looks_like_vq)


def list_tokenizers() -> list[str]:
    return [FROM_MODEL_FOLDER] + list_model_folders(
        FOLDER_KEYS, lambda p: find_files([p]) is not None and not looks_like_model(p))


def inspect_model(path: Path) -> Emu35Info:
    """Validate an Emu3.5 model folder; detect sizes and the variant from config and weight headers."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        found = sorted(p.name for p in path.iterdir())[:12] if path.is_dir() else "no folder"
        raise ModelFolderError(f"{BACKEND} model_name: {path.name} is not an Emu3.5 model folder (got {found}, "
                               "expected config.json with model_type Emu3 and safetensors weights). Download "
                               "BAAI/Emu3.5-Image or BAAI/Emu3.5 into models/emu35/.")
    cfg = read_json(cfg_path, BACKEND, "config.json")
    if cfg.get("model_type") not in MODEL_TYPES:
        raise ModelFolderError(f"{BACKEND} model_name: {path.name} holds another model (got model_type "
                               f"{cfg.get('model_type')!r}, expected 'Emu3'). Pick an Emu3.5 or Emu3.5-Image folder.")
    qwen3_config(cfg)  # required fields present
    shapes = tensor_shapes(_headers(path))
    if EMBED_KEY not in shapes or HEAD_KEY not in shapes:
        raise ModelFolderError(f"{BACKEND} model weights: not an Emu3.5 decoder (got no {EMBED_KEY} / {HEAD_KEY}, "
                               "expected the Emu3ForCausalLM keys). Re-download the model.")
    vocab, hidden = shapes[EMBED_KEY]
    if vocab != cfg["vocab_size"] or hidden != cfg["hidden_size"]:
        raise ModelFolderError(f"{BACKEND} model weights: embedding shape does not match config.json (got "
                               f"{vocab}x{hidden}, expected {cfg['vocab_size']}x{cfg['hidden_size']}). Re-download.")
    if vocab <= T.BOV:
        raise ModelFolderError(f"{BACKEND} model weights: the vocabulary has no visual tokens (got {vocab}, "
                               f"expected more than {T.BOV}). This is not an Emu3.5 image model.")
    layers = len({k.split(".")[2] for k in shapes if k.startswith("model.layers.")})
    variant, source = detect_variant(path, cfg)
    return Emu35Info(variant, vocab, hidden, layers, vocab - T.BOV, cfg, source)


def card_pipeline_tag(path: Path) -> str | None:
    """The ``pipeline_tag`` of the folder's model card front matter (README.md), or None."""
    import yaml  # noqa: PLC0415 - PyYAML comes with accelerate/transformers

    card = path / MODEL_CARD
    if not card.is_file():
        return None
    with card.open("rb") as f:
        head = f.read(MODEL_CARD_BYTES).decode("utf-8", errors="replace")
    lines = head.splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    end = next((i for i, line in enumerate(lines[1:], 1) if line.strip() == "---"), None)
    if end is None:
        return None
    try:
        meta = yaml.safe_load("\n".join(lines[1:end]))
    except yaml.YAMLError:  # a card with broken metadata decides nothing; the other rules apply
        return None
    tag = meta.get("pipeline_tag") if isinstance(meta, dict) else None
    return str(tag) if tag else None


def detect_variant(path: Path, cfg: dict) -> tuple[str, str]:
    """(variant, what decided it) from the folder's files; see the module docstring for the evidence."""
    tag = card_pipeline_tag(path)
    if tag in CARD_PIPELINE_TAGS:
        return CARD_PIPELINE_TAGS[tag], f"model card pipeline_tag {tag}"
    if cfg.get("image_area") == IMAGE_VARIANT_AREA:
        return IMAGE_VARIANT, f"config.json image_area {IMAGE_VARIANT_AREA}"
    return IMAGE_VARIANT, ASSUMED


def resolve_variant(info: Emu35Info, choice: str) -> tuple[str, str]:
    """The loader's ``variant`` input over the detected one."""
    if choice not in VARIANT_CHOICES:
        raise InputError(f"{BACKEND} variant: unknown value (got {choice!r}, expected one of "
                         f"{', '.join(VARIANTS)}). Pick one of the listed values.")
    forced = VARIANT_CHOICES[choice]
    return (forced, "loader input") if forced else (info.variant, info.variant_source)


def _headers(path: Path) -> dict:
    from .files import weight_files  # noqa: PLC0415

    return weight_files(path, BACKEND, "model")


def read_vq_config(path: Path, n_codes: int) -> IBQConfig:
    """config.yaml (or the remote-code config.json) -> IBQConfig; the codebook must hold exactly the model's visual
    tokens."""
    import yaml  # noqa: PLC0415 - PyYAML comes with accelerate/transformers

    file = vq_config_file(path)
    if file is None:
        raise ModelFolderError(f"{BACKEND} vision_tokenizer: config missing (got "
                               f"{sorted(p.name for p in path.iterdir())} in {path}, expected {VQ_CONFIG} or a "
                               f"{VQ_HF_CONFIG} with model_type {VQ_HF_TYPE}). Re-download Emu3.5-VisionTokenizer.")
    try:
        if file.name == VQ_CONFIG:
            cfg = IBQConfig.from_yaml_dict(yaml.safe_load(file.read_text(encoding="utf-8")))
            expected = "ddconfig, n_embed, embed_dim"
        else:
            expected = "ch, ch_mult, num_res_blocks, resolution, z_channels, codebook_size, embed_dim"
            cfg = IBQConfig.from_hf_dict(read_json(file, BACKEND, VQ_HF_CONFIG))
    except (yaml.YAMLError, KeyError, TypeError, ValueError) as exc:
        raise ModelFolderError(f"{BACKEND} vision_tokenizer: {file.name} is not an IBQ config (missing or bad "
                               f"{exc}; expected {expected}). Re-download Emu3.5-VisionTokenizer.") from exc
    if cfg.n_embed != n_codes:
        raise ModelFolderError(f"{BACKEND} vision_tokenizer: codebook does not match the model's vocabulary (got "
                               f"n_embed {cfg.n_embed}, expected {n_codes} = vocab - {T.BOV}). Pick the vision "
                               "tokenizer released with this model (BAAI/Emu3.5-VisionTokenizer).")
    if cfg.downsample != T.DOWNSAMPLE or cfg.embed_dim != T.CODE_DIM:
        raise ModelFolderError(f"{BACKEND} vision_tokenizer: not the Emu3.5 IBQ layout (got {cfg.downsample}x "
                               f"downsampling, code dim {cfg.embed_dim}, expected {T.DOWNSAMPLE}x and {T.CODE_DIM}). "
                               "Re-download Emu3.5-VisionTokenizer.")
    return cfg


def vq_weights_file(path: Path) -> Path:
    for name in VQ_WEIGHTS:
        if (path / name).is_file():
            return path / name
    raise ModelFolderError(f"{BACKEND} vision_tokenizer: weights missing (got {sorted(p.name for p in path.iterdir())}"
                           f" in {path}, expected one of {', '.join(VQ_WEIGHTS)}). Re-download it.")


def conversion_command(path: Path) -> str:
    out = path.with_name("model.safetensors")
    return (f"python -c \"import torch; from safetensors.torch import save_file; c = torch.load('{path}', "
            f"map_location='cpu', weights_only=False); sd = c.get('state_dict', c); save_file({{k: v.contiguous() "
            f"for k, v in sd.items() if torch.is_tensor(v)}}, '{out}')\"")


def read_vq_state(path: Path) -> dict[str, torch.Tensor]:
    """A vision-tokenizer state dict: safetensors, or a pickle through ``weights_only=True`` only."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        return load_file(str(path))
    # weights_only only: a pickle that would run code is refused, naming its classes, never fully unpickled.
    ckpt = read_checkpoint(path, BACKEND, "vision_tokenizer",
                           f"If you trust the file, convert it once: {conversion_command(path)}")
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ModelFolderError(f"{BACKEND} vision_tokenizer: {path.name} is not a state dict (got "
                               f"{type(ckpt).__name__}, expected a dict of tensors). Re-download it.")
    return state


def tokenizer_folder(model_path: Path, tokenizer_name: str) -> Path:
    """Where the tokenizer data files are; the error lists every place looked at."""
    if tokenizer_name and tokenizer_name != FROM_MODEL_FOLDER:
        folders = [resolve_model_folder(BACKEND, "tokenizer", tokenizer_name, FOLDER_KEYS)]
    else:
        folders = [model_path, model_path / "tokenizer"]
    found = find_files(folders)
    if found is None:
        raise ModelFolderError(
            f"{BACKEND} tokenizer: data files missing (got no {TIKTOKEN_FILE} + {VISION_TOKENS_FILE} in "
            f"{', '.join(map(str, folders))}, expected both). Copy them from baaivision/Emu3.5 "
            "src/tokenizer_emu3_ibq into the model folder, or pick a tokenizer folder.")
    return found[0].parent


def vq_folder(name: str) -> Path:
    """The vision tokenizer folder; a missing one says where it was looked for."""
    roots = [r for key in FOLDER_KEYS for r in glue.model_roots(key)]
    if not name:
        raise ModelFolderError(
            f"{BACKEND} vision_tokenizer: none selected (got no folder, expected a folder with {VQ_CONFIG} + "
            f"model.ckpt (or {VQ_HF_CONFIG} + model.safetensors) under {', '.join(roots) or 'models/emu35/'}). "
            "Download BAAI/Emu3.5-VisionTokenizer there.")
    path = resolve_model_folder(BACKEND, "vision_tokenizer", name, FOLDER_KEYS)
    if not looks_like_vq(path):
        raise ModelFolderError(
            f"{BACKEND} vision_tokenizer: {path} is not a vision tokenizer folder (got "
            f"{sorted(p.name for p in path.iterdir())[:10]}, expected {VQ_CONFIG} + model.ckpt or {VQ_HF_CONFIG} "
            f"(model_type {VQ_HF_TYPE}) + model.safetensors). Pick the "
            "Emu3.5-VisionTokenizer folder.")
    return path


def load_handle(model_name: str, vision_tokenizer: str, tokenizer: str = FROM_MODEL_FOLDER,
                placement: str = "auto", device_budgets: str = "", vq_device: str = "auto", vq_type: str = "ibq",
                memory: MemoryOptions | None = None, variant: str = "auto") -> ModelHandle:
    """What GentorLoadEmu35 does: resolve, validate, detect; weights load at first use."""
    if vq_type != "ibq":
        raise InputError(f"{BACKEND} vq_type: {vq_type!r} is not supported (got {vq_type!r}, expected 'ibq'). "
                         "Only the IBQ vision tokenizer is released and implemented by the official code; "
                         "'dcae' raises NotImplementedError there too. Use 'ibq'.")
    if placement not in PLACEMENTS:
        raise InputError(f"{BACKEND} placement: unknown value (got {placement!r}, expected one of "
                         f"{', '.join(PLACEMENTS)}). Pick one of the listed values.")
    if vq_device not in VQ_DEVICES and not vq_device.startswith("cuda"):
        raise InputError(f"{BACKEND} vq_device: unknown device (got {vq_device!r}, expected auto, cpu or "
                         "cuda:N). Pick one of the listed values.")
    if device_budgets.strip():
        from ..modeling.emu35.placement import parse_budgets  # noqa: PLC0415

        try:
            parse_budgets(device_budgets)
        except ValueError as exc:
            raise InputError(f"{BACKEND} device_budgets: not a budget list (got {device_budgets!r}, expected "
                             "'cuda:0=70, cuda:1=75' in GB). Fix the text or leave it empty.") from exc
    path = resolve_model_folder(BACKEND, "model_name", model_name, FOLDER_KEYS)
    info = inspect_model(path)
    chosen, source = resolve_variant(info, variant)
    vq = vq_folder(vision_tokenizer)
    read_vq_config(vq, info.n_codes)
    tok = tokenizer_folder(path, tokenizer)
    return ModelHandle(
        "emu35", chosen, (("model", str(path)), ("vision_tokenizer", str(vq)), ("tokenizer", str(tok))),
        memory or MemoryOptions(),
        (("layers", str(info.layers)), ("hidden", str(info.hidden)), ("codes", str(info.n_codes)),
         ("placement", placement), ("device_budgets", device_budgets.strip()), ("vq_device", vq_device),
         ("variant_source", source)))


# ----------------------------------------------------------------------------- components through the cache
def load_llm(path: Path, precision: Precision | None, skip: tuple[str, ...], source: Any = None) -> torch.nn.Module:
    """Stream the decoder into its resting dtype (FP8 converted tensor by tensor) without a wider copy."""
    cfg = read_json(path / "config.json", BACKEND, "config.json")
    config = qwen3_config(cfg)
    files = () if source is not None else component_files(path, BACKEND, "model")
    return load_module(lambda: build_decoder(config), precision, skip, files, source, None, BACKEND, "model")


def load_ibq(path: Path, n_codes: int) -> IBQ:
    """The IBQ model in fp32 (it decides the final pixels; as the reference runs it)."""
    from accelerate import init_empty_weights  # noqa: PLC0415

    cfg = read_vq_config(path, n_codes)
    state = read_vq_state(vq_weights_file(path))
    with init_empty_weights():
        model = IBQ(cfg)
    want = set(model.state_dict())
    have = set(state)
    if want != have:
        missing, extra = sorted(want - have)[:4], sorted(have - want)[:4]
        raise ModelFolderError(f"{BACKEND} vision_tokenizer: weights do not match the config (got missing "
                               f"{missing}, unexpected {extra}, expected the IBQ keys of its config). Re-download.")
    model.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_components(handle: ModelHandle, precision: Precision, skip: tuple[str, ...],
                    session: Session) -> dict[str, Any]:
    """Fetch the LLM, the vision tokenizer and the text tokenizer through the shared cache."""
    model_path = Path(handle.path("model"))
    vq_path = Path(handle.path("vision_tokenizer"))
    tok_path = Path(handle.path("tokenizer"))
    n_codes = int(handle.info_dict["codes"])
    llm = session.get("emu35_llm", str(model_path), lambda prec, src: load_llm(model_path, prec, skip, src),
                      precision, user="emu35", display=BACKEND, skip=skip)
    ibq = session.get("ibq", str(vq_path), lambda _p, _s: load_ibq(vq_path, n_codes), None, user="emu35",
                      display=BACKEND)
    tok = session.get("emu35_tokenizer", str(tok_path),
                      lambda _p, _s: Emu35Tokenizer.from_files(tok_path / TIKTOKEN_FILE, tok_path / VISION_TOKENS_FILE),
                      None, user="emu35", display=BACKEND)
    if tok.value.n_codes < n_codes:
        raise ModelFolderError(f"{BACKEND} tokenizer: the vision-token list is shorter than the model's codebook (got "
                               f"{tok.value.n_codes} visual tokens, expected {n_codes}). Use the complete "
                               f"{VISION_TOKENS_FILE}.")
    return {"llm": llm, "ibq": ibq, "tokenizer": tok}
