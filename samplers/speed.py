"""Speed options (step caches, attention backend, compiled blocks), applied for ONE run and removed after it.

One mechanism for every diffusion backend (DESIGN.md §9), built on the libraries' own hooks:

- step cache ``first_block``: diffusers' FirstBlockCache (the rest of the blocks is skipped while the first
  block's residual changes by less than ``threshold``); ``taylorseer``: diffusers' TaylorSeer cache in its
  lite form (every block skipped between full steps, the output extrapolated by a Taylor series in the
  step index, as Bagel PR #232 does for BAGEL). A DiT (Qwen-Image, DeepGen) gets the hooks on its blocks;
  BAGEL's velocity call (a function, not a module) is wrapped in a one-line module that gets the TaylorSeer
  hook (``velocity_cache``).
- attention backend: diffusers' ``set_attention_backend``, restored per processor afterwards.
- compiled blocks: ``nn.Module.compile`` on each repeated block (what ``compile_repeated_blocks`` does,
  also for models that do not declare ``_repeated_blocks``), undone afterwards.

The cached model is shared by every sampler: everything above is taken off in ``finally`` (also after
Cancel or an error), so a later run without Speed Options computes exactly what it computed before.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..errors import InputError, fmt

NODE = "Gentor Speed Options"
CACHES = ("off", "first_block", "taylorseer")
# Listed in the node; "auto" leaves the model's own choice. Hub kernels (downloaded at run time) are left out:
# nothing is fetched from the network while generating.
ATTENTION_BACKENDS = ("auto", "native", "_native_math", "flex", "_native_flash", "_native_efficient",
                      "_native_cudnn", "flash", "_flash_3", "sage", "xformers")
CUDA_ONLY = frozenset({"_native_flash", "_native_efficient", "_native_cudnn", "flash", "_flash_3", "sage",
                       "xformers"})
DEFAULT_THRESHOLD = 0.05  # diffusers' FirstBlockCache default
DEFAULT_INTERVAL = 4  # TaylorSeer: one full step, then 3 extrapolated
DEFAULT_WARMUP = 3  # steps always computed at the start (diffusers' TaylorSeer default)
MAX_THRESHOLD = 1.0
MAX_INTERVAL = 20
MAX_STEPS_RANGE = 200
TAYLOR_ORDER = 1  # diffusers' default; order 2 needs three full steps before its first prediction
AS_TUPLE_HOOK = "gentor_speed_as_tuple"


@dataclass(frozen=True)
class SpeedOptions:
    """What the GentorSpeedOptions node outputs (the GENTOR_SPEED socket)."""

    cache: str = "off"
    threshold: float = DEFAULT_THRESHOLD  # first_block: 0 = never skip
    interval: int = DEFAULT_INTERVAL  # taylorseer: a full step every N steps; 1 = never extrapolate
    warmup_steps: int = DEFAULT_WARMUP  # always computed at the start
    last_steps: int = 0  # always computed at the end
    attention: str = "auto"
    compile_blocks: bool = False

    def __post_init__(self) -> None:
        for name, value, allowed in (("cache", self.cache, CACHES), ("attention", self.attention,
                                                                       ATTENTION_BACKENDS)):
            if value not in allowed:
                raise InputError(fmt(NODE, name, "unknown value", repr(value), " / ".join(allowed),
                                     "Pick one of the listed values"))
        for name, value, lo, hi in (("threshold", self.threshold, 0.0, MAX_THRESHOLD),
                                    ("interval", self.interval, 1, MAX_INTERVAL),
                                    ("warmup_steps", self.warmup_steps, 0, MAX_STEPS_RANGE),
                                    ("last_steps", self.last_steps, 0, MAX_STEPS_RANGE)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise InputError(fmt(NODE, name, "out of range", repr(value), f"a number in [{lo}, {hi}]",
                                     "Use a value inside the range the node shows"))

    @property
    def active(self) -> bool:
        return self.cache != "off" or self.attention != "auto" or self.compile_blocks


@dataclass
class Report:
    """What a run did: transformer passes called / fully computed, the attention backend, notes."""

    cache: str = "off"
    attention: str = "auto"
    branches: int = 1
    calls: int = 0
    computed: int = 0
    compiled_blocks: int = 0
    unit: str = ""  # what a pass is, when not one transformer pass per step and branch
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        """The text-output lines ("computed N of M steps", the backend); none when no option was set."""
        out = list(self.notes)
        if self.cache != "off":
            if self.unit:
                out.append(f"step cache {self.cache}: computed {self.computed} of {self.calls} {self.unit}")
            elif self.branches > 1:
                out.append(f"step cache {self.cache}: computed {self.computed} of {self.calls} transformer passes "
                           f"({self.calls // self.branches} steps x {self.branches} guidance branches)")
            else:
                out.append(f"step cache {self.cache}: computed {self.computed} of {self.calls} steps")
        if self.attention != "auto":
            out.append(f"attention backend: {self.attention}")
        if self.compiled_blocks:
            out.append(f"compiled {self.compiled_blocks} repeated blocks (torch.compile)")
        return out


@dataclass(frozen=True)
class Support:
    """What a backend / engine / memory plan can apply; each ``no_*`` is the reason it cannot ('' = it can)."""

    caches: tuple[str, ...] = ()
    no_cache: str = ""  # why the caches outside ``caches`` are refused
    no_attention: str = ""
    no_compile: str = ""


def check_usable(options: SpeedOptions | None, display: str, device: torch.device, support: Support) -> None:
    """Refuse options this backend / device cannot apply, naming the input (before any weight is read)."""
    if options is None or not options.active:
        return
    if options.cache != "off" and options.cache not in support.caches:
        raise InputError(fmt(display, "speed cache", f"this run cannot use that step cache ({support.no_cache})",
                             repr(options.cache), " / ".join(("off", *support.caches)),
                             f"Pick another cache in {NODE}, or disconnect it"))
    if options.attention != "auto":
        reason = support.no_attention or attention_unusable(options.attention, device)
        if reason:
            raise InputError(fmt(display, "speed attention", reason, repr(options.attention),
                                 "a backend usable here", f"Pick another one in {NODE} (auto always works)"))
    if options.compile_blocks and support.no_compile:
        raise InputError(fmt(display, "speed compile_blocks", f"this run cannot compile its blocks "
                             f"({support.no_compile})", True, False, f"Switch compile_blocks off in {NODE}"))


DIT_CACHES = ("first_block", "taylorseer")
BLOCK_OFFLOAD_WHY = ("block offload streams the blocks in the order of the first pass, and skipped or compiled "
                     "blocks break that order; use offload none or model with these options")


def cfg_branches(cfg: float) -> int:
    """Transformer passes per step for samplers that call the guidance branches one by one (true CFG)."""
    return 2 if cfg > 1.0 else 1


def engine_support(engine: str, plan, caches: tuple[str, ...] = DIT_CACHES,  # noqa: ANN001 - memory.Plan
                   no_cache: str = "") -> Support:
    """What a diffusers DiT run (Qwen-Image, DeepGen) can apply with this engine and memory plan; ``caches`` /
    ``no_cache``: the step caches the model itself takes, and why not the others."""
    if engine == "diffsynth":
        why = ("the DiffSynth engine runs its own model function, not diffusers' hooks; set engine to diffusers "
               "in the loader to use Speed Options")
        return Support((), why, why, why)
    block = plan.offload == "block"
    cuda_block = block and plan.device.type == "cuda"
    return Support(() if cuda_block else caches, BLOCK_OFFLOAD_WHY if cuda_block else no_cache, "",
                   BLOCK_OFFLOAD_WHY if block else "")


def attention_unusable(name: str, device: torch.device) -> str:
    """Why diffusers' attention backend ``name`` cannot run on ``device`` here ('' when it can)."""
    if name == "auto":
        return ""
    if name in CUDA_ONLY and device.type != "cuda":
        return f"it needs a CUDA GPU (this run is on {device.type})"
    from diffusers.models.attention_dispatch import (AttentionBackendName,  # noqa: PLC0415
                                                     _check_attention_backend_requirements)

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ImportError, ValueError) as exc:  # the library names the missing package
        return f"not installed ({str(exc).splitlines()[0][:200]})"
    return ""


