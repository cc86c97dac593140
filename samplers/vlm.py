"""Qwen-VL text generation: prompt enhancement and image understanding.

Decoding is transformers' own ``generate`` (so greedy output is token for token what transformers gives),
with a stopping criterion that ticks progress after every token; that is also where Cancel lands. Images
are resized by the Qwen-VL rule before the processor sees them, and every resize is stated in the notes.
A reply cut at the token limit is returned as produced, and the notes say so.

Request fields used: ``prompt`` (prompt / question), ``images``, ``seed``, ``steps`` = the token budget
(max new tokens; 0 = the default), ``settings`` (``make_settings``: preset, language, sampling, …).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from PIL import Image

from .. import glue, registry
from ..errors import InputError
from ..loaders import vlm as loader
from ..loaders.cache import CACHE, ModelHandle
from ..loaders.memory import resolve
from . import vlm_prompts as prompts
from .common import Request, Result, Settings, check_settings, to_rgb
from .prompt_text import user_text

log = logging.getLogger(__name__)

DISPLAY = loader.DISPLAY
SETTINGS_NODE = "Gentor Enhance Prompt"
DEFAULT_MAX_NEW_TOKENS = 512
MAX_NEW_TOKENS = 8192
# Qwen2.5-VL / Qwen3-VL model cards' recommended sampling for the VL Instruct models.
DEFAULT_TEMPERATURE = 0.7
DEFAULT_TOP_P = 0.8
DEFAULT_TOP_K = 20
# Image budget per image: 1280 visual tokens of 28x28 pixels, the max_pixels the Qwen2.5-VL README suggests
# to balance detail against memory (the processors' own ceiling, 12.8 MP, costs ~16k tokens per image).
DEFAULT_MAX_IMAGE_PIXELS = 1280 * 28 * 28
MIN_IMAGE_PIXELS = 28 * 28 * 4
MAX_IMAGES = 16
CUT_NOTE = "cut at max_new_tokens={n}: the reply is incomplete; raise max_new_tokens for the full text"


@dataclass
class Reply:
    """What one generation produced."""

    text: str
    notes: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)  # generated token ids (after the prompt)
    cut: bool = False

    def with_notes(self) -> str:
        return self.text + ("\n\n" + "\n".join(f"- {n}" for n in self.notes) if self.notes else "")


@dataclass(frozen=True)
class Generation:
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    sampling: bool = False  # False: greedy (deterministic)
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    seed: int = 0
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS


def make_settings(preset: str = prompts.PRESET_T2I, language: str = prompts.LANG_AUTO, system_prompt: str = "",
                  sampling: bool = False, temperature: float = DEFAULT_TEMPERATURE, top_p: float = DEFAULT_TOP_P,
                  top_k: int = DEFAULT_TOP_K, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> Settings:
    """The enhancer's knobs as a settings bundle (validated here, so API clients get the same errors)."""
    if preset not in prompts.PRESETS:
        raise InputError(f"{DISPLAY} preset: unknown preset (got {preset!r}, expected one of "
                         f"{', '.join(prompts.PRESETS)}). Pick a preset from the list.")
    if language not in prompts.LANGUAGES:
        raise InputError(f"{DISPLAY} language: unknown language (got {language!r}, expected one of "
                         f"{', '.join(prompts.LANGUAGES)}). Pick auto to keep the prompt's language.")
    if preset == prompts.PRESET_FREE and not system_prompt.strip():
        raise InputError(f"{DISPLAY} system_prompt: empty with the free preset (got an empty system prompt, expected "
                         "your instructions for the model). Write a system prompt, or pick another preset.")
    if not (temperature > 0 and 0 < top_p <= 1 and top_k >= 0):
        raise InputError(f"{DISPLAY} temperature/top_p: out of range (got temperature={temperature}, top_p={top_p}, "
                         f"top_k={top_k}, expected temperature > 0, 0 < top_p <= 1, top_k >= 0). Use the defaults "
                         f"{DEFAULT_TEMPERATURE} / {DEFAULT_TOP_P} / {DEFAULT_TOP_K}.")
    if max_image_pixels < MIN_IMAGE_PIXELS:
        raise InputError(f"{DISPLAY} max_image_pixels: too small (got {max_image_pixels}, expected at least "
                         f"{MIN_IMAGE_PIXELS}). Use {DEFAULT_MAX_IMAGE_PIXELS} (the default).")
    return Settings(loader.BACKEND, (("preset", preset), ("language", language), ("system_prompt", system_prompt),
                                     ("sampling", bool(sampling)), ("temperature", float(temperature)),
                                     ("top_p", float(top_p)), ("top_k", int(top_k)),
                                     ("max_image_pixels", int(max_image_pixels))))


