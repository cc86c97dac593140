"""Emu3.5 logits processing: structure rules, CFG in log-prob space, differential top-k/top-p.

What the official processor does (``src/utils/logits_processor.py``, "no_text" guidance), restated:

- Text mode: visual ids (>= BOV) are masked; text top-k / top-p / temperature.
- After BOI the image header ``h*w`` then IMG: forced to the known grid (T2I preset, X2I last reference,
  or the grid of an earlier image), or free digits in "auto" mode (1-9, 0-9, '*', 1-9, 0-9, then IMG).
- After IMG, the t-th token (t = 1, 2, …): t == h*(w+1) -> EOI; t % (w+1) == 0 -> EOL; otherwise a
  visual token: CFG l = log_softmax(u) + s * (log_softmax(c) - log_softmax(u)), non-visual ids masked.
- Every image-mode position (header, rows, EOL, EOI) uses the image top-k / top-p / temperature; a
  forced position keeps only its token (its raw logit), so filtering leaves it alone.
The unconditional branch sees its prompt, then every token from the first BOI on (EOI included); text
written between images is not fed to it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from . import tokens as T

# Free header ("auto" size): allowed token ids per 1-based header position.
_NONZERO = tuple(range(T.DIGIT_0 + 1, T.DIGIT_0 + 10))
_DIGITS = tuple(range(T.DIGIT_0, T.DIGIT_0 + 10))
AUTO_HEADER = {1: _NONZERO, 2: _DIGITS, 3: (T.STAR,), 4: _NONZERO, 5: _DIGITS}
AUTO_HEADER_LEN = len(AUTO_HEADER)


@dataclass(frozen=True)
class SamplingParams:
    """Guidance and the two sets of filters (official Emu3.5-Image defaults)."""

    cfg: float = T.CFG_T2I
    image_top_k: int = T.IMAGE_TOP_K
    image_top_p: float = T.IMAGE_TOP_P
    image_temperature: float = 1.0
    text_top_k: int = T.TEXT_TOP_K
    text_top_p: float = T.TEXT_TOP_P
    text_temperature: float = 1.0


def header_ids(h: int, w: int) -> list[int]:
    """Token ids of ``"{h}*{w}"`` (each digit and '*' is one BPE token)."""
    return [T.DIGIT_0 + int(c) if c != "*" else T.STAR for c in f"{h}*{w}"]


def parse_header(ids: list[int]) -> tuple[int, int]:
    text = "".join("*" if i == T.STAR else str(i - T.DIGIT_0) for i in ids)
    h, w = text.split("*")
    return int(h), int(w)


# What to do at one position: a kind and, for "force", the one allowed token / for "allow", the ids.
TEXT, FORCE, ALLOW, VISUAL = "text", "force", "allow", "visual"


class Structure:
    """The image-structure state machine, advanced one token at a time (the last token of the sequence)."""

    def __init__(self, grid: tuple[int, int] | None) -> None:
        self.grid = grid  # (h, w) tokens once known
        self.in_image = False
        self.in_visual = False
        self.header: list[int] = []  # tokens since BOI (before IMG)
        self.t = 0  # tokens since IMG
        self.images = 0
        self.rows_done = 0

    def advance(self, last: int) -> None:
        """Account for ``last``, the newest token of the sequence (prompt tail or a generated token)."""
        if self.in_visual:
            self.t += 1
            if last == T.EOL or last == T.EOI:
                self.rows_done += 1
        if last == T.BOI:
            self.in_image, self.in_visual, self.header, self.t = True, False, [], 0
        elif last == T.EOI:
            self.in_image = self.in_visual = False
        elif self.in_image and not self.in_visual:
            if last == T.IMG:
                self.in_visual, self.t, self.rows_done = True, 0, 0
                self.images += 1
                if self.grid is None:
                    self.grid = parse_header(self.header)
            else:
                self.header.append(last)

    def rule(self) -> tuple[str, object]:
        """What the next token may be."""
        if not self.in_image:
            return TEXT, None
        if self.in_visual:
            h, w = self.grid
            t = self.t + 1
            if t == h * (w + 1):
                return FORCE, T.EOI
            if t % (w + 1) == 0:
                return FORCE, T.EOL
            return VISUAL, None
        pos = len(self.header) + 1
        if self.grid is not None:
            want = header_ids(*self.grid)
            return FORCE, want[pos - 1] if pos <= len(want) else T.IMG
        return ALLOW, AUTO_HEADER.get(pos, (T.IMG,))

    @property
    def image_mode(self) -> bool:
        return self.in_image


def filter_top_k_top_p(scores: torch.Tensor, top_k: int, top_p: float, temperature: float) -> torch.Tensor:
    """Temperature, then keep logits >= the k-th largest, then the nucleus of mass ``top_p`` ([V] scores).

    The nucleus is computed over the finite entries only (the same softmax: -inf entries weigh 0)."""
    if temperature != 1.0:
        scores = scores / temperature
    if 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if top_p < 1.0:
        alive = torch.isfinite(scores).nonzero().squeeze(-1)
        values, order = torch.sort(scores[alive], descending=True)
        cum = torch.softmax(values, dim=-1).cumsum(dim=-1)
        drop = cum > top_p
        drop[1:] = drop[:-1].clone()  # keep the token that crosses the threshold
        drop[0] = False
        scores = scores.clone()
        scores[alive[order[drop]]] = -math.inf
    return scores


def process(rule: tuple[str, object], cond: torch.Tensor, uncond: torch.Tensor | None,
            params: SamplingParams) -> torch.Tensor:
    """Processed scores [V] for one position from the raw conditional (and unconditional) logits."""
    kind, arg = rule
    cond = cond.float()
    if kind == TEXT:
        scores = cond.clone()
        scores[T.BOV:] = -math.inf
        return filter_top_k_top_p(scores, params.text_top_k, params.text_top_p, params.text_temperature)
    if kind == VISUAL:
        # Only visual ids survive the mask: log-softmax normalisers over the whole vocabulary, arithmetic
        # on the visual slice.
        c = cond[T.BOV:] - torch.logsumexp(cond, dim=-1)
        if uncond is not None:
            uncond = uncond.float()
            u = uncond[T.BOV:] - torch.logsumexp(uncond, dim=-1)
            c = u + params.cfg * (c - u)
        visual = filter_top_k_top_p(c, params.image_top_k, params.image_top_p, params.image_temperature)
        scores = torch.full_like(cond, -math.inf)
        scores[T.BOV:] = visual
        return scores
    # Forced / restricted header positions: only the allowed ids keep their raw logits.
    allowed = torch.tensor([arg] if kind == FORCE else list(arg), device=cond.device)
    scores = torch.full_like(cond, -math.inf)
    scores[allowed] = filter_top_k_top_p(cond[allowed], params.image_top_k, params.image_top_p,
                                         params.image_temperature)
    return scores


def sample(scores: torch.Tensor, draw: Callable[[], float]) -> int:
    """Inverse-CDF sampling from softmax(scores) with one uniform draw in [0, 1).

    The CDF runs over the tokens with finite scores in increasing id order."""
    alive = torch.isfinite(scores).nonzero().squeeze(-1)
    cdf = torch.softmax(scores[alive].double(), dim=-1).cumsum(dim=-1)
    value = torch.tensor([draw()], dtype=cdf.dtype, device=cdf.device) * cdf[-1]
    # right=True: the first index whose cdf exceeds the draw, so a zero-probability token is never picked.
    index = torch.searchsorted(cdf, value, right=True).clamp(max=cdf.shape[0] - 1)
    return int(alive[index].item())