def usable_attention(device: torch.device) -> dict[str, str]:
    """Every listed backend -> '' when usable on ``device``, else the reason (for docs and the GPU suite)."""
    return {name: attention_unusable(name, device) for name in ATTENTION_BACKENDS}


# ----------------------------------------------------------------------------- diffusers DiTs
def _blocks(module: torch.nn.Module) -> list[torch.nn.Module]:
    names = set(getattr(module, "_repeated_blocks", None) or getattr(module, "_no_split_modules", None) or ())
    return [m for m in module.modules() if type(m).__name__ in names]


def _first_leaf(block: torch.nn.Module) -> torch.nn.Module:
    # A leaf inside the block runs only when the block really computes: the cache hooks replace the
    # block's forward, so a hook on the block itself would count skipped passes too. A LoRA's own layers are
    # passed over (an adapter switched off for this run is not called).
    return next(m for name, m in block.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in name)


def _cache_config(options: SpeedOptions, steps: int):  # noqa: ANN202 - a diffusers config object
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig  # noqa: PLC0415

    if options.cache == "first_block":
        return FirstBlockCacheConfig(threshold=options.threshold)
    return TaylorSeerCacheConfig(cache_interval=options.interval, disable_cache_before_step=options.warmup_steps,
                                 disable_cache_after_step=max(0, steps - options.last_steps) if options.last_steps
                                 else None, max_order=TAYLOR_ORDER, taylor_factors_dtype=torch.float32,
                                 use_lite_mode=True)