def _generation(request: Request, settings: Settings) -> Generation:
    n = request.steps or DEFAULT_MAX_NEW_TOKENS
    if not 1 <= n <= MAX_NEW_TOKENS:
        raise InputError(f"{DISPLAY} max_new_tokens: out of range (got {n}, expected 1..{MAX_NEW_TOKENS} or 0 for "
                         f"{DEFAULT_MAX_NEW_TOKENS}). Set a token budget in that range.")
    return Generation(n, settings.get("sampling", False), settings.get("temperature", DEFAULT_TEMPERATURE),
                      settings.get("top_p", DEFAULT_TOP_P), settings.get("top_k", DEFAULT_TOP_K), int(request.seed),
                      settings.get("max_image_pixels", DEFAULT_MAX_IMAGE_PIXELS))


# ----------------------------------------------------------------------------- public entry points
def run(handle: ModelHandle, task: str, request: Request,
        listener: Callable[[int, int, Any], None] | None = None) -> Result:
    """Task dispatch (GentorDescribeImage / GentorEnhancePrompt): the reply, then the notes."""
    if task == registry.TASK_ENHANCE:
        return Result(text=enhance(handle, request, listener).with_notes())
    if task == registry.TASK_UNDERSTAND:
        return Result(text=describe(handle, request, listener).with_notes())
    raise InputError(f"{DISPLAY} model: cannot {task} (got task {task!r}, expected {registry.TASK_ENHANCE} or "
                     f"{registry.TASK_UNDERSTAND}). Use Gentor Enhance Prompt or Gentor Describe Image with this "
                     "model; generate images with an image model's loader.")


def enhance(handle: ModelHandle, request: Request, listener: Callable[[int, int, Any], None] | None = None) -> Reply:
    """Rewrite ``request.prompt`` (optionally looking at ``request.images``) with a preset's system prompt."""
    check_settings(request.settings, loader.BACKEND, DISPLAY, SETTINGS_NODE)
    settings = request.settings or make_settings()
    preset, language = settings.get("preset"), settings.get("language")
    text = _user_text(request, preset, language)
    system = prompts.system_prompt(preset, language, request.prompt, settings.get("system_prompt", ""))
    messages = build_messages(system, text, len(request.images))
    reply = generate(handle, messages, request.images, _generation(request, settings), listener)
    reply.text, dropped = prompts.strip_reasoning(reply.text)
    if dropped:
        reply.notes.append("the model's <think> reasoning was removed from the prompt")
    return reply


def describe(handle: ModelHandle, request: Request, listener: Callable[[int, int, Any], None] | None = None) -> Reply:
    """Answer ``request.prompt`` about ``request.images`` (empty question + images: describe them)."""
    check_settings(request.settings, loader.BACKEND, DISPLAY, SETTINGS_NODE)
    settings = request.settings or make_settings()
    text = _user_text(request, prompts.TASK_DESCRIBE, settings.get("language"))
    system = settings.get("system_prompt", "").strip()
    messages = build_messages(system, text, len(request.images))
    return generate(handle, messages, request.images, _generation(request, settings), listener)


