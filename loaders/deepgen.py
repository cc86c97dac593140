"""DeepGen 1.0 files -> cached components (bridge, DiT, VAE, Qwen2.5-VL, tokenizer) through the shared cache.

Two distribution forms (backend_specs.md §2.2), picked in ``GentorLoadDeepGen``:

- ``checkpoint``: the official ``model.pt`` (or a safetensors form of it) in ``models/deepgen/`` plus a
  diffusion folder (``transformer/``, ``vae/``, ``scheduler/`` of UniPic2-SD3.5M-Kontext-2B or
  SD3.5-Medium) in ``models/deepgen/``; the checkpoint's ``transformer.*`` keys replace the folder's DiT.
- ``diffusers``: the single ``DeepGen-1.0-diffusers`` folder (its safetensors only, never its
  ``deepgen_pipeline.py``): ``transformer/``, ``vae/``, ``scheduler/``, ``connector/model.safetensors`` (the
  bridge) and ``vlm/`` (DeepGen's Qwen2.5-VL-3B with its LoRA merged in, offered as ``<folder>/vlm``).

plus the VLM: a Qwen2.5-VL-3B-Instruct folder in ``models/vlm/`` (for ``model.pt``, whose LoRA, when saved,
is applied as an adapter) or the diffusers folder's own ``vlm/`` -- loaded exactly as the prompt enhancer
loads a folder (kind ``qwen2_5_vl``), so the same files are one copy. Sizes are read from tensor shapes,
never from names; a mismatch between the parts is an error naming what was found and what is needed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .. import glue, registry
from ..errors import InputError, ModelFolderError
from ..modeling.deepgen import checkpoint as ckpt
from ..modeling.deepgen.bridge import (NUM_STACKED_LAYERS, QUERIES_KEY, BridgeConfig, ConnectorHeadsUnknown,
                                       DeepGenBridge, selected_layers)
from . import vlm as vlm_loader
from .adapters import has_lora_layers
from .cache import ModelHandle, Session
from .files import list_model_folders, read_json, resolve_model_folder, safe_name_parts
from .memory import MemoryOptions, Plan, Precision

log = logging.getLogger(__name__)

BACKEND = "deepgen"
DISPLAY = "DeepGen"
FOLDER_KEYS = ("deepgen",)
CHECKPOINT_INPUT, DIFFUSION_INPUT, VLM_INPUT = "checkpoint", "diffusion", "vlm"
SAME_FOLDER = "(checkpoint folder)"  # diffusion dropdown: the folder the checkpoint sits in / the diffusers folder
DIFFUSION_PARTS = ("transformer", "vae", "scheduler")
DIT_CLASS = "SD3Transformer2DModel"
# Tensors every SD3-class DiT has (diffusers names), read from the weights: the transformer is accepted by these,
# whatever class name its config gives (UniPic2-SD3.5M-Kontext-2B may name SD3Transformer2DKontextModel, the
# same parameters as SD3Transformer2DModel).
DIT_TENSORS = ("pos_embed.proj.weight", "context_embedder.weight", "time_text_embed.text_embedder.linear_1.weight",
               "transformer_blocks.0.attn.add_q_proj.weight", "norm_out.linear.weight", "proj_out.weight")
DIT_CONFIG_KEYS = ("num_layers", "num_attention_heads", "attention_head_dim", "joint_attention_dim",
                   "pooled_projection_dim", "in_channels", "patch_size")
VLM_TYPE = "qwen2_5_vl"
# Official SFT LoRA: r 64, alpha 128, dropout 0.05 (training only), every Linear/Embedding of the VLM
# (deepgenteam/deepgen configs/finetune/deepgen_joint_sft_scb.py; the model class's defaults are the same).
# alpha is not stored in the weights: it is this constant, so scale = alpha / r = 2 at the released rank.
LORA_ALPHA = 128
OFFICIAL_LORA_RANK = 64
OWN_VLM = "vlm"  # the diffusers form's VLM sub-folder
MAX_LISTED = 10  # file names shown in a refusal
# DiT tensors whose shapes tie it to the bridge: context_embedder [caption, joint], text embedder [inner, pooled]
DIT_JOINT_KEY = "context_embedder.weight"
DIT_POOLED_KEY = "time_text_embed.text_embedder.linear_1.weight"
KINDS = {"bridge": "deepgen_bridge", "transformer": "sd3_transformer", "vae": "autoencoder_kl"}


@dataclass(frozen=True)
class CheckpointInfo:
    form: str  # "checkpoint" | "diffusers"
    path: Path  # the checkpoint file, or the diffusers folder
    bridge_file: Path  # file holding the bridge tensors
    bridge: BridgeConfig
    dit_in_checkpoint: bool  # the checkpoint carries the trained DiT (transformer.*)
    lora_rank: int
    shapes: dict[str, tuple[int, ...]]
    unused: int = 0  # tensors that belong to none of bridge / DiT / LoRA (reported, not loaded)
    heads_source: str = ""  # where the connector's head count came from


# ----------------------------------------------------------------------------- listing / resolving
def _roots() -> list[Path]:
    return [Path(r) for key in FOLDER_KEYS for r in glue.model_roots(key)]


def _is_checkpoint_file(path: Path) -> bool:
    if path.suffix == ckpt.SAFETENSORS_SUFFIX:
        try:
            return QUERIES_KEY in ckpt.safetensors_shapes(path)
        except (OSError, ValueError):
            return False
    return path.suffix in ckpt.PICKLE_SUFFIXES


def _is_diffusers_form(folder: Path) -> bool:
    return all((folder / p).is_dir() for p in DIFFUSION_PARTS) and bool(ckpt.bridge_files(folder))


def _has_own_vlm(folder: Path) -> bool:
    return _is_diffusers_form(folder) and vlm_loader.looks_like_vlm(folder / OWN_VLM)


def _is_diffusion_folder(folder: Path) -> bool:
    return all((folder / p).is_dir() for p in DIFFUSION_PARTS) and (folder / "transformer" / "config.json").is_file()


def list_checkpoints() -> list[str]:
    """Checkpoint files (``*.pt`` / ``*.safetensors`` with the bridge) and diffusers-form folders."""
    names: dict[str, None] = {}
    for base in _roots():
        if not base.is_dir():
            continue
        for cand in sorted(list(base.glob("*")) + list(base.glob("*/*"))):
            if cand.is_file() and _is_checkpoint_file(cand):
                names.setdefault(cand.relative_to(base).as_posix())
    names.update(dict.fromkeys(list_model_folders(FOLDER_KEYS, _is_diffusers_form)))
    return sorted(names)


def list_diffusion_folders() -> list[str]:
    return [SAME_FOLDER] + list_model_folders(FOLDER_KEYS, _is_diffusion_folder)


def list_vlms() -> list[str]:
    """Qwen-VL folders of models/vlm/ (a Qwen-Image pipeline's text encoder is a 7B: not offered), then the
    diffusers folders' own VLMs as ``<folder>/vlm``."""
    own = [f"{n}/{OWN_VLM}" for n in list_model_folders(FOLDER_KEYS, _has_own_vlm)]
    shared = [n for n in vlm_loader.list_models() if not n.endswith("/" + vlm_loader.TEXT_ENCODER)]
    return list(dict.fromkeys(shared + own))  # the enhancer's list already names these folders' vlm/


def resolve_vlm(name: str) -> tuple[Path, bool]:
    """A VLM dropdown value -> (folder, whether it is a DeepGen diffusers folder's own ``vlm/``)."""
    if isinstance(name, str) and name.endswith("/" + OWN_VLM):
        try:
            parent = resolve_model_folder(DISPLAY, VLM_INPUT, name[: -len(OWN_VLM) - 1], FOLDER_KEYS)
        except InputError:
            parent = None  # not a DeepGen folder: a models/vlm/ sub-folder that happens to be called vlm
        if parent is not None and _is_diffusers_form(parent):
            return parent / OWN_VLM, True
    return vlm_loader.resolve(name), False


def _listing(folder: Path) -> list[str]:
    """What a folder holds, for a refusal (hidden files aside)."""
    return sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))[:MAX_LISTED]