def _fbc_head_hooks(module: torch.nn.Module) -> list:
    from diffusers.hooks.first_block_cache import _FBC_LEADER_BLOCK_HOOK  # noqa: PLC0415

    hooks = []
    for sub in module.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        hook = registry.get_hook(_FBC_LEADER_BLOCK_HOOK) if registry is not None else None
        if hook is not None:
            hooks.append(hook)
    return hooks


@contextlib.contextmanager
def applied(module: torch.nn.Module, options: SpeedOptions | None, display: str, steps: int,
            branches: int = 1, whole_model: bool = False) -> Iterator[Report]:
    """Apply ``options`` to a diffusers transformer for one run of ``steps`` steps (``branches`` transformer
    passes per step, one per guidance branch called separately); take everything off afterwards.
    ``whole_model``: TaylorSeer extrapolates the model's output instead of skipping its blocks one by one."""
    report = Report(branches=branches)
    if options is None or not options.active:
        yield report
        return
    from diffusers.hooks.hooks import CacheContext, _set_cache_context  # noqa: PLC0415

    undo: list[Callable[[], None]] = []
    try:
        if options.attention != "auto":
            undo.append(_set_attention(module, options.attention, display))
            report.attention = options.attention
        if options.cache != "off":
            blocks = _blocks(module)
            if not blocks:
                raise InputError(fmt(display, "speed cache", "the transformer declares no repeated blocks",
                                     type(module).__name__, "a diffusers DiT", f"Set cache to off in {NODE}"))
            bare = [m for m in module.modules() if getattr(m, "_diffusers_hook", None) is None]
            # Registered first: a failure half-way through hooking still takes off what was put on.
            undo.append(functools.partial(_disable_cache, module, options.cache, bare))
            try:
                _enable_cache(module, options, steps, whole_model)
            except ValueError as exc:  # diffusers does not know this block class
                raise InputError(fmt(display, "speed cache", f"diffusers cannot hook this model ({exc})",
                                     repr(options.cache), "off", f"Set cache to off in {NODE}")) from exc
            # Samplers that do not name their passes (DeepGen's loop) run in one context; pipelines set theirs.
            _set_cache_context(module, CacheContext("gentor"))
            report.cache = options.cache
            undo.extend(_count(module, _first_leaf(blocks[-1]), report, options, branches, steps))
        if options.compile_blocks:
            undo.append(_compile(module, report))
        yield report
    finally:
        for step in reversed(undo):
            step()