def _user_text(request: Request, preset: str, language: str) -> str:
    if request.prompt.strip():
        return request.prompt
    if not request.images:
        raise InputError(f"{DISPLAY} prompt: empty prompt and no image (got an empty prompt, expected a prompt or at "
                         "least one image to describe). Write a prompt, or connect an image to image_1.")
    lang = prompts.LANG_EN if language == prompts.LANG_AUTO else language
    return prompts.EMPTY_PROMPT_TEXT[preset][lang]


def as_text(processor: Any, messages: list[dict]) -> list[dict]:
    """The messages with every text part passed through ``user_text`` (control-token spellings broken)."""
    names = {"system": "system_prompt", "user": "prompt"}

    def text(role: str, value: str) -> str:
        return user_text(processor, value, names.get(role, role), loader.BACKEND)

    return [dict(m, content=text(m["role"], m["content"]) if isinstance(m["content"], str) else
                 [dict(c, text=text(m["role"], c["text"])) if c.get("type") == "text" else c for c in m["content"]])
            for m in messages]


def build_messages(system: str, text: str, n_images: int) -> list[dict]:
    """Chat messages: optional system turn, then one user turn with the images first, then the text."""
    content: list[dict] = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": text}]
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]


# ----------------------------------------------------------------------------- images
def image_rule(processor: Any, max_image_pixels: int) -> tuple[int, int, int]:
    """(side factor, min pixels, max pixels) of the Qwen-VL resize rule for this processor and budget."""
    ip = processor.image_processor
    factor = int(ip.patch_size) * int(ip.merge_size)
    size = ip.size
    lo = int(size["shortest_edge"] if "shortest_edge" in size else ip.min_pixels)
    hi = int(size["longest_edge"] if "longest_edge" in size else ip.max_pixels)
    return factor, lo, max(lo, min(hi, max_image_pixels))


def fit_images(images: list[Image.Image], processor: Any, max_image_pixels: int) -> tuple[list[Image.Image], list[str]]:
    """Resize each image by the Qwen-VL rule (sides multiples of patch x merge, area within the budget,
    aspect kept — transformers' ``smart_resize``) and say what changed."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize  # noqa: PLC0415

    if len(images) > MAX_IMAGES:
        raise InputError(f"{DISPLAY} images: too many images (got {len(images)}, expected at most {MAX_IMAGES}). "
                         "Connect fewer images.")
    factor, lo, hi = image_rule(processor, max_image_pixels)
    out, notes = [], []
    for i, img in enumerate(images, 1):
        img = to_rgb(img)
        h, w = smart_resize(img.height, img.width, factor=factor, min_pixels=lo, max_pixels=hi)
        if (w, h) != img.size:
            notes.append(f"image_{i} {img.width}x{img.height} resized to {w}x{h} (Qwen-VL rule: sides multiples "
                         f"of {factor}, area {lo}..{hi} pixels, aspect kept)")
            img = img.resize((w, h), Image.Resampling.BICUBIC)
        out.append(img)
    return out, notes


# ----------------------------------------------------------------------------- decoding
def _stop_criterion(progress: glue.Progress, prompt_len: int):
    from transformers import StoppingCriteria  # noqa: PLC0415

    class TokenProgress(StoppingCriteria):
        """Ticks the progress bar after every generated token; Cancel raises from here (between tokens)."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            progress.update(input_ids.shape[1] - prompt_len)
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return TokenProgress()


def generation_config(model: Any, tokenizer: Any, gen: Generation) -> Any:
    """The folder's generation config with the user's choices on top (greedy when sampling is off)."""
    import copy  # noqa: PLC0415

    config = copy.deepcopy(model.generation_config)
    config.max_new_tokens = gen.max_new_tokens
    config.do_sample = gen.sampling
    if gen.sampling:
        config.temperature, config.top_p, config.top_k = gen.temperature, gen.top_p, gen.top_k
    else:
        # Unused by greedy decoding; cleared so transformers does not warn about them.
        config.temperature, config.top_p, config.top_k = None, None, None
    if config.eos_token_id is None:  # a pipeline's text encoder has no generation_config.json
        config.eos_token_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if config.pad_token_id is None:
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, list) else eos
    return config