def own_vlm_tokenizer(folder: Path) -> Path:
    """Where the diffusers form's tokenizer is: in ``vlm/`` or in the folder's top-level ``tokenizer/`` (the
    published DeepGen-1.0-diffusers has ``tokenizer/``). DeepGen needs only the tokenizer: its ViT input is
    preprocessed by its own code, so image-processor files are not required."""
    if not folder.is_dir():
        raise _refuse(VLM_INPUT, f"{folder.parent.name} has no {OWN_VLM}/ folder",
                      f"{_listing(folder.parent)} in {folder.parent.name}/",
                      f"{folder.parent.name}/{OWN_VLM}/ holding DeepGen's Qwen2.5-VL (the diffusers release has it)",
                      "Pick Qwen2.5-VL-3B-Instruct from models/vlm/ as the vlm, or download the release's vlm/ "
                      f"folder into {folder.parent}")
    for cand in (folder, folder.parent / "tokenizer"):
        if any((cand / f).is_file() for f in vlm_loader.TOKENIZER_FILES):
            return cand
    raise _refuse(VLM_INPUT, f"{folder.parent.name} has no tokenizer for its {OWN_VLM}/",
                  f"no tokenizer.json or vocab.json in {OWN_VLM}/ ({_listing(folder)}) or tokenizer/",
                  "the Qwen2.5-VL tokenizer files in tokenizer/ (as published) or in vlm/",
                  "Download the tokenizer/ folder of deepgenteam/DeepGen-1.0-diffusers (vocab.json, merges.txt, "
                  f"tokenizer_config.json) into {folder.parent / 'tokenizer'}")


