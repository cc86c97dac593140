"""BAGEL-7B-MoT folders -> cached components (the MoT model, the FLUX autoencoder, the tokenizer).

Layout (backend_specs.md §1.2): ema.safetensors (every model weight, one file), ae.safetensors (FLUX
autoencoder, original key names, no config), llm_config.json, vit_config.json and the Qwen2 tokenizer
files. ``config.json`` / ``model.safetensors.index.json`` of the release are not used (as in the reference).
Everything is detected from the configs and the weight headers, never from names.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from typing import Any, Iterable

from ..errors import ModelFolderError
from .cache import ModelHandle, Session
from .files import list_model_folders, read_json, resolve_model_folder, safetensors_header
from .memory import MemoryOptions, Precision

BACKEND = "BAGEL"
BACKEND_ID = "bagel"
FOLDER_KEYS = ("bagel",)
EMA = "ema.safetensors"
AE = "ae.safetensors"
LLM_CONFIG = "llm_config.json"
VIT_CONFIG = "vit_config.json"
TOKENIZER_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
REQUIRED = (EMA, AE, LLM_CONFIG, VIT_CONFIG)
# Keys only a BAGEL MoT checkpoint has: the generation expert, the latent heads, the packed ViT.
TELLTALE_KEYS = ("language_model.model.layers.0.mlp_moe_gen.gate_proj.weight", "vae2llm.weight", "llm2vae.weight",
                 "vit_model.vision_model.embeddings.patch_embedding.weight", "latent_pos_embed.pos_embed")
PLAIN_QWEN2_KEYS = ("model.embed_tokens.weight", "model.layers.0.mlp.gate_proj.weight")
# Cache kinds (architectures, not backends).
KIND_MODEL = "bagel_mot"
KIND_AE = "flux_ae"
KIND_TOKENIZER = "qwen2_tokenizer"
BYTES_PER_PARAM_BF16 = 2
# Modules a BAGEL checkpoint may carry that the reference never builds (its load_state_dict(strict=False) skips
# them): SigLIP's attention-pooling head (BAGEL takes the ViT's token features, never a pooled vector).
UNUSED_PREFIXES = ("vit_model.vision_model.head.",)
SHOWN = 6  # tensor names quoted in a log line or an error

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BagelInfo:
    path: Path
    variant: str
    layers: int
    hidden: int
    vit_layers: int
    params: int  # parameters in ema.safetensors
    ae_ch: int
    skipped: tuple[str, ...] = ()  # tensors of ema.safetensors the model does not use (named in the log)


def _modeling():
    return import_module(f"{__package__.rsplit('.', 1)[0]}.modeling.bagel")


def looks_like_bagel(path: Path) -> bool:
    """Cheap dropdown filter: the two BAGEL config files and the EMA weights."""
    return all((path / n).is_file() for n in (EMA, LLM_CONFIG, VIT_CONFIG))


def list_models() -> list[str]:
    return list_model_folders(FOLDER_KEYS, looks_like_bagel)


def identify(path: Path) -> str | None:
    """The variant of a BAGEL folder (for loaders/identify.py), or None when it is not one."""
    if not (path.is_dir() and (path / LLM_CONFIG).is_file() and (path / EMA).is_file()):
        return None
    llm = json.loads((path / LLM_CONFIG).read_text(encoding="utf-8"))
    hidden, layers = llm.get("hidden_size"), llm.get("num_hidden_layers")
    return "BAGEL-7B-MoT" if (hidden, layers) == (3584, 28) else f"BAGEL ({layers} layers x {hidden})"


def _found(path: Path) -> str:
    return ", ".join(sorted(p.name for p in path.iterdir())[:10]) if path.is_dir() else "no folder"


def _check_not_plain_qwen2(path: Path) -> None:
    """A Qwen2 / Qwen2.5 LLM folder (config.json + model*.safetensors) is a common wrong pick: say so."""
    cfg = path / "config.json"
    if (path / EMA).is_file() or not cfg.is_file():
        return
    model_type = read_json(cfg, BACKEND, "config.json").get("model_type", "?")
    raise ModelFolderError(
        f"{BACKEND} model_name: {path.name} is a plain {model_type} model, not BAGEL (got config.json with "
        f"model_type={model_type!r} and no {EMA}, expected {', '.join(REQUIRED)} + tokenizer files). "
        "Download ByteDance-Seed/BAGEL-7B-MoT into models/bagel/.")


def inspect_folder(path: Path) -> BagelInfo:
    """Validate a BAGEL folder and read its sizes; errors name the missing or wrong piece."""
    _check_not_plain_qwen2(path)
    missing = [n for n in REQUIRED if not (path / n).is_file()]
    if missing:
        raise ModelFolderError(
            f"{BACKEND} model_name: {', '.join(missing)} missing in {path.name} (got {_found(path)}, expected "
            f"{', '.join(REQUIRED)} + tokenizer files). Download the complete BAGEL-7B-MoT folder.")
    if not any(all((path / n).is_file() for n in names) for names in TOKENIZER_SETS):
        raise ModelFolderError(
            f"{BACKEND} model_name: tokenizer files missing in {path.name} (got {_found(path)}, expected "
            "tokenizer.json or vocab.json + merges.txt). Download the tokenizer files of BAGEL-7B-MoT.")
    mb = _modeling()
    try:
        llm = mb.LLMConfig.from_dict(read_json(path / LLM_CONFIG, BACKEND, LLM_CONFIG))
        vit = mb.ViTConfig.from_dict(read_json(path / VIT_CONFIG, BACKEND, VIT_CONFIG))
    except mb.ConfigError as exc:
        raise ModelFolderError(f"{BACKEND} model_name: unusable config ({exc}; expected the BAGEL-7B-MoT "
                               "llm_config.json / vit_config.json). Re-download the config files.") from exc
    shapes = {k: tuple(v["shape"]) for k, v in safetensors_header(path / EMA, BACKEND).items() if k != "__metadata__"}
    absent = [k for k in TELLTALE_KEYS if k not in shapes]
    if absent:
        plain = all(k in shapes for k in PLAIN_QWEN2_KEYS)
        raise ModelFolderError(
            f"{BACKEND} {EMA}: not a BAGEL Mixture-of-Transformers checkpoint (got "
            f"{'plain Qwen2 weights' if plain else 'keys without ' + absent[0]}, expected {', '.join(TELLTALE_KEYS[:3])}"
            "…). Use the ema.safetensors of ByteDance-Seed/BAGEL-7B-MoT.")
    _check_sizes(shapes, llm, vit)
    try:
        ae_shapes = {k: tuple(v["shape"]) for k, v in safetensors_header(path / AE, BACKEND).items()
                     if k != "__metadata__"}
        ae = mb.AEConfig.from_shapes(ae_shapes)
    except mb.ConfigError as exc:
        raise ModelFolderError(f"{BACKEND} {AE}: not a FLUX autoencoder ({exc}; expected original FLUX key names "
                               "such as encoder.conv_in.weight). Use the ae.safetensors of BAGEL-7B-MoT.") from exc
    if ae.z_channels * mb.config.LATENT_PATCH_SIZE**2 != shapes["vae2llm.weight"][1]:
        raise ModelFolderError(
            f"{BACKEND} {AE}: latent channels do not fit the model (got {ae.z_channels} channels, expected "
            f"{shapes['vae2llm.weight'][1] // 4} for vae2llm). Use the ae.safetensors shipped with this model.")
    skipped, needed, parts = sort_extra_tensors(shapes, mb.BagelConfig(llm, vit, ae))
    if needed:
        raise ModelFolderError(
            f"{BACKEND} {EMA}: {len(needed)} tensors belong to layers this model runs but have no place in it (got "
            f"{', '.join(needed[:SHOWN])}, expected only the BAGEL-7B-MoT parameters of those layers). Skipping them "
            "would change the results: use the ema.safetensors of ByteDance-Seed/BAGEL-7B-MoT, or a model whose "
            "layers this loader implements.")
    if skipped:
        log.warning("BAGEL %s/%s: %d tensors are not used by the model and are skipped, as the reference loader "
                    "skips them: %s", path.name, EMA, len(skipped),
                    ", ".join(f"{part} ({n} tensor{'s' if n > 1 else ''})" for part, n in parts.items()))
    params = sum(math.prod(s) for k, s in shapes.items() if k not in set(skipped))
    variant = "bagel-7b-mot" if (llm.hidden_size, llm.num_layers) == (3584, 28) else \
        f"bagel-mot-{llm.num_layers}x{llm.hidden_size}"
    return BagelInfo(path, variant, llm.num_layers, llm.hidden_size, vit.num_layers, params, ae.ch, tuple(skipped))


def sort_extra_tensors(keys: Iterable[str], cfg: Any) -> tuple[list[str], list[str], dict[str, int]]:
    """(skipped, needed, skipped parts): the checkpoint tensors the model has no slot for, split by whether a
    computation the model runs would use them; the parts are the skipped modules with their tensor counts.

    Skipped, as the reference's ``load_state_dict(strict=False)`` skips them: tensors of parts the model does not
    build (a top-level module it lacks, ``UNUSED_PREFIXES``), layers beyond the configured depth (the ViT's last
    layer, which the reference drops), and buffers it computes itself (rotary ``inv_freq``). Needed: a parameter
    of a layer the model runs, or a sub-layer inside one (e.g. an ``o_proj.bias`` or a router): refused.
    """
    import torch  # noqa: PLC0415
    from torch import nn  # noqa: PLC0415

    with torch.device("meta"):
        model = _modeling().Bagel(cfg)
    slots = set(model.state_dict())
    modules = dict(model.named_modules())
    skipped: list[str] = []
    needed: list[str] = []
    parts_count: dict[str, int] = {}
    for key in sorted(keys):
        if key in slots:
            continue
        parts = key.split(".")
        depth = len(parts) - 1
        while depth > 0 and ".".join(parts[:depth]) not in modules:
            depth -= 1
        owner = modules[".".join(parts[:depth])]
        computed_buffer = depth == len(parts) - 1 and parts[-1] in owner._buffers
        beyond_depth = isinstance(owner, nn.ModuleList) and parts[depth].isdigit()
        if depth == 0 or key.startswith(UNUSED_PREFIXES) or computed_buffer or beyond_depth:
            skipped.append(key)
            part = key if computed_buffer else ".".join(parts[:depth + 1])
            parts_count[part] = parts_count.get(part, 0) + 1
        else:
            needed.append(key)
    return skipped, needed, parts_count


def _check_sizes(shapes: dict[str, tuple], llm: Any, vit: Any) -> None:
    """The configs must describe the weights (a swapped config would fail deep inside loading)."""
    embed = shapes.get("language_model.model.embed_tokens.weight", (0, 0))
    layers = 1 + max(int(k.split(".")[3]) for k in shapes if k.startswith("language_model.model.layers."))
    vit_layers = len({k.split(".")[4] for k in shapes if k.startswith("vit_model.vision_model.encoder.layers.")})
    patch = shapes["vit_model.vision_model.embeddings.patch_embedding.weight"]
    checks = (
        (LLM_CONFIG, "hidden_size / vocab_size", (llm.vocab_size, llm.hidden_size), tuple(embed)),
        (LLM_CONFIG, "num_hidden_layers", llm.num_layers, layers),
        # the reference builds num_hidden_layers - 1 layers: a file with all of them is fine (the last is skipped)
        (VIT_CONFIG, "num_hidden_layers - 1", vit.num_layers, vit_layers - (vit_layers == vit.num_layers + 1)),
        (VIT_CONFIG, "patch embedding (Linear form)", (vit.hidden_size, vit.num_channels * vit.patch_size**2),
         tuple(patch)),
    )
    for file, what, cfg_value, weight_value in checks:
        if cfg_value != weight_value:
            raise ModelFolderError(
                f"{BACKEND} {file}: {what} does not match {EMA} (got {cfg_value} in the config, expected "
                f"{weight_value} from the weights). Use the config files shipped with these weights.")


def load_handle(model_name: str, memory: MemoryOptions | None) -> ModelHandle:
    """What GentorLoadBagel does: resolve, validate, detect; weights load lazily at first use."""
    path = resolve_model_folder(BACKEND, "model_name", model_name, FOLDER_KEYS)
    info = inspect_folder(path)
    return ModelHandle(BACKEND_ID, info.variant, (("model", str(path)),), memory or MemoryOptions(),
                       (("layers", str(info.layers)), ("hidden", str(info.hidden)),
                        ("vit_layers", str(info.vit_layers)), ("params_b", f"{info.params / 1e9:.2f}"),
                        ("skipped_tensors", str(len(info.skipped)))))


def parameter_count(path: Path) -> int:
    """Parameters in ema.safetensors (from its header; nothing is read)."""
    header = safetensors_header(path / EMA, BACKEND)
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")


def build_config(path: Path) -> Any:
    """The BagelConfig of a validated folder (configs + autoencoder header)."""
    mb = _modeling()
    llm = mb.LLMConfig.from_dict(read_json(path / LLM_CONFIG, BACKEND, LLM_CONFIG))
    vit = mb.ViTConfig.from_dict(read_json(path / VIT_CONFIG, BACKEND, VIT_CONFIG))
    ae_shapes = {k: tuple(v["shape"]) for k, v in safetensors_header(path / AE, BACKEND).items() if k != "__metadata__"}
    return mb.BagelConfig(llm, vit, mb.AEConfig.from_shapes(ae_shapes))


def load_components(path: Path, cfg: Any, precision: Precision, skip: tuple[str, ...],
                    session: Session) -> dict[str, Any]:
    """Fetch the MoT model, the autoencoder and the tokenizer through the shared cache (cache kinds name
    the architecture, so another backend with the same files shares them)."""
    from .streaming import load_module  # noqa: PLC0415

    mb = _modeling()
    full = Precision(precision.base, precision.base)  # the autoencoder stays out of FP8 (fp8_exclude)

    header = safetensors_header(path / EMA, BACKEND)
    unused = set(sort_extra_tensors((k for k in header if k != "__metadata__"), cfg)[0])  # named by inspect_folder

    def load_model(prec: Precision | None, source: Any) -> Any:
        return load_module(lambda: mb.Bagel(cfg), prec, skip, files=() if source is not None else (path / EMA,),
                           source=source, rename=lambda k: None if k in unused else k, display=BACKEND,
                           component="model")

    def load_ae(prec: Precision | None, source: Any) -> Any:
        return load_module(lambda: mb.AutoEncoder(cfg.ae), prec, (), files=() if source is not None else (path / AE,),
                           source=source, display=BACKEND, component="ae")

    def load_tokenizer(_prec: Any, _source: Any) -> Any:
        from transformers import AutoTokenizer  # noqa: PLC0415

        tok = AutoTokenizer.from_pretrained(str(path))
        try:
            mb.token_ids(tok)
        except ValueError as exc:
            raise ModelFolderError(f"{BACKEND} tokenizer: {exc} (got {type(tok).__name__} from {path.name}, expected "
                                   "the Qwen2 tokenizer with <|im_start|>, <|im_end|>, <|vision_start|>, "
                                   "<|vision_end|>). Use the tokenizer files of BAGEL-7B-MoT.") from exc
        return tok

    # The model entry's identity is the folder: its configs shape the module as much as ema.safetensors.
    model = session.get(KIND_MODEL, str(path), load_model, precision, user=BACKEND_ID, display=BACKEND, skip=skip)
    ae = session.get(KIND_AE, str(path / AE), load_ae, full, user=BACKEND_ID, display=BACKEND)
    tok = session.get(KIND_TOKENIZER, str(path), load_tokenizer, None, user=BACKEND_ID, display=BACKEND)
    return {"model": model, "ae": ae, "tokenizer": tok}
