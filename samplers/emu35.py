"""Emu3.5 T2I and X2I (1-3 references): the backend's policies around the KV-cached generator.

Policies: CFG defaults per variant and task (DESIGN.md §3), output grid from the aspect preset, from
width/height, or (X2I) from the last reference; references resized to ``image_area`` and tokenised by
IBQ; the token budget checked up front; progress per image row with partial previews; Cancel between
tokens; a run without a complete image fails with the text produced and the limit to raise.
Seeds: item i of a batch samples with a CPU ``torch.Generator`` seeded with ``seed + i`` (one uniform
draw per token, ``modeling.emu35.generate``).
"""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from PIL import Image

from .. import glue, registry
from ..errors import GenerationError, InputError, MemoryEstimateError
from ..loaders import emu35 as emu_loader
from ..loaders.cache import CACHE, ModelHandle
from ..loaders.cancel import cancel_points
from ..loaders.memory import resolve
from ..modeling.emu35 import image_tokens as IT, tokens as T
from ..modeling.emu35.generate import StepInfo, generate
from ..modeling.emu35.logits import SamplingParams
from . import speed
from .common import Request, Result, Settings, check_finite, check_settings, format_notes, to_rgb
from .prompt_text import user_text

log = logging.getLogger(__name__)

DISPLAY = "Emu3.5"
_NOT_DIFFUSION = "Emu3.5 decodes image tokens one by one (autoregressive), there are no denoising steps or diffusers blocks"
SPEED_SUPPORT = speed.Support((), _NOT_DIFFUSION, _NOT_DIFFUSION, _NOT_DIFFUSION)
SETTINGS_NODE = "Gentor Emu3.5 Settings"
IMAGE_AREA_MIN = T.DOWNSAMPLE ** 2  # one token
IMAGE_AREA_MAX = 2048 * 2048
MAX_NEW_TOKENS_LIMIT = 65536
ASPECTS = ("default", "auto") + tuple(T.ASPECT_PRESETS)
PREVIEWS_PER_IMAGE = 8
SPLIT_RESERVE = 2 * 10**9  # working memory kept free on every GPU of a split (prefill activations, logits)
MODE = "batched"
PROMPT_ALLOWANCE = 512  # template + instruction tokens
LOGITS_BYTES_PER_ROW = 4 * 8  # fp32 logits and a few full-vocabulary work tensors per branch


@dataclass
class Emu35Job:
    task: str
    prompt: str
    cfg: float
    seed: int
    batch: int
    grid: tuple[int, int] | None  # None: the model writes the size ("auto")
    params: SamplingParams
    max_new_tokens: int
    image_area: int
    images: list[Image.Image] = field(default_factory=list)
    grid_from_reference: bool = False
    sized: bool = False  # width/height set the grid (they are the input to name when it is too small)


def make_settings(max_new_tokens: int = T.MAX_NEW_TOKENS, image_area: int = 0, image_top_k: int = 0,
                  text_top_k: int = T.TEXT_TOP_K, text_top_p: float = T.TEXT_TOP_P, aspect: str = "default",
                  vq_type: str = "ibq") -> Settings:
    """The GENTOR_SETTINGS of GentorEmu35Settings (0 = the variant's default), validated."""
    if vq_type != "ibq":
        raise InputError(f"{DISPLAY} vq_type: {vq_type!r} is not supported (got {vq_type!r}, expected 'ibq'). Only "
                         "the IBQ vision tokenizer is released and implemented by the official code ('dcae' raises "
                         "NotImplementedError there). Use 'ibq'.")
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
        raise InputError(f"{DISPLAY} max_new_tokens: out of range (got {max_new_tokens}, expected 1.."
                         f"{MAX_NEW_TOKENS_LIMIT}). Use 5120 (a 64x64-token image needs 4167).")
    if image_area and not IMAGE_AREA_MIN <= image_area <= IMAGE_AREA_MAX:
        raise InputError(f"{DISPLAY} image_area: out of range (got {image_area}, expected 0 for the default or "
                         f"{IMAGE_AREA_MIN}..{IMAGE_AREA_MAX} pixels). Use 1048576 (1024x1024) for Emu3.5-Image.")
    if aspect not in ASPECTS:
        raise InputError(f"{DISPLAY} aspect: unknown preset (got {aspect!r}, expected one of {', '.join(ASPECTS)}). "
                         "Pick one of the listed presets.")
    if image_top_k < 0 or text_top_k < 0 or not 0.0 < text_top_p <= 1.0:
        raise InputError(f"{DISPLAY} top-k/top-p: out of range (got image_top_k={image_top_k}, text_top_k="
                         f"{text_top_k}, text_top_p={text_top_p}, expected top-k >= 0 and 0 < top-p <= 1). "
                         "Use the defaults 0 / 1024 / 0.9.")
    return Settings("emu35", (("max_new_tokens", max_new_tokens), ("image_area", image_area),
                              ("image_top_k", image_top_k), ("text_top_k", text_top_k), ("text_top_p", text_top_p),
                              ("aspect", aspect), ("vq_type", vq_type)))