def _hook_names(cache: str) -> tuple[str, ...]:
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK  # noqa: PLC0415
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK  # noqa: PLC0415

    return (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK) if cache == "first_block" else (AS_TUPLE_HOOK,
                                                                                      _TAYLORSEER_CACHE_HOOK)


@functools.lru_cache(maxsize=1)
def _as_tuple_hook_type() -> type:
    from diffusers.hooks import ModelHook  # noqa: PLC0415

    class AsTuple(ModelHook):
        """Outermost hook: a bare tensor (TaylorSeer's prediction) back into the model's ``(out,)`` tuple."""

        def post_forward(self, module: torch.nn.Module, output):  # noqa: ANN001, ANN201
            return (output,) if isinstance(output, torch.Tensor) else output

    return AsTuple


def _as_tuple_hook():  # noqa: ANN202
    return _as_tuple_hook_type()()


def _enable_cache(module: torch.nn.Module, options: SpeedOptions, steps: int, whole_model: bool) -> None:
    # The library's apply_* functions, as ModelMixin.enable_cache calls them; not every DiT class mixes in
    # CacheMixin (SD3's, under DeepGen, does not).
    from diffusers.hooks import HookRegistry, apply_first_block_cache, apply_taylorseer_cache  # noqa: PLC0415

    config = _cache_config(options, steps)
    if options.cache == "first_block":
        apply_first_block_cache(module, config)
    elif whole_model:
        # The whole forward is the extrapolated unit (as Bagel PR #232 caches BAGEL's velocity); its predicted
        # output comes back as a bare tensor, so an outer hook restores the model's ``(out,)`` tuple.
        apply_taylorseer_cache(module, dataclasses.replace(config, cache_identifiers=["^$"], use_lite_mode=False))
        HookRegistry.check_if_exists_or_initialize(module).register_hook(_as_tuple_hook(), AS_TUPLE_HOOK)
    else:
        apply_taylorseer_cache(module, config)
    # New hooks on the blocks stale the registry's list of child registries (cache_context walks it).
    HookRegistry.check_if_exists_or_initialize(module).invalidate_child_registries_cache()


def _disable_cache(module: torch.nn.Module, cache: str, bare: list[torch.nn.Module]) -> None:
    from diffusers.hooks import HookRegistry  # noqa: PLC0415
    from diffusers.hooks.hooks import _set_cache_context  # noqa: PLC0415

    _set_cache_context(module, None)
    registry = HookRegistry.check_if_exists_or_initialize(module)
    for name in _hook_names(cache):
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()
    for sub in bare:  # the registries the cache hooks created, now empty: gone, as before the run
        registry = getattr(sub, "_diffusers_hook", None)
        if registry is not None and not registry.hooks:
            del sub._diffusers_hook


def _count(module: torch.nn.Module, leaf: torch.nn.Module, report: Report, options: SpeedOptions, branches: int,
           steps: int) -> list[Callable[[], None]]:
    """Count passes and computed passes; hold FirstBlockCache to "always compute" inside the warm-up and
    last-steps ranges (diffusers' FirstBlockCache has no such range; threshold 0 never skips)."""
    heads = _fbc_head_hooks(module) if options.cache == "first_block" else []
    first_last = max(0, steps - options.last_steps)

    def on_call(*_args) -> None:
        step = report.calls // max(1, branches)
        report.calls += 1
        forced = step < options.warmup_steps or step >= first_last
        for hook in heads:
            hook.threshold = 0.0 if forced else options.threshold

    def on_compute(*_args) -> None:
        report.computed += 1

    handles = [module.register_forward_pre_hook(on_call), leaf.register_forward_pre_hook(on_compute)]
    return [h.remove for h in handles]