def resolve_checkpoint(name: str) -> Path:
    """A dropdown value -> a checkpoint file or diffusers folder inside models/deepgen/ (confined)."""
    parts = safe_name_parts(name) if isinstance(name, str) and name else None
    if parts is not None:
        for root in _roots():
            cand = root.resolve().joinpath(*parts)
            if cand.is_file():
                return cand.resolve()
    return resolve_model_folder(DISPLAY, CHECKPOINT_INPUT, name, FOLDER_KEYS)


# ----------------------------------------------------------------------------- inspection
def _refuse(what: str, problem: str, got: object, expected: object, todo: str) -> ModelFolderError:
    return ModelFolderError(f"{DISPLAY} {what}: {problem} (got {got}, expected {expected}). {todo}.")


def inspect_checkpoint(path: Path) -> CheckpointInfo:
    """Detect the form and sizes from the weights; a checkpoint of another model is refused."""
    if path.is_dir():
        missing = [p for p in DIFFUSION_PARTS if not (path / p).is_dir()]
        files = ckpt.bridge_files(path)
        if missing or not files:
            got = f"no {', '.join(missing)}/" if missing else \
                f"no {ckpt.CONNECTOR_FOLDER}/*.safetensors holding meta_queries / projector_1"
            raise _refuse(CHECKPOINT_INPUT, f"{path.name} is not a DeepGen diffusers folder", got,
                          f"transformer/, vae/, scheduler/ and {ckpt.CONNECTOR_FOLDER}/{ckpt.CONNECTOR_FILE}",
                          "Pick the DeepGen-1.0-diffusers folder or a DeepGen model.pt")
        shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            shapes.update(ckpt.safetensors_shapes(f))
        form, bridge_file, dit = "diffusers", files[0], False  # its DiT is transformer/, read by the folder path
    else:
        try:
            shapes = ckpt.read_shapes(path)
        except ckpt.ConversionRefused as exc:
            if not exc.command:
                raise _refuse(CHECKPOINT_INPUT, f"{path.name} could not be read as a state dict", exc,
                              "a torch.save dict of tensors or safetensors",
                              "Pick DeepGen's model.pt or its safetensors conversion") from exc
            held = ", ".join(exc.found) or "objects other than tensors"
            raise ModelFolderError(
                f"{DISPLAY} {CHECKPOINT_INPUT}: {path.name} cannot be loaded safely (got a pickle holding {held}, "
                f"expected only tensors for torch.load(weights_only=True)). If you trust the file, convert it once, "
                f"then pick {path.stem}.safetensors: {exc.command}") from exc
        except (OSError, RuntimeError, ValueError) as exc:
            raise _refuse(CHECKPOINT_INPUT, f"{path.name} could not be read", exc,
                          "a torch or safetensors checkpoint", "Re-download the checkpoint") from exc
        form, bridge_file = "checkpoint", path
        dit = any(k.startswith(ckpt.TRANSFORMER_PREFIX) for k in shapes)
    connector = _connector_config(path)
    try:
        bridge = ckpt.bridge_config(shapes, connector)
    except ConnectorHeadsUnknown as exc:
        raise ModelFolderError(
            f"{DISPLAY} {CHECKPOINT_INPUT}: {path.name}: {exc}. Add {ckpt.connector_config_file(path)} with the "
            f"connector's num_attention_heads (the config it was trained with)") from exc
    except KeyError as exc:
        prefixes = sorted({k.split(".")[0] for k in shapes})[:6]
        raise _refuse(CHECKPOINT_INPUT, f"{path.name} is not a DeepGen checkpoint", f"tensors under {prefixes}",
                      "meta_queries, projector_1..3 and connector.layers.*",
                      "Pick DeepGen's model.pt (deepgenteam/DeepGen-1.0, -SFT, -Pretrain) or its diffusers folder"
                      ) from exc
    if bridge.num_stacked != NUM_STACKED_LAYERS:
        raise _refuse(CHECKPOINT_INPUT, "projector_1 does not take six stacked VLM layers",
                      f"{bridge.num_stacked} x {bridge.llm_hidden}", f"{NUM_STACKED_LAYERS} x {bridge.llm_hidden}",
                      "This checkpoint is of another DeepGen variant: use a DeepGen 1.0 checkpoint")
    unknown = ckpt.split(dict.fromkeys(shapes)).unknown  # split only looks at the keys
    if unknown:
        # Not used by inference (the official state_dict() keeps only these parts); said, not silently dropped.
        log.warning("DeepGen checkpoint %s: %d tensors are not used (e.g. %s)", path.name, len(unknown),
                    ", ".join(sorted(unknown)[:4]))
    heads_source = "connector config" if connector and connector.get("num_attention_heads") is not None else \
        "the official DeepGen 1.0 config"
    return CheckpointInfo(form, path, bridge_file, bridge, dit, ckpt.lora_rank(shapes), shapes, len(unknown),
                          heads_source)


