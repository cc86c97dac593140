"""The one list of backends and what each can do.

Adding a backend = one file in loaders/, samplers/, nodes/ (+ modeling/<id>/) + one entry here + its
workflows and tests. Shared nodes and tests read this list instead of naming backends.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
from dataclasses import dataclass
from types import ModuleType

log = logging.getLogger(__name__)

# Task ids a backend may offer (the task nodes and GentorDescribeImage dispatch on them).
TASK_T2I = "t2i"
TASK_EDIT = "edit"
TASK_UNDERSTAND = "understand"  # image(s) + question -> text
TASK_ENHANCE = "enhance"  # prompt (+ images) -> rewritten prompt


@dataclass(frozen=True)
class Defaults:
    """What `steps = 0`, `cfg = 0`, `width/height = 0` mean for a backend (DESIGN.md §3)."""

    steps: int | None  # None: the backend has no steps (autoregressive)
    cfg: float
    size: str  # the size rule in words, e.g. "T2I 1328x1328; edits from the last reference at ~1 MP"
    steps_note: str = ""  # variant differences, e.g. "Edit-2509/2511: 40"
    cfg_name: str = "cfg"  # what the common cfg means for this backend, e.g. "true_cfg_scale"


@dataclass(frozen=True)
class BackendSpec:
    id: str  # same in every layer and file name
    display_name: str
    folder_keys: tuple[str, ...]  # model folders it reads (the first is its own)
    optional_deps: tuple[tuple[str, str], ...]  # (import name, pip package)
    tasks: tuple[str, ...] = ()
    max_references: int = 0  # most reference images one edit takes (0: no edit)
    defaults: Defaults | None = None
    # component role -> dotted paths of its block containers (nn.ModuleList / nn.Sequential) that block
    # offload streams one block at a time; a role not listed is moved whole.
    blocks: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # Module-name patterns (regex, diffusers' skip_modules_pattern) kept out of FP8 storage.
    fp8_skip: tuple[str, ...] = ()
    # Components never stored in FP8 (small and decide the final pixels, e.g. a VAE).
    fp8_exclude: tuple[str, ...] = ()
    loader_node: str = ""  # node id of its loader, for messages
    settings_node: str = ""  # node id of its settings node (GENTOR_SETTINGS for the task nodes), if any
    # Most tokens a prompt (or question) may have, counted by the backend's tokenizer before any model work:
    # a longer prompt is refused naming the input and this limit (a 1 MB prompt must not hold the queue).
    max_prompt_tokens: int = 0

    def block_paths(self, role: str) -> tuple[str, ...]:
        return dict(self.blocks).get(role, ())


# Module names kept out of FP8 in every backend: norms, embeddings, heads and in/out projections are small
# and numerically sensitive (diffusers' own default skip list has the same spirit).
COMMON_FP8_SKIP = ("pos_embed", "patch_embed", "norm", "embed", "^proj_in$", "^proj_out$", "lm_head")
QWEN2_5_VL_BLOCKS = ("model.language_model.layers", "model.visual.blocks")

BACKENDS: tuple[BackendSpec, ...] = (
    BackendSpec(
        "qwen_image", "Qwen-Image", ("qwen_image", "diffusers", "loras"),
        (("diffusers", "diffusers>=0.42"), ("transformers", "transformers"), ("accelerate", "accelerate"),
         ("peft", "peft")),
        # Edit-2509/2511 take up to 4 references, Qwen-Image 2.1 up to 10 (the sampler names each model's limit).
        tasks=(TASK_T2I, TASK_EDIT), max_references=10,
        defaults=Defaults(steps=50, cfg=4.0, steps_note="Edit-2509/2511: 40; 2.1: 40", cfg_name="true_cfg_scale",
                          size="T2I 1328x1328 (2.1: 1024x1024, no CFG by default); Edit from the first image, "
                               "Edit-2509/2511 and 2.1 from the last, at ~1 MP"),
        blocks=(("transformer", ("transformer_blocks",)), ("text_encoder", QWEN2_5_VL_BLOCKS)),
        fp8_skip=COMMON_FP8_SKIP, fp8_exclude=("vae",), loader_node="GentorLoadQwenImage",
        # max_prompt_tokens: the pipelines' max_sequence_length ceiling
        settings_node="GentorQwenImageSettings", max_prompt_tokens=1024),
    BackendSpec(
        "deepgen", "DeepGen", ("deepgen", "vlm"),
        (("diffusers", "diffusers>=0.42"), ("transformers", "transformers"), ("accelerate", "accelerate"),
         ("peft", "peft")),
        tasks=(TASK_T2I, TASK_EDIT), max_references=4,
        defaults=Defaults(steps=50, cfg=4.0,
                          size="512x512; an edit with one reference follows the reference (long side <= 512)"),
        blocks=(("transformer", ("transformer_blocks",)), ("vlm", QWEN2_5_VL_BLOCKS), ("bridge", ("connector.layers",))),
        fp8_skip=COMMON_FP8_SKIP, fp8_exclude=("vae",), loader_node="GentorLoadDeepGen",
        settings_node="GentorDeepGenSettings", max_prompt_tokens=1024),  # DeepGen's training max_length
    BackendSpec(
        "bagel", "BAGEL", ("bagel",), (("transformers", "transformers"), ("accelerate", "accelerate"),
                                       ("safetensors", "safetensors")),
        tasks=(TASK_T2I, TASK_EDIT, TASK_UNDERSTAND), max_references=4,
        defaults=Defaults(steps=50, cfg=4.0, cfg_name="cfg_text_scale",
                          size="T2I 1024x1024 (at most 1024 per side); edits the size of the last reference "
                               "(long side <= 1024, short side >= 512) unless width/height are set"),
        blocks=(("model", ("language_model.model.layers", "vit_model.vision_model.encoder.layers")),),
        fp8_skip=COMMON_FP8_SKIP + ("vae2llm", "llm2vae", "connector"), fp8_exclude=("ae",),
        loader_node="GentorLoadBagel", settings_node="GentorBagelSettings", max_prompt_tokens=4096),
    BackendSpec(
        "emu35", "Emu3.5", ("emu35",),
        (("transformers", "transformers"), ("accelerate", "accelerate"), ("tiktoken", "tiktoken"),
         ("yaml", "pyyaml")),
        tasks=(TASK_T2I, TASK_EDIT), max_references=3,
        defaults=Defaults(steps=None, cfg=5.0, cfg_name="classifier-free guidance",
                          steps_note="autoregressive: no steps",
                          size="T2I from the aspect preset (default 4:3 = 55x73 tokens, ~1 MP); X2I the grid of the "
                               "last reference at image_area (1 MP); cfg 5.0 T2I / 3.0 X2I (Emu3.5-Image), 2.0 Emu3.5"),
        blocks=(("llm", ("model.layers",)),),
        fp8_skip=COMMON_FP8_SKIP, fp8_exclude=("ibq",), loader_node="GentorLoadEmu35",
        settings_node="GentorEmu35Settings", max_prompt_tokens=4096),
    BackendSpec(
        "vlm", "Qwen-VL", ("vlm",), (("transformers", "transformers"),),
        tasks=(TASK_UNDERSTAND, TASK_ENHANCE),
        # Qwen2-VL, Qwen2.5-VL and Qwen3-VL share these container paths in transformers 5.
        blocks=(("model", QWEN2_5_VL_BLOCKS),),
        fp8_skip=COMMON_FP8_SKIP, loader_node="GentorLoadPromptEnhancer",
        max_prompt_tokens=8192),
)


def get(backend_id: str) -> BackendSpec:
    for spec in BACKENDS:
        if spec.id == backend_id:
            return spec
    raise KeyError(f"unknown backend {backend_id!r}; known: {', '.join(b.id for b in BACKENDS)}")


def missing_deps(spec: BackendSpec) -> list[str]:
    """pip packages of a backend that are not importable here."""
    return [pip for module, pip in spec.optional_deps if importlib.util.find_spec(module) is None]


def available() -> list[BackendSpec]:
    """Backends whose dependencies are installed; one log line for each skipped one."""
    out = []
    for spec in BACKENDS:
        missing = missing_deps(spec)
        if missing:
            log.warning("Gentor: %s nodes disabled: missing %s (pip install %s)", spec.display_name,
                        ", ".join(missing), " ".join(missing))
        else:
            out.append(spec)
    return out


def with_task(task: str) -> list[BackendSpec]:
    """Backends offering ``task`` (for tooltips and messages)."""
    return [b for b in BACKENDS if task in b.tasks]


def max_references() -> int:
    """The largest number of reference images any registered backend takes (edit node inputs)."""
    return max((b.max_references for b in BACKENDS), default=0)


def defaults_hint(kind: str) -> str:
    """'Qwen-Image 50 (Edit-2509/2511: 40), BAGEL 50, …' for the task nodes' tooltips."""
    parts = []
    for b in BACKENDS:
        d = b.defaults
        if d is None:
            continue
        if kind == "steps":
            value = "n/a" if d.steps is None else str(d.steps) + (f" ({d.steps_note})" if d.steps_note else "")
        elif kind == "cfg":
            value = f"{d.cfg:g}" + (f" {d.cfg_name}" if d.cfg_name != "cfg" else "")
        else:
            value = d.size
        parts.append(f"{b.display_name} {value}")
    return "; ".join(parts)


def sampler(backend_id: str) -> ModuleType:
    """The backend's samplers module (each has ``run(handle, task, request, listener)``)."""
    return importlib.import_module(f"{__package__}.samplers.{get(backend_id).id}")