def stop_ids(config: Any) -> set[int]:
    eos = config.eos_token_id
    return set(eos if isinstance(eos, (list, tuple)) else [eos])


def check_memory(handle: ModelHandle, plan: Any, images: list[Image.Image], gen: Generation) -> None:
    """Refuse before reading any weight when the estimate (loaders/estimates.py, from headers) does not fit
    the device; weights already cached for this model count as free."""
    from ..loaders import estimates, inspect as inspection  # noqa: PLC0415

    if plan.device.type == "cpu":
        return
    report = inspection.inspect_path(handle.path("model"))
    cached = sum(e.nbytes for e in CACHE.entries(loader.kind_of(handle)) if e.source == handle.path("model"))
    side = int(gen.max_image_pixels ** 0.5)
    estimates.check_fits(report, handle.memory, plan.device, glue.free_memory_bytes(plan.device) + cached,
                          "model", side, side, max(1, len(images)))


def generate(handle: ModelHandle, messages: list[dict], images: list[Image.Image], gen: Generation,
             listener: Callable[[int, int, Any], None] | None = None) -> Reply:
    """Load through the cache, apply the memory plan, decode; the reply with notes."""
    device = glue.torch_device()
    plan = resolve(handle.memory, device)
    notes = list(plan.notes)
    check_memory(handle, plan, images, gen)
    with CACHE.session() as session:
        entries = loader.load_components(handle, plan, session)
        processor = entries["processor"].value
        if images and not hasattr(processor, "image_processor"):
            raise InputError(f"{DISPLAY} image_1: this model folder has no image processor (got {len(images)} "
                             f"image(s), expected none for {handle.path('model')}). Use a Qwen-VL Instruct folder "
                             "from models/vlm/, or disconnect the images.")
        fitted, image_notes = fit_images(images, processor, gen.max_image_pixels) if images else ([], [])
        notes += image_notes
        from ..loaders.placement import Placement  # noqa: PLC0415

        placement = Placement({"model": entries["model"]}, dict(loader.spec().blocks), plan, DISPLAY)
        with placement.running() as used:
            notes += placement.notes
            reply = decode(entries["model"].value, processor, messages, fitted, gen, used.device, listener)
    reply.notes = notes + reply.notes
    return reply


def decode(model: Any, processor: Any, messages: list[dict], images: list[Image.Image], gen: Generation,
           device: torch.device, listener: Callable[[int, int, Any], None] | None = None) -> Reply:
    """Run transformers' generate on prepared inputs; progress per token; seed-deterministic sampling."""
    from transformers import StoppingCriteriaList  # noqa: PLC0415

    tokenizer = getattr(processor, "tokenizer", processor)
    text = processor.apply_chat_template(as_text(processor, messages), add_generation_prompt=True, tokenize=False)
    kwargs = {"text": [text], "return_tensors": "pt"}
    if images:
        kwargs["images"] = images
    inputs = processor(**kwargs).to(device)
    prompt_len = inputs["input_ids"].shape[1]
    config = generation_config(model, tokenizer, gen)
    progress = glue.Progress(gen.max_new_tokens, listener)
    # Sampling draws from the global generators: fork them so a seeded run leaves the caller's RNG alone.
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode():
        torch.manual_seed(gen.seed)
        out = model.generate(**inputs, generation_config=config,
                             stopping_criteria=StoppingCriteriaList([_stop_criterion(progress, prompt_len)]))
    tokens = out[0, prompt_len:].tolist()
    stops = stop_ids(config)
    cut = len(tokens) >= gen.max_new_tokens and (not tokens or tokens[-1] not in stops)
    reply = Reply(tokenizer.decode(tokens, skip_special_tokens=True).strip(), [], tokens, cut)
    if cut:
        reply.notes.append(CUT_NOTE.format(n=gen.max_new_tokens))
    return reply