def _connector_config(path: Path) -> dict | None:
    """The connector config beside a checkpoint / in a diffusers folder (``connector/config.json``), if any."""
    file = ckpt.connector_config_file(path)
    if not file.is_file():
        return None
    config = read_json(file, DISPLAY, "connector config")
    return config.get("connector", config) if isinstance(config.get("connector"), dict) else config


def inspect_diffusion(folder: Path, info: CheckpointInfo) -> dict:
    """Validate transformer/ vae/ scheduler/ and that the DiT fits the bridge; returns the DiT config."""
    for part in DIFFUSION_PARTS:
        if not (folder / part).is_dir():
            raise _refuse(DIFFUSION_INPUT, f"sub-folder {part}/ missing in {folder.name}",
                          sorted(p.name for p in folder.iterdir() if p.is_dir()), "transformer/, vae/, scheduler/",
                          "Download the complete UniPic2-SD3.5M-Kontext-2B (or SD3.5-Medium) folder")
    config = read_json(folder / "transformer" / "config.json", DISPLAY, "transformer config")
    _check_dit(folder, config, info)
    read_json(folder / "vae" / "config.json", DISPLAY, "vae config")
    read_json(folder / "scheduler" / "scheduler_config.json", DISPLAY, "scheduler config")
    joint, pooled = int(config.get("joint_attention_dim", 0)), int(config.get("pooled_projection_dim", 0))
    if (joint, pooled) != (info.bridge.joint_dim, info.bridge.pooled_dim):
        raise _refuse(DIFFUSION_INPUT, "the DiT does not fit the checkpoint's projectors",
                      f"joint_attention_dim {joint}, pooled_projection_dim {pooled}",
                      f"{info.bridge.joint_dim} and {info.bridge.pooled_dim}",
                      "Use the diffusion folder DeepGen was trained with")
    if info.dit_in_checkpoint:
        inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
        got = info.shapes.get(ckpt.TRANSFORMER_PREFIX + DIT_POOLED_KEY)
        blocks = ckpt.TRANSFORMER_PREFIX + "transformer_blocks."
        layers = len({k.split(".")[2] for k in info.shapes if k.startswith(blocks)})
        if got is None or tuple(got) != (inner, pooled) or layers != int(config["num_layers"]):
            raise _refuse(DIFFUSION_INPUT, "the checkpoint's DiT and the folder's transformer config differ",
                          f"{layers} blocks, text embedder {got}",
                          f"{config['num_layers']} blocks, ({inner}, {pooled})",
                          "Use the diffusion folder that belongs to this checkpoint")
    return config


