"""KV-cached two-branch generation (conditional + unconditional) for Emu3.5.

The conditional branch runs on the prompt and everything generated; the unconditional branch on the
unconditional prompt plus every image-mode token (``logits`` module docstring). Three ways to compute
the same logits:

- ``batched`` (default): both branches are rows of ONE forward per token over one KV cache. The
  prompts are left-padded to one length; a text-mode step feeds the unconditional row a masked
  placeholder, so its cache has a hole that attention never sees.
- ``separate``: two caches, two forwards per image-mode token (one in text mode).
- ``uncached``: every step re-runs both full sequences (the slow reference the tests and the
  benchmark compare against).
- ``static``: ``batched`` over transformers' ``StaticCache`` (both rows, room for prompt +
  ``max_new_tokens``) with a full-length mask: every decode step has the same shapes, so it can be
  compiled / captured as a CUDA graph (``compile_step``). On a CPU each step attends over the whole
  buffer (masked), which costs more than the growing cache; the tokens are the same.

The caches are transformers' ``DynamicCache`` with layers that append in place into buffers sized for
the prompt + ``max_new_tokens`` (``kv_cache``), instead of re-concatenating every layer's K/V on every
token.

Sampling: each new token consumes one uniform draw from a CPU ``torch.Generator`` seeded with the
run's seed (inverse-CDF sampling over the processed distribution), so the random stream does not
depend on the device; the same seed and inputs give the same tokens on the same machine.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ...errors import GentorError
from . import tokens as T
from .kv_cache import new_cache
from .logits import VISUAL, SamplingParams, Structure, process, sample

MODES = ("batched", "separate", "uncached", "static")


@dataclass
class GenerationOutput:
    tokens: list[int]  # generated ids (prompt excluded)
    finished: str  # "eos", "image" (stopped after the requested images), "limit" (max_new_tokens)
    grid: tuple[int, int] | None = None
    images: int = 0


@dataclass
class StepInfo:
    """Passed to the per-token callback."""

    token: int
    count: int  # tokens generated so far
    image_mode: bool
    rows_done: int  # completed rows of the current image
    grid: tuple[int, int] | None
    tokens: list[int] = field(repr=False, default_factory=list)


class Branches:
    """Next-token logits of both branches; the uncond branch advances only when told to."""

    def __init__(self, model: Any, cond: list[int], uncond: list[int], mode: str, device: torch.device,
                 new_tokens: int = 0) -> None:
        if mode not in MODES:
            raise GentorError(f"Emu3.5 generation mode: unknown mode (got {mode!r}, expected one of {MODES}). "
                              "Report this as a bug.")
        self.model, self.mode, self.device = model, mode, device
        self.new_tokens = new_tokens  # tokens after the prompts the KV buffers have room for (they grow beyond)
        self.cond, self.uncond = list(cond), list(uncond)
        self.cache: Any = None
        self.ucache: Any = None
        self.ones = torch.ones(2, 1, dtype=torch.long, device=device)
        self.one_zero = torch.tensor([[1], [0]], device=device)

    def _run(self, ids: list[list[int]], cache: Any, **kw: Any) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor(ids, device=self.device), past_key_values=cache,
                         use_cache=cache is not None, logits_to_keep=1, **kw)
        return out.logits[:, -1].float()

    def _new_cache(self, prompt: int) -> Any:
        if self.mode == "static":
            from transformers import StaticCache  # noqa: PLC0415

            return StaticCache(config=self.model.config, max_cache_len=prompt + self.new_tokens + 1)
        return new_cache(self.model.config, prompt + self.new_tokens + 1)

    def prefill(self, feed_u: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Run the prompts; ``feed_u``: the prompt's last token already belongs to the image (BOI)."""
        if feed_u:
            self.uncond.append(self.cond[-1])
        if self.mode == "static":
            return self._static_prefill(feed_u)
        if self.mode == "batched":
            n = max(len(self.cond), len(self.uncond))
            # The mask lives on the device and grows by one column per token (no host copy of it per step).
            self.mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in (self.cond, self.uncond)],
                                     device=self.device)
            self.pos = [len(self.cond), len(self.uncond)]
            self.cache = self._new_cache(n)
            rows = [[T.PAD] * (n - len(s)) + s for s in (self.cond, self.uncond)]
            pos = (self.mask.cumsum(1) - 1).clamp(min=0)  # each row counts from its first real token
            out = self._run(rows, self.cache, attention_mask=self.mask, position_ids=pos)
            return out[0], out[1] if feed_u else None
        if self.mode == "separate":
            self.cache = self._new_cache(len(self.cond))
        c = self._run([self.cond], self.cache)[0]
        return c, self._uncond() if feed_u else None

    def _uncond(self) -> torch.Tensor:
        if self.mode == "uncached":
            return self._run([self.uncond], None)[0]
        if self.ucache is None:  # first image-mode token: prefill the unconditional prompt + it
            self.ucache = self._new_cache(len(self.uncond))
            return self._run([self.uncond], self.ucache)[0]
        return self._run([[self.uncond[-1]]], self.ucache)[0]

    def step(self, token: int, feed_u: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Append ``token`` to the cond branch (and to the uncond one when ``feed_u``)."""
        self.cond.append(token)
        if feed_u:
            self.uncond.append(token)
        if self.mode == "static":
            return self._static_step(token, feed_u)
        if self.mode == "batched":
            # One forward for both rows; a row not advancing gets a masked placeholder (a hole in its cache).
            column = self.ones if feed_u else self.one_zero
            self.mask = torch.cat([self.mask, column], dim=1)
            pos = torch.tensor([[self.pos[0]], [self.pos[1]]], device=self.device)
            self.pos[0] += 1
            self.pos[1] += int(feed_u)
            out = self._run([[token], [token if feed_u else T.PAD]], self.cache, attention_mask=self.mask,
                            position_ids=pos)
            return out[0], out[1] if feed_u else None
        if self.mode == "uncached":
            c = self._run([self.cond], None)[0]
        else:
            c = self._run([[token]], self.cache)[0]
        return c, self._uncond() if feed_u else None


    # -- static: fixed shapes per decode step ----------------------------------------------------------
    def _static_prefill(self, feed_u: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        n = max(len(self.cond), len(self.uncond))
        self.cache = self._new_cache(n)
        self.size = size = n + self.new_tokens + 1  # the StaticCache's max_cache_len
        # The mask covers the whole buffer from the start (unused columns 0): one shape for every step.
        self.mask = torch.zeros(2, size, dtype=torch.long, device=self.device)
        for row, seq in enumerate((self.cond, self.uncond)):
            self.mask[row, n - len(seq):n] = 1
        self.pos = [len(self.cond), len(self.uncond)]
        self.filled = n
        rows = [[T.PAD] * (n - len(s)) + s for s in (self.cond, self.uncond)]
        pos = (self.mask[:, :n].cumsum(1) - 1).clamp(min=0)
        out = self._run(rows, self.cache, attention_mask=self.mask[:, :n], position_ids=pos,
                        cache_position=torch.arange(n, device=self.device))
        return out[0], out[1] if feed_u else None

    def _static_step(self, token: int, feed_u: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.filled >= self.size:
            raise GentorError(f"Emu3.5 max_new_tokens: the static KV cache is full (got {self.filled} positions, "
                              f"expected at most {self.size}). Report this as a bug.")
        self.mask[0, self.filled] = 1
        self.mask[1, self.filled] = int(feed_u)
        ids = torch.tensor([[token], [token if feed_u else T.PAD]], device=self.device)
        pos = torch.tensor([[self.pos[0]], [self.pos[1]]], device=self.device)
        where = torch.tensor([self.filled], device=self.device)
        self.pos[0] += 1
        self.pos[1] += int(feed_u)
        self.filled += 1
        out = self.step_fn(ids, pos, where)
        return out[0], out[1] if feed_u else None

    def step_fn(self, ids: torch.Tensor, pos: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
        """One static decode step (the part ``compile_step`` compiles)."""
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1,
                         attention_mask=self.mask, position_ids=pos, cache_position=where)
        return out.logits[:, -1].float()


def uniform_draws(seed: int) -> Callable[[], float]:
    """One U[0,1) number per call from a CPU generator seeded with ``seed``."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    return lambda: float(torch.rand((), generator=gen, dtype=torch.float64))


@torch.no_grad()
def generate(model: Any, cond: list[int], uncond: list[int] | None, params: SamplingParams, *, seed: int,
             max_new_tokens: int, grid: tuple[int, int] | None = None, stop_after_images: int | None = 1,
             mode: str = "batched", device: torch.device | None = None,
             on_token: Callable[[StepInfo], None] | None = None, compile_step: bool = False) -> GenerationOutput:
    """Generate after ``cond`` with CFG against ``uncond``; ``grid`` fixes the image size in tokens.

    ``on_token`` runs after every token (progress, previews, cancel: raising there stops the run).
    Stops at EOS, after ``stop_after_images`` complete images, or at ``max_new_tokens``.
    ``compile_step`` (mode ``static``): the decode step through ``torch.compile`` ("reduce-overhead": CUDA
    graphs on a GPU), compiled on its first call.
    """
    device = device or next(model.parameters()).device
    guided = uncond is not None  # None: no guidance branch at all (a single-branch baseline)
    state = Structure(grid)
    state.advance(cond[-1])
    # KV buffers sized for the run's limit (what the sampler's memory check reserved): they never grow here.
    branches = Branches(model, cond, uncond or [], mode if guided else "separate", device, max_new_tokens)
    if compile_step:
        if branches.mode != "static":
            raise GentorError(f"Emu3.5 generation mode: compile_step needs the static cache (got mode {mode!r}, "
                              "expected 'static'). Report this as a bug.")
        branches.step_fn = torch.compile(branches.step_fn, mode="reduce-overhead", dynamic=False)
    logits_c, logits_u = branches.prefill(feed_u=state.image_mode and guided)
    draw = uniform_draws(seed)
    out: list[int] = []
    finished = "limit"
    for _ in range(max_new_tokens):
        rule = state.rule()
        scores = process(rule, logits_c, logits_u if rule[0] == VISUAL else None, params)
        token = sample(scores, draw)
        out.append(token)
        state.advance(token)
        feed_u = guided and (state.image_mode or token == T.EOI)
        if on_token is not None:
            on_token(StepInfo(token, len(out), state.image_mode, state.rows_done, state.grid, out))
        if token == T.EOS:
            finished = "eos"
            break
        if token == T.EOI and stop_after_images and state.images >= stop_after_images:
            finished = "image"
            break
        if len(out) == max_new_tokens:
            break
        logits_c, logits_u = branches.step(token, feed_u)
    return GenerationOutput(out, finished, state.grid, state.images)
