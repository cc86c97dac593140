"""A KV cache that appends in place: transformers' ``DynamicCache`` with preallocated layers.

transformers' ``DynamicLayer`` appends a token with ``torch.cat``, which copies the whole cached K and V
of every layer on every step: per row and token, reading and writing the cache once more on top of the
attention's own read. For Emu3.5 (64 layers x 8 KV heads x 128 x K+V = 256 KiB per position in bf16)
that copies ~1 GB (read, then written) per row and token at 4,000 positions and ~4 GB at the ~16,000
positions of a three-reference edit: 3-13 % more memory traffic per row than the 65 GB of bf16
weights a decode step reads. ``AppendLayer`` writes
new positions into a buffer sized for the run (prompt + ``max_new_tokens``: the size the sampler's
memory check reserves) and hands out views of the filled part: the same values, no per-step copy. A
caller that outruns the buffer grows it by half (one copy).
"""
from __future__ import annotations

from typing import Any

import torch

GROWTH = 1.5  # a buffer that runs out grows to 1.5x (amortised O(1) copies per position)


def _dynamic_layer() -> type:
    from transformers.cache_utils import DynamicLayer  # noqa: PLC0415

    return DynamicLayer


class _AppendLayerMixin:
    """Keys/values are views ``buffer[..., :filled, :]`` of buffers with room for ``capacity`` positions."""

    is_croppable = False  # the generator never crops; a cropped view would fall out of step with ``filled``

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = max(1, int(capacity))
        self.filled = 0
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)  # dtype, device, is_initialized
        self._k = key_states.new_empty((*key_states.shape[:-2], self.capacity, key_states.shape[-1]))
        self._v = value_states.new_empty((*value_states.shape[:-2], self.capacity, value_states.shape[-1]))

    def _grow(self, need: int) -> None:
        size = max(need, int(self._k.shape[-2] * GROWTH))
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty((*old.shape[:-2], size, old.shape[-1]))
            new[..., : self.filled, :].copy_(old[..., : self.filled, :])
            setattr(self, name, new)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.filled + key_states.shape[-2]
        if end > self._k.shape[-2]:
            self._grow(end)
        self._k[..., self.filled:end, :].copy_(key_states)
        self._v[..., self.filled:end, :].copy_(value_states)
        self.filled = end
        self.keys, self.values = self._k[..., :end, :], self._v[..., :end, :]
        return self.keys, self.values

    def reset(self) -> None:
        self.filled = 0
        self._k = self._v = None
        super().reset()


_LAYER_CLASS: type | None = None


def append_layer(capacity: int) -> Any:
    """One ``AppendLayer`` (a ``DynamicLayer`` subclass, built on first use: transformers imports lazily)."""
    global _LAYER_CLASS
    if _LAYER_CLASS is None:
        _LAYER_CLASS = type("AppendLayer", (_AppendLayerMixin, _dynamic_layer()), {"__doc__": _AppendLayerMixin.__doc__})
    return _LAYER_CLASS(capacity)


def new_cache(config: Any, capacity: int) -> Any:
    """A ``DynamicCache`` for ``config`` whose layers append into buffers of ``capacity`` positions."""
    from transformers import DynamicCache  # noqa: PLC0415

    cache = DynamicCache(config=config)
    cache.layers = [append_layer(capacity) for _ in cache.layers]
    return cache