def _dit_shapes(folder: Path, info: CheckpointInfo) -> tuple[dict[str, tuple[int, ...]], str]:
    """Shapes of the DiT weights that will be loaded: the checkpoint's ``transformer.*`` or the folder's files."""
    if info.dit_in_checkpoint:
        n = len(ckpt.TRANSFORMER_PREFIX)
        return {k[n:]: v for k, v in info.shapes.items() if k.startswith(ckpt.TRANSFORMER_PREFIX)}, info.path.name
    from .streaming import component_files  # noqa: PLC0415

    shapes: dict[str, tuple[int, ...]] = {}
    for file in component_files(folder / "transformer", DISPLAY, "transformer"):
        shapes.update(ckpt.safetensors_shapes(Path(file)))
    return shapes, f"{folder.name}/transformer"


def _check_dit(folder: Path, config: dict, info: CheckpointInfo) -> None:
    """The transformer is an SD3-class DiT by its tensors and its config's SD3 parameters, not by class name."""
    cls = config.get("_class_name")
    missing_cfg = [k for k in DIT_CONFIG_KEYS if k not in config]
    if missing_cfg:
        raise _refuse(DIFFUSION_INPUT, f"the transformer config is not an SD3 DiT's ({cls})",
                      f"no {', '.join(missing_cfg)}", "the SD3Transformer2DModel parameters",
                      "Pick an SD3.5-Medium-class diffusion folder (UniPic2-SD3.5M-Kontext-2B)")
    shapes, where = _dit_shapes(folder, info)
    absent = [k for k in DIT_TENSORS if k not in shapes]
    if absent:
        found = sorted({k.split(".")[0] for k in shapes})[:6]
        raise _refuse(DIFFUSION_INPUT, f"the transformer weights in {where} are not an SD3 DiT's ({cls})",
                      f"no {absent[0]} (tensors under {found})", ", ".join(DIT_TENSORS[:3]) + " ...",
                      "Pick an SD3.5-Medium-class diffusion folder (UniPic2-SD3.5M-Kontext-2B)")
    inner = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    layers = len({k.split(".")[1] for k in shapes if k.startswith("transformer_blocks.")})
    got = (tuple(shapes["context_embedder.weight"]), layers)
    want = ((inner, int(config["joint_attention_dim"])), int(config["num_layers"]))
    if got != want:
        raise _refuse(DIFFUSION_INPUT, f"the transformer weights in {where} do not match its config",
                      f"context_embedder {got[0]}, {got[1]} blocks", f"{want[0]}, {want[1]} blocks",
                      "Use the config.json shipped with these transformer weights")
    if cls != DIT_CLASS:
        log.info("DeepGen: %s/transformer names %s; accepted as an SD3 DiT by its tensors and parameters",
                 folder.name, cls)


