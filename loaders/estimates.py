"""Memory and work estimates of a model from its ``ModelReport`` (loaders/headers.py): nothing is loaded.

The estimates follow how Gentor really runs a model:

- resting bytes: FP8 storage puts every 2-D weight (and its bias) of a layer not named by the backend's
  skip patterns in 1 byte; everything else rests in the compute dtype (diffusers' layerwise casting).
- peak host RAM while loading (streaming loads, DESIGN.md §5): every component's resting bytes plus the
  largest safetensors file being read (mapped) plus its biggest tensor copied out at its on-disk dtype
  before conversion, as all components stay cached.
- peak VRAM per offload mode: none = all resting bytes; model = the largest component; block = the
  largest component's non-block weights + two blocks (one computing, one prefetched); each plus the
  activations of one step (a transformer's working set: ``ACTIVATION_FACTOR`` hidden-sized tensors per
  token in the compute dtype, plus the KV cache of an autoregressive model).
- work: 2 FLOPs per weight per token (multiply-add) + attention 4·T·ctx·hidden per layer, per denoising
  step at a resolution (diffusion) or per generated token (autoregressive decoding).

One module for every caller: Gentor Inspect Model's report, the loaders' "will not fit" refusals
(``check_fits``), the weights a sampler still has to read (``resting_bytes``), the loader nodes' and the
panel's summary line (``summary``, GET /gentor/summary).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import MemoryEstimateError
from .headers import Component, ModelReport
from .memory import OFFLOAD_MODES, FP8, MemoryOptions, resolve

GIB = 1024**3
# Hidden-sized tensors alive per token during one transformer layer's forward (residual, norm output,
# q/k/v, attention output, the MLP's up/gate/down at ~4x width counted as 8): an upper-bound rule of thumb.
ACTIVATION_FACTOR = 16
DEFAULT_TEXT_TOKENS = 256  # prompt length assumed for estimates
PATCH_PIXELS = {"qwen_image": 16, "vlm": 28, "deepgen": 16, "bagel": 16, "emu35": 16}


@dataclass(frozen=True)
class Estimate:
    options: MemoryOptions
    resting_bytes: int
    peak_vram: int
    peak_host_load: int
    flops: float  # per step (diffusion) or per generated token (autoregressive)
    per: str  # "step at WxH" | "token"


def _bytes(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def resting_bytes(comp: Component, storage: torch.dtype, base: torch.dtype) -> int:
    fp8 = comp.castable if storage in FP8 else 0
    return fp8 * 1 + (comp.params - fp8) * _bytes(base)


def _tokens(report: ModelReport, width: int, height: int, images: int) -> int:
    patch = PATCH_PIXELS.get(report.backend, 16)
    return images * (width // patch) * (height // patch) + DEFAULT_TEXT_TOKENS


MAIN_ROLES = ("transformer", "model")  # the component that runs every step / token


def main_component(report: ModelReport) -> Component | None:
    """The denoiser or decoder (runs every step / token); else the largest component."""
    named = [c for c in report.components if c.role in MAIN_ROLES]
    return named[0] if named else max(report.components, key=lambda c: c.params, default=None)


def estimate(report: ModelReport, options: MemoryOptions, device: torch.device | None = None,
             width: int = 1024, height: int = 1024, images: int = 1) -> Estimate:
    """Peak VRAM, peak host RAM during load and work for one memory option at a resolution."""
    plan = resolve(options, device or torch.device("cuda"))
    base, storage = plan.precision.base, plan.precision.storage
    rest = {c.role: resting_bytes(c, storage, base) for c in report.components}
    total = sum(rest.values())
    main = main_component(report)
    tokens = _tokens(report, width, height, images)
    act = 0
    flops = 0.0
    if main is not None and main.hidden:
        act = tokens * main.hidden * ACTIVATION_FACTOR * _bytes(base)
        if main.autoregressive:
            act += tokens * main.kv_width * main.layers * _bytes(base)  # KV cache of the prompt
            ctx = tokens
            flops = 2.0 * main.params + 4.0 * ctx * main.hidden * main.layers  # one new token
        else:
            flops = 2.0 * main.params * tokens + 4.0 * tokens * tokens * main.hidden * main.layers
    if plan.offload == "none":
        weights = total
    elif plan.offload == "model":
        weights = max(rest.values(), default=0)
    else:
        biggest = main
        per_param = rest[biggest.role] / max(1, biggest.params) if biggest else 0
        block = int(biggest.block_params * per_param) if biggest else 0
        non_block = int((biggest.params - biggest.block_total) * per_param) if biggest else 0
        weights = non_block + 2 * block
    # Streaming: all components stay cached; the file being read is mapped, and its biggest tensor is copied
    # out at its on-disk dtype before conversion to the resting dtype.
    load_peak = total + max((c.largest_file + c.largest_tensor for c in report.components), default=0)
    per = "token" if main is not None and main.autoregressive else f"step at {width}x{height}"
    return Estimate(options, total, weights + act, load_peak, flops, per)


def estimates(report: ModelReport, device: torch.device | None = None, width: int = 1024, height: int = 1024,
              weight_dtypes: tuple[str, ...] = ("bf16", "fp8_e4m3fn")) -> list[Estimate]:
    """One estimate per (weight dtype, offload mode)."""
    return [estimate(report, MemoryOptions(weight_dtype=w, offload=o), device, width, height)
            for w in weight_dtypes for o in OFFLOAD_MODES]


def human_count(n: int) -> str:
    """12345678 -> '12.3M' (parameter and FLOP counts in messages; B = billion)."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def human_flops(n: float) -> str:
    for scale, unit in ((1e15, "PFLOP"), (1e12, "TFLOP"), (1e9, "GFLOP"), (1e6, "MFLOP")):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} FLOP"


def human_bytes(n: int) -> str:
    for scale, unit in ((GIB, "GiB"), (1024**2, "MiB"), (1024, "KiB")):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def summary(report: ModelReport, options: MemoryOptions | None = None) -> str:
    """One line for loader nodes: variant, parameters, resting size under the chosen options."""

    e = estimate(report, options or MemoryOptions())
    return (f"{report.variant}: {human_count(report.params)} params, {human_bytes(e.resting_bytes)} resting, "
            f"~{human_bytes(e.peak_vram)} peak VRAM ({e.options.weight_dtype}, offload {e.options.offload})")


def check_fits(report: ModelReport, options: MemoryOptions, device: torch.device, free_bytes: int,
               input_name: str = "memory", width: int = 1024, height: int = 1024, images: int = 1) -> Estimate:
    """The shared "too large for this device" refusal: raise before allocating when the estimate does not fit."""
    e = estimate(report, options, device, width, height, images)
    if device.type != "cpu" and e.peak_vram > free_bytes:
        cheaper = [estimate(report, MemoryOptions(weight_dtype=w, offload=o), device, width, height, images)
                   for w in ("bf16", "fp8_e4m3fn") for o in OFFLOAD_MODES]
        cheaper = [x for x in cheaper if x.peak_vram <= free_bytes]
        hint = (f"Use weight_dtype={cheaper[0].options.weight_dtype} with offload={cheaper[0].options.offload} "
                f"(~{cheaper[0].peak_vram / GIB:.1f} GiB)" if cheaper else "No memory option fits: use a smaller "
                "variant or a larger GPU")
        raise MemoryEstimateError(
            f"{report.display} {input_name}: {report.variant} will not fit on {device} (got an estimated peak of "
            f"{e.peak_vram / GIB:.1f} GiB, expected at most the {free_bytes / GIB:.1f} GiB free). {hint}.")
    return e
