"""Where each part of the Emu3.5 LLM goes when it is split over devices: a pure planning function.

Input: byte sizes (embedding, one decoder layer, final norm + head, the KV cache one layer needs for
the run, a per-device working reserve) and per-device budgets in priority order. Output: an
accelerate-style device map. The embedding sits on the first device (where the token ids enter), the
layers fill the devices in order, and the final norm + head sit with the last layer (where the hidden
state leaves), so activations cross each device boundary once per token. A budget set that cannot hold
the model is refused with the plan's numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import MemoryEstimateError

GB = 1e9
DISPLAY = "Emu3.5"


@dataclass(frozen=True)
class ModelSizes:
    embed: int  # model.embed_tokens
    layer: int  # one model.layers.i (weights)
    head: int  # model.norm + lm_head
    layers: int  # number of decoder layers
    kv_per_layer: int = 0  # KV cache of one layer for the longest run expected
    reserve: int = 0  # working memory kept free on every device used (activations, logits)


@dataclass(frozen=True)
class DevicePlan:
    device_map: dict[str, str]  # module name -> device
    used: dict[str, int]  # device -> planned bytes (weights + KV + reserve)
    layers_per_device: dict[str, int]

    def describe(self) -> str:
        return ", ".join(f"{d}: {n} layers, {self.used[d] / GB:.2f} GB" for d, n in self.layers_per_device.items())


def _refuse(sizes: ModelSizes, budgets: dict[str, int], why: str) -> MemoryEstimateError:
    per_layer = sizes.layer + sizes.kv_per_layer
    total = sizes.embed + sizes.head + sizes.layers * per_layer + sizes.reserve
    given = ", ".join(f"{d}={b / GB:.2f}" for d, b in budgets.items())
    return MemoryEstimateError(
        f"{DISPLAY} device_budgets: the model does not fit ({why}; got budgets {given} GB = "
        f"{sum(budgets.values()) / GB:.2f} GB, expected at least {total / GB:.2f} GB: embedding "
        f"{sizes.embed / GB:.2f} + {sizes.layers} layers x {per_layer / GB:.3f} (weights {sizes.layer / GB:.3f} + KV "
        f"{sizes.kv_per_layer / GB:.3f}) + norm/head {sizes.head / GB:.2f} + reserve {sizes.reserve / GB:.2f} per "
        "device). Raise the budgets, add a device, store the weights in FP8, or use block offload on one GPU.")


def plan_devices(sizes: ModelSizes, budgets: dict[str, int]) -> DevicePlan:
    """Layers -> devices under ``budgets`` (device -> bytes, in the order devices should be used)."""
    if not budgets:
        raise _refuse(sizes, budgets, "no device budget given")
    per_layer = sizes.layer + sizes.kv_per_layer
    devices = list(budgets)
    device_map: dict[str, str] = {}
    used: dict[str, int] = {}
    counts: dict[str, int] = {}
    next_layer = 0
    for index, dev in enumerate(devices):
        room = budgets[dev] - sizes.reserve - (sizes.embed if index == 0 else 0)
        if room < 0:
            raise _refuse(sizes, budgets, f"{dev} cannot hold its fixed share")
        left = sizes.layers - next_layer
        if left * per_layer + sizes.head <= room:
            take, head_here = left, True  # the rest and the head fit: this is the last device
        else:
            take, head_here = min(left, room // per_layer), False
        for i in range(next_layer, next_layer + take):
            device_map[f"model.layers.{i}"] = dev
        next_layer += take
        counts[dev] = take
        used[dev] = sizes.reserve + take * per_layer + (sizes.embed if index == 0 else 0)
        if index == 0:
            device_map["model.embed_tokens"] = dev
            device_map["model.rotary_emb"] = dev
        if head_here:
            device_map["model.norm"] = dev
            device_map["lm_head"] = dev
            used[dev] += sizes.head
            return DevicePlan(device_map, used, counts)
    raise _refuse(sizes, budgets, f"{next_layer} of {sizes.layers} layers placed")


def parse_budgets(text: str) -> dict[str, int]:
    """``"cuda:0=70, cuda:1=75.5"`` (GB) -> {device: bytes}; order kept."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep:
            raise ValueError(part)
        out[name.strip()] = int(float(value) * GB)
    return out