def check_vlm(vlm_info: Any, bridge: BridgeConfig) -> None:
    if vlm_info.model_type != VLM_TYPE:
        raise _refuse(VLM_INPUT, "DeepGen needs a Qwen2.5-VL", vlm_info.variant, "Qwen2.5-VL-3B-Instruct",
                      "Pick the Qwen2.5-VL-3B-Instruct folder in models/vlm/")
    if vlm_info.hidden != bridge.llm_hidden:
        raise _refuse(VLM_INPUT, f"{vlm_info.variant} has the wrong hidden size for this checkpoint",
                      f"hidden size {vlm_info.hidden}", f"{bridge.llm_hidden} (Qwen2.5-VL-3B)",
                      "Pick Qwen2.5-VL-3B-Instruct; the 7B model does not fit DeepGen's bridge")
    picks = selected_layers(vlm_info.layers + 1)
    if len(picks) != NUM_STACKED_LAYERS:
        raise _refuse(VLM_INPUT, f"{vlm_info.variant} has a depth that does not give six stacked layers",
                      f"{vlm_info.layers} layers", "32 to 37 layers (Qwen2.5-VL-3B has 36)",
                      "Pick Qwen2.5-VL-3B-Instruct")


def load_handle(checkpoint: str, diffusion: str, vlm: str, memory: MemoryOptions | None) -> ModelHandle:
    """What GentorLoadDeepGen does: resolve, validate, detect; weights load lazily at first use."""
    check_empty(checkpoint, CHECKPOINT_INPUT)
    check_empty(vlm, VLM_INPUT)
    path = resolve_checkpoint(checkpoint)
    info = inspect_checkpoint(path)
    if info.form == "diffusers":
        folder = path
    elif not diffusion or diffusion == SAME_FOLDER:
        folder = path.parent
    else:
        folder = resolve_model_folder(DISPLAY, DIFFUSION_INPUT, diffusion, FOLDER_KEYS)
    config = inspect_diffusion(folder, info)
    vlm_folder, own = resolve_vlm(vlm)
    # DeepGen reads only the VLM's weights, config and tokenizer (not its image-processor files).
    has_tokenizer = any((vlm_folder / f).is_file() for f in vlm_loader.TOKENIZER_FILES)
    vlm_info = vlm_loader.inspect_folder(vlm_folder, own_vlm_tokenizer(vlm_folder) if own else
                                         vlm_folder if has_tokenizer else None)
    check_vlm(vlm_info, info.bridge)
    if own and info.lora_rank:
        # The diffusers vlm/ already holds the LoRA: applying the checkpoint's copy too would add it twice.
        raise _refuse(VLM_INPUT, f"{vlm} already has DeepGen's LoRA merged in, and {path.name} carries it as well",
                      f"rank-{info.lora_rank} LoRA tensors in the checkpoint", "the LoRA in only one of them",
                      "Pick Qwen2.5-VL-3B-Instruct from models/vlm/ for this checkpoint, or pick the diffusers "
                      "folder as the checkpoint")
    vlm_source = "own" if own else "separate"
    if info.form == "diffusers" and (path / OWN_VLM).is_dir() and not own:
        vlm_source = "separate (the folder's vlm/ is not used)"
        log.warning("DeepGen: %s is used instead of %s/%s, which holds DeepGen's VLM with its LoRA merged; the "
                    "official pipeline uses the folder's own vlm/", vlm, path.name, OWN_VLM)
    if info.lora_rank and info.lora_rank != OFFICIAL_LORA_RANK:
        log.warning("DeepGen checkpoint %s: LoRA rank %d (the released one is %d); alpha %d is assumed as in the "
                    "official configs", path.name, info.lora_rank, OFFICIAL_LORA_RANK, LORA_ALPHA)
    paths = [(CHECKPOINT_INPUT, str(path)), (DIFFUSION_INPUT, str(folder)), (VLM_INPUT, str(vlm_info.model_dir)),
             ("tokenizer", str(vlm_info.tokenizer_dir))]
    if vlm_info.processor_dir is not None:
        paths.append(("processor", str(vlm_info.processor_dir)))
    b = info.bridge
    return ModelHandle(BACKEND, "deepgen-1.0" + ("-diffusers" if info.form == "diffusers" else ""), tuple(paths),
                       memory or MemoryOptions(), (
                           ("form", info.form), ("queries", str(b.num_queries)),
                           ("connector", f"{b.hidden}x{b.num_layers}"), ("connector_heads", str(b.num_heads)),
                           ("heads_from", info.heads_source), ("lora_rank", str(info.lora_rank)),
                           ("dit_layers", str(config["num_layers"])), ("vlm", vlm_info.variant),
                           ("vlm_source", vlm_source),
                           ("dit", "checkpoint" if info.dit_in_checkpoint else "folder"),
                           ("bridge_file", str(info.bridge_file)), ("unused_tensors", str(info.unused))))