def _set_attention(module: torch.nn.Module, name: str, display: str) -> Callable[[], None]:
    processors = [m.processor for m in module.modules() if hasattr(getattr(m, "processor", None),
                                                                    "_attention_backend")]
    if not processors:
        raise InputError(fmt(display, "speed attention", "this model's attention does not go through diffusers' "
                             "dispatcher", repr(name), "auto", f"Set attention to auto in {NODE}"))
    before = [(p, p._attention_backend) for p in processors]
    module.set_attention_backend(name)

    def restore() -> None:
        for processor, value in before:
            processor._attention_backend = value
    return restore


def _compile(module: torch.nn.Module, report: Report) -> Callable[[], None]:
    blocks = _blocks(module)
    for block in blocks:
        block.compile()
    report.compiled_blocks = len(blocks)

    def restore() -> None:
        for block in blocks:
            block._compiled_call_impl = None
    return restore


def speed_state(module: torch.nn.Module) -> dict:
    """What Speed Options could leave behind on a module (for tests: equal before and after a run)."""
    registries = {name: tuple(sub._diffusers_hook.hooks) for name, sub in module.named_modules()
                  if getattr(sub, "_diffusers_hook", None) is not None}
    return {"hooks": registries,
            "torch_hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in module.modules()),
            "compiled": sum(m._compiled_call_impl is not None for m in module.modules()),
            "attention": [getattr(getattr(m, "processor", None), "_attention_backend", None)
                          for m in module.modules()],
            "forwards": [m.forward for m in module.modules()]}


# ----------------------------------------------------------------------------- a velocity function (BAGEL)
class _Velocity(torch.nn.Module):
    """The one module the TaylorSeer hook sits on: its forward is the sampler's velocity call."""

    def __init__(self, fn: Callable[..., torch.Tensor], report: Report) -> None:
        super().__init__()
        self.fn, self.report = fn, report

    def forward(self, *args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
        self.report.computed += 1
        return self.fn(*args, **kwargs)


def velocity_cache(fn: Callable[..., torch.Tensor], options: SpeedOptions | None, steps: int,
                   step_key: Callable[..., object], report: Report) -> Callable[..., torch.Tensor]:
    """Wrap a velocity function for ONE sampling loop with diffusers' TaylorSeer hook.

    Guidance branches are told apart by their order within a step (``step_key(*args)`` changes once per
    step), each with its own Taylor state. Counts go to ``report``; the model itself is not touched."""
    if options is None or options.cache == "off":
        return fn
    from diffusers.hooks import apply_taylorseer_cache  # noqa: PLC0415
    from diffusers.hooks.hooks import CacheContext, _set_cache_context  # noqa: PLC0415

    wrapper = _Velocity(fn, report)
    apply_taylorseer_cache(wrapper, dataclasses.replace(_cache_config(options, steps), cache_identifiers=["^$"],
                                                        use_lite_mode=False))
    report.cache, report.unit = options.cache, "velocity passes (every guidance branch counted)"
    where = {"key": None, "branch": 0}

    def call(*args, **kwargs) -> torch.Tensor:  # noqa: ANN002, ANN003
        key = step_key(*args, **kwargs)
        where["branch"] = where["branch"] + 1 if key == where["key"] else 0
        where["key"] = key
        report.calls += 1
        _set_cache_context(wrapper, CacheContext(f"branch{where['branch']}"))
        return wrapper(*args, **kwargs)

    return call


@functools.lru_cache(maxsize=1)
def compiler_available() -> str:
    """'' when torch.compile can build CPU kernels here (inductor needs a C++ compiler), else the reason."""
    import shutil  # noqa: PLC0415

    return "" if shutil.which("g++") or shutil.which("c++") or shutil.which("clang++") else \
        "no C++ compiler on PATH (torch.compile's inductor builds its CPU kernels with one)"