def default_cfg(variant: str, task: str) -> float:
    if variant != "emu3.5-image":
        return T.CFG_GENERAL
    return T.CFG_T2I if task == "t2i" else T.CFG_X2I


def plan_job(task: str, variant: str, request: Request) -> tuple[Emu35Job, list[str]]:
    """Apply the backend's policies to a request; return the job and notes for the user."""
    check_settings(request.settings, "emu35", DISPLAY, SETTINGS_NODE)
    s = request.settings or make_settings()
    make_settings(**dict(s.values))  # API clients can send any values: validate them again
    notes: list[str] = []
    image = variant == "emu3.5-image"
    area = int(s.get("image_area") or (T.IMAGE_AREA if image else T.GENERAL_IMAGE_AREA))
    params = SamplingParams(cfg=float(request.cfg or default_cfg(variant, task)),
                            image_top_k=int(s.get("image_top_k") or (T.IMAGE_TOP_K if image else T.GENERAL_IMAGE_TOP_K)),
                            text_top_k=int(s.get("text_top_k", T.TEXT_TOP_K)),
                            text_top_p=float(s.get("text_top_p", T.TEXT_TOP_P)))
    if request.steps:
        notes.append(f"steps={request.steps} does not apply to Emu3.5 (autoregressive, no steps): ignored")
    if request.negative.strip():
        notes.append("negative does not apply: Emu3.5's guidance uses its fixed unconditional prompt")
    images = [to_rgb(i) for i in request.images]
    grid: tuple[int, int] | None
    sized = bool(request.width and request.height)
    if task == "t2i":
        if images:
            raise InputError(f"{DISPLAY} images: text-to-image takes no reference (got {len(images)}, expected 0). "
                             "Use Gentor Edit Image for references.")
        aspect = s.get("aspect", "default")
        if sized:
            grid = _grid_from_size(request.width, request.height, notes)
        elif aspect == "auto" or (aspect == "default" and not image):
            grid = None
        else:
            grid = IT.grid_for_aspect(T.DEFAULT_ASPECT if aspect == "default" else aspect, area)
    else:
        if not images:
            raise InputError(f"{DISPLAY} image_1: no reference image (got none, expected 1..{T.MAX_REFERENCES}). "
                             "Connect an image to image_1, or use Gentor Text to Image.")
        if len(images) > T.MAX_REFERENCES:
            raise InputError(f"{DISPLAY} image_1..image_{len(images)}: too many references (got {len(images)}, "
                             f"expected at most {T.MAX_REFERENCES}). Disconnect {len(images) - T.MAX_REFERENCES}.")
        images = [IT.smart_resize(i, area) for i in images]
        last = images[-1]
        grid = (last.height // T.DOWNSAMPLE, last.width // T.DOWNSAMPLE)
        if sized:
            grid = _grid_from_size(request.width, request.height, notes)
            notes.append("width/height override the output grid of the last reference")
    max_new = int(s.get("max_new_tokens", T.MAX_NEW_TOKENS))
    if grid is not None:
        need = IT.tokens_needed(grid)
        if max_new < need:
            raise InputError(f"{DISPLAY} max_new_tokens: too small for a {grid[0]}x{grid[1]}-token image (got {max_new}, "
                             f"expected at least {need}). Raise max_new_tokens in {SETTINGS_NODE} to {need} or more, "
                             "or choose a smaller size.")
    job = Emu35Job(task, request.prompt, params.cfg, int(request.seed), max(1, int(request.batch_size)), grid, params,
                   max_new, area, images, grid_from_reference=task == "edit" and not sized, sized=sized)
    return job, notes


def _grid_from_size(width: int, height: int, notes: list[str]) -> tuple[int, int]:
    rows, cols = max(1, round(height / T.DOWNSAMPLE)), max(1, round(width / T.DOWNSAMPLE))
    if (rows * T.DOWNSAMPLE, cols * T.DOWNSAMPLE) != (height, width):
        notes.append(f"size {width}x{height} is off the 16-pixel grid: using {cols * T.DOWNSAMPLE}x{rows * T.DOWNSAMPLE}")
    return rows, cols


def build_prompts(job: Emu35Job, image_strings: list[str], tok: Any) -> tuple[list[int], list[int]]:
    """Conditional and unconditional ids (official templates; references in both; the prompt as text)."""
    question = user_text(tok, job.prompt, "prompt", "emu35")
    if job.task == "t2i":
        cond, unc = T.T2I_TEMPLATE.format(question=question), T.T2I_UNCOND
    else:
        joined = "".join(image_strings)
        cond = T.X2I_TEMPLATE.format(images=joined, question=question)
        unc = T.X2I_UNCOND.format(images=joined)
    cond_ids, unc_ids = tok.encode(cond), tok.encode(unc)
    if cond_ids[0] != T.BOS:
        cond_ids = [T.BOS] + cond_ids
    return cond_ids, unc_ids


# ----------------------------------------------------------------------------- running
class RowProgress:
    """Ticks per image row, sends a partial preview every few rows (rows the vision tokenizer can decode),
    checks Cancel on every token; ``finish`` shows the finished image, so no partial preview stays."""

    def __init__(self, listener: Any, decode: Callable[[torch.Tensor], Image.Image], min_positions: int = 1) -> None:
        self.listener, self.decode, self.min_positions = listener, decode, min_positions
        self.progress: glue.Progress | None = None
        self.rows = 0

    def __call__(self, info: StepInfo) -> None:
        glue.check_interrupt()
        if info.grid is None or info.rows_done <= self.rows:
            return
        h, w = info.grid
        if self.progress is None:
            self.progress = glue.Progress(h, self.listener)
        self.rows = info.rows_done
        if self.rows >= h:  # the last row: finish() ticks it with the decoded image
            return
        every = max(1, math.ceil(h / PREVIEWS_PER_IMAGE))
        preview = None
        if self.rows % every == 0 and self.rows * w >= self.min_positions:
            parsed = IT.parse_output(_from_boi(info.tokens), lambda _ids: "")
            if parsed.partial is not None:
                preview = self.decode(parsed.partial)
        self.progress.update(self.rows, preview)

    def finish(self, image: torch.Tensor) -> None:
        """The last tick, with the decoded image [1, H, W, 3] as its preview (never a partial one)."""
        if self.progress is None:  # a grid the model chose without row ticks
            self.progress = glue.Progress(1, self.listener)
        self.progress.update(self.progress.total, _pil(image))


def check_grid(grid: tuple[int, int], min_positions: int, input_name: str) -> None:
    """Refuse a token grid smaller than the vision tokenizer can encode or decode (see IBQConfig)."""
    rows, cols = grid
    if rows * cols >= min_positions:
        return
    side = min_positions * T.DOWNSAMPLE
    raise InputError(f"{DISPLAY} {input_name}: a {cols * T.DOWNSAMPLE}x{rows * T.DOWNSAMPLE} image is {rows * cols} "
                     f"token(s), fewer than this vision tokenizer handles (got {rows}x{cols} tokens, expected at "
                     f"least {min_positions} tokens, e.g. {side}x{T.DOWNSAMPLE} or {T.DOWNSAMPLE}x{side} pixels). "
                     "Choose a larger size.")


def _from_boi(tokens: list[int]) -> list[int]:
    # The prompt may end with BOI; the parser needs it in front of the header.
    return tokens if T.BOI in tokens else [T.BOI] + tokens


def _decode(ibq: Any, codes: torch.Tensor) -> torch.Tensor:
    """codes [h, w] -> [1, 16h, 16w, 3] in 0..1 on the CPU."""
    pixels = ibq.decode_codes(codes[None])
    return IT.to_unit(pixels).permute(0, 2, 3, 1).cpu()


def _pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray((image[0].numpy() * 255.0 + 0.5).astype("uint8"), "RGB")


def run(handle: ModelHandle, task: str, request: Request,
        listener: Callable[[int, int, Any], None] | None = None) -> Result:
    """Generate with an Emu3.5 handle; ``task`` is "t2i" or "edit"."""
    from ..loaders.placement import Placement  # noqa: PLC0415

    handle.check_exists(DISPLAY)
    job, notes = plan_job(task, handle.variant, request)
    if handle.info_dict.get("variant_source") == emu_loader.ASSUMED:
        notes.append("variant: Emu3.5-Image assumed (both releases ship the same config.json and this folder has no "
                     "model card with a pipeline_tag): its defaults apply; set variant on Gentor Load Emu3.5 if this "
                     "is the general Emu3.5")
    spec = registry.get("emu35")
    plan = resolve(handle.memory, glue.torch_device())
    notes.extend(plan.notes)
    speed.check_usable(request.speed, DISPLAY, plan.device, SPEED_SUPPORT)
    info = handle.info_dict
    with CACHE.session() as session:
        comps = emu_loader.load_components(handle, plan.precision, spec.fp8_skip, session)
        llm, ibq, tok = comps["llm"], comps["ibq"].value, comps["tokenizer"].value
        split = _split_plan(llm, info, job, notes)
        # The LLM follows the memory plan (or the multi-GPU split); the IBQ model (~1.8 GB fp32) is moved
        # whole to vq_device, as the reference does, and back to the CPU after an offloaded run.
        placement = None if split is not None else Placement({"llm": llm}, dict(spec.blocks), plan, DISPLAY)
        with placement.running() if placement is not None else contextlib.nullcontext(plan) as used:
            notes.extend(placement.notes if placement is not None else [])
            device = torch.device(split) if split is not None else used.device
            vq_device = torch.device("cpu") if info.get("vq_device") == "cpu" else used.device
            check_memory(job, llm.value, device)
            glue.make_room(comps["ibq"].nbytes, vq_device)
            ibq.to(vq_device)
            try:
                # The placement checks Cancel inside the LLM's forward; the IBQ decoder and a split LLM here.
                with cancel_points([ibq] + ([llm.value] if placement is None else [])):
                    images, texts = _generate_all(job, llm.value, ibq, tok, device, listener)
            finally:
                if used.offload != "none" or vq_device.type == "cpu":
                    ibq.to("cpu")
    image = torch.cat(images) if len({tuple(i.shape) for i in images}) == 1 else images[0]
    if image is images[0] and len(images) > 1:
        notes.append("batch items came out in different sizes: only the first is returned")
    h, w = image.shape[1:3]
    pairs = [("model", handle.variant), ("task", "x2i" if task == "edit" else "t2i"), ("size", f"{w}x{h}"),
             ("grid", f"{h // T.DOWNSAMPLE}x{w // T.DOWNSAMPLE}"), ("cfg", job.cfg), ("seed", job.seed),
             ("references", len(job.images))]
    text = format_notes(pairs, notes)
    reasoning = "\n".join(t for t in texts if t)
    check_finite(image, DISPLAY, "try compute_dtype fp32 or bf16 in Gentor Memory Options for the vision tokenizer")
    return Result(image, text + (f"\n{reasoning}" if reasoning else ""))


def _generate_all(job: Emu35Job, model: Any, ibq: Any, tok: Any, device: torch.device,
                  listener: Any) -> tuple[list[torch.Tensor], list[str]]:
    least = ibq.config.min_code_positions
    for img in job.images:
        check_grid((img.height // T.DOWNSAMPLE, img.width // T.DOWNSAMPLE), least, "image_area")
    strings = [IT.image_string(ibq.encode_codes(IT.to_pixels(img))[0].cpu()) for img in job.images]
    cond, unc = build_prompts(job, strings, tok)
    if job.task == "edit" and job.grid_from_reference:
        job.grid = IT.grid_in_prompt(unc)  # the output follows the last reference, parsed as officially
    if job.grid is not None:
        check_grid(job.grid, least, "width/height" if job.sized else "image_area")
    images, texts = [], []
    for item in range(job.batch):
        progress = RowProgress(listener, lambda codes: _pil(_decode(ibq, codes)), least)
        out = generate(model, cond, unc, job.params, seed=job.seed + item, max_new_tokens=job.max_new_tokens,
                       grid=job.grid, mode=MODE, device=device, on_token=progress)
        parsed = IT.parse_output(out.tokens, tok.decode_text)
        if not parsed.images:
            raise _no_image(job, out, parsed, tok)
        check_grid(tuple(parsed.images[0].shape), least, "aspect")  # a size the model chose itself ("auto")
        images.append(_decode(ibq, parsed.images[0]))
        progress.finish(images[-1])
        texts.append(parsed.text)
    return images, texts


def kv_bytes(model: Any, tokens: int, itemsize: int) -> int:
    """KV cache of both branches for ``tokens`` positions."""
    cfg = model.config
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * itemsize * 2 * tokens


def run_tokens(job: Emu35Job) -> int:
    """Longest sequence a run can reach: prompt (references included) + max_new_tokens."""
    per_ref = job.image_area // T.DOWNSAMPLE ** 2 + int(math.sqrt(job.image_area)) // T.DOWNSAMPLE + 8
    return job.max_new_tokens + len(job.images) * per_ref + PROMPT_ALLOWANCE


def check_memory(job: Emu35Job, model: Any, device: torch.device) -> None:
    """Refuse before generating when the KV cache of this run cannot fit next to the weights."""
    dtype = next(model.parameters()).dtype
    itemsize = 4 if dtype == torch.float32 else 2  # the cache is kept in the compute dtype
    need = kv_bytes(model, run_tokens(job), itemsize) + LOGITS_BYTES_PER_ROW * model.config.vocab_size * 2
    free = glue.free_memory_bytes(device)
    if need > free:
        raise MemoryEstimateError(
            f"{DISPLAY} max_new_tokens: the KV cache of this run needs about {need / 1e9:.1f} GB (got {free / 1e9:.1f} "
            f"GB free on {device}, expected at least the estimate for {run_tokens(job)} tokens x 2 branches). Lower "
            "max_new_tokens, image_area or the number of references, or free memory; nothing was allocated.")


def _no_image(job: Emu35Job, out: Any, parsed: IT.Parsed, tok: Any) -> GenerationError:
    produced = tok.decode_text(out.tokens).strip() or "(no text)"
    need = IT.tokens_needed(out.grid) if out.grid else None
    why = {"eos": "the model ended its answer", "limit": "max_new_tokens ran out"}.get(out.finished, out.finished)
    rows = 0 if parsed.partial is None else parsed.partial.shape[0]
    return GenerationError(
        f"{DISPLAY} max_new_tokens: no complete image ({why} after {len(out.tokens)} tokens with {rows} image rows; "
        f"got text {produced[:300]!r}, expected a complete image{f' of {need} tokens' if need else ''}). Raise "
        f"max_new_tokens in {SETTINGS_NODE}{f' to at least {need}' if need else ''}, or fix the prompt.")


def _split_plan(llm: Any, info: dict[str, str], job: Emu35Job, notes: list[str]) -> str | None:
    """Multi-GPU: spread the LLM's layers over every visible GPU (accelerate device map); the input device.

    None when one device serves the whole model (then the memory plan's none/model/block applies)."""
    if info.get("placement") != "auto" or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        if llm.placement.startswith("split@"):  # an earlier run split it: undo before the memory plan applies
            from accelerate.hooks import remove_hook_from_submodules  # noqa: PLC0415

            remove_hook_from_submodules(llm.value)
            llm.value.to("cpu")
            llm.placement = "cpu"
        return None
    from accelerate import dispatch_model  # noqa: PLC0415

    from ..modeling.emu35.placement import parse_budgets, plan_devices  # noqa: PLC0415

    budgets = parse_budgets(info["device_budgets"]) if info.get("device_budgets") else {
        f"cuda:{i}": int(torch.cuda.mem_get_info(i)[0]) for i in range(torch.cuda.device_count())}
    sizes = model_sizes(llm.value, job)
    plan = plan_devices(sizes, budgets)
    want = "split@" + plan.describe()
    if llm.placement != want:
        dispatch_model(llm.value, device_map=plan.device_map)
        llm.placement = want
    notes.append(f"LLM split over GPUs: {plan.describe()}")
    return plan.device_map["model.embed_tokens"]


def model_sizes(model: Any, job: Emu35Job) -> Any:
    """Byte sizes for the device planner: weights as they rest + the KV cache of this run (both branches)."""
    from ..modeling.emu35.placement import ModelSizes  # noqa: PLC0415

    def nbytes(module: torch.nn.Module) -> int:
        return sum(t.numel() * t.element_size() for t in module.state_dict().values())

    layers = len(model.model.layers)
    kv = kv_bytes(model, run_tokens(job), 2) // layers  # the cache is kept in bf16/fp16 on a GPU
    return ModelSizes(embed=nbytes(model.model.embed_tokens), layer=nbytes(model.model.layers[0]),
                      head=nbytes(model.lm_head) + nbytes(model.model.norm), layers=layers, kv_per_layer=kv,
                      reserve=SPLIT_RESERVE)