# ----------------------------------------------------------------------------- building components
def _pickle_source(build: Callable[[], torch.nn.Module], state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module whose tensors are the (memory-mapped) pickle tensors, as ``load_module``'s conversion source."""
    from accelerate import init_empty_weights  # noqa: PLC0415

    with init_empty_weights():
        module = build()
    module.load_state_dict(state, strict=True, assign=True)
    return module


def _load_from_checkpoint(build: Callable[[], torch.nn.Module], file: Path, pick: Callable[[str], str | None],
                          precision: Precision | None, skip: tuple[str, ...], source: Any,
                          component: str) -> torch.nn.Module:
    from .streaming import load_module  # noqa: PLC0415

    if source is not None:
        return load_module(build, precision, skip, source=source, display=DISPLAY, component=component)
    if file.suffix == ckpt.SAFETENSORS_SUFFIX:
        return load_module(build, precision, skip, files=(file,), rename=pick, display=DISPLAY, component=component)
    # A pickle cannot be streamed by key: map it (weights_only, mmap) and convert tensor by tensor.
    state = {}
    for key, value in ckpt.read_state(file).items():
        target = pick(key)
        if target is not None:
            state[target] = value
    try:
        tmp = _pickle_source(build, state)
    except RuntimeError as exc:  # load_state_dict strict: missing / unexpected keys
        raise ModelFolderError(f"{DISPLAY} {component}: the checkpoint's keys do not match ({exc}). "
                               "Use an unmodified DeepGen checkpoint.") from exc
    return load_module(build, precision, skip, source=tmp, display=DISPLAY, component=component)


def _on_meta(build: Callable[[], torch.nn.Module]) -> Callable[[], torch.nn.Module]:
    """Build with buffers on meta too. Why: SD3's PatchEmbed computes its 384x384 sincos table at init
    (0.9 GB in fp32 at SD3.5-Medium width, several times that while computing) although the weights
    carry it as ``pos_embed.pos_embed``; on meta it costs nothing and is filled from the file."""
    def build_on_meta() -> torch.nn.Module:
        with torch.device("meta"):
            return build()
    return build_on_meta


def load_components(handle: ModelHandle, plan: Plan, session: Session) -> dict[str, Any]:
    """Fetch every component through the shared cache; the LoRA (when present) is switched on for this run."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler  # noqa: PLC0415

    from ..modeling.deepgen.transformer import DeepGenTransformer  # noqa: PLC0415
    from .streaming import component_files, diffusers_builder, load_diffusers, load_module  # noqa: PLC0415

    spec = registry.get(BACKEND)
    info = handle.info_dict
    file = Path(handle.path(CHECKPOINT_INPUT))
    folder, bridge_file = Path(handle.path(DIFFUSION_INPUT)), Path(info["bridge_file"])
    precision = plan.precision
    full = Precision(precision.base, precision.base)
    skip = tuple(spec.fp8_skip) if precision.cast else ()
    shapes = ckpt.safetensors_shapes(bridge_file) if bridge_file.suffix == ckpt.SAFETENSORS_SUFFIX else None
    heads = {"num_attention_heads": int(info["connector_heads"])}  # resolved by inspect_checkpoint
    config = ckpt.bridge_config(shapes, heads) if shapes is not None else None

    def bridge_build() -> torch.nn.Module:
        return DeepGenBridge(config or ckpt.bridge_config(ckpt.read_shapes(bridge_file), heads))

    def pick_bridge(key: str) -> str | None:
        return key if ckpt.is_bridge_key(key) else None

    def pick_dit(key: str) -> str | None:
        return key[len(ckpt.TRANSFORMER_PREFIX):] if key.startswith(ckpt.TRANSFORMER_PREFIX) else None

    dit_build = _on_meta(diffusers_builder(DeepGenTransformer, folder / "transformer", DISPLAY, "transformer"))
    dit_from_ckpt = info["dit"] == "checkpoint"
    def load_bridge(p: Precision | None, s: Any) -> torch.nn.Module:
        return _load_from_checkpoint(bridge_build, bridge_file, pick_bridge, p, skip, s, "bridge")

    def load_dit(p: Precision | None, s: Any) -> torch.nn.Module:
        if dit_from_ckpt:
            return _load_from_checkpoint(dit_build, file, pick_dit, p, skip, s, "transformer")
        files = () if s is not None else component_files(folder / "transformer", DISPLAY, "transformer")
        return load_module(dit_build, p, skip, files, s, None, DISPLAY, "transformer")

    def load_vae(p: Precision | None, s: Any) -> torch.nn.Module:
        return load_diffusers(AutoencoderKL, folder / "vae", p, (), s, DISPLAY, "vae")

    loads = {"bridge": (str(bridge_file), load_bridge),
             "transformer": (str(file) if dit_from_ckpt else str(folder / "transformer"), load_dit),
             "vae": (str(folder / "vae"), load_vae)}
    out: dict[str, Any] = {}
    for role, (path, load) in loads.items():
        prec = full if role in spec.fp8_exclude else precision
        out[role] = session.get(KINDS[role], path, load, prec, user=f"{DISPLAY} {role}", display=DISPLAY,
                                skip=skip if prec.cast else ())
    vlm_dir, tok_dir = handle.path(VLM_INPUT), handle.path("tokenizer")
    proc_dir = dict(handle.paths).get("processor")
    vskip = tuple(vlm_loader.spec().fp8_skip) if precision.cast else ()
    out["vlm"] = session.get(VLM_TYPE, vlm_dir,
                             lambda p, s: vlm_loader.load_qwen_vl(vlm_dir, p, None if has_lora_layers(s) else s, vskip),
                             precision, user=f"{DISPLAY} vlm", display=DISPLAY, skip=vskip)
    out["processor"] = session.get("qwen_vl_processor", proc_dir or tok_dir,
                                   lambda _p, _s: vlm_loader.load_processor(tok_dir, proc_dir), None,
                                   user=f"{DISPLAY} tokenizer", display=DISPLAY)
    out["scheduler"] = FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler")  # stateful: fresh per run
    return out


def check_empty(value: str, name: str) -> None:
    if not value:
        raise InputError(f"{DISPLAY} {name}: nothing selected (got an empty value, expected a name from the list). "
                         "Put the files into models/deepgen/ and models/vlm/ and refresh.")
