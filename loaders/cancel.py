"""Cancel inside one long forward: a check before every block of a model.

A sampler checks Cancel between steps and tokens, but one forward can itself take minutes: the prefill of
a long prompt, a text encoder on a big batch, a VAE decoding a large image, a denoising step of a big model
on a slow device. ``cancel_points`` puts ComfyUI's interrupt check (glue.check_interrupt) in front of every
element of every ``ModuleList`` / ``Sequential`` of the given modules — decoder layers, transformer blocks,
VAE up/down blocks and their resnets — so Cancel lands within one block's time, and removes the hooks when
the run ends (a cached model is never left modified). The check is a flag test: no cost worth measuring.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .. import glue


def _check(_module: torch.nn.Module, _args: Any) -> None:
    glue.check_interrupt()


def blocks_of(module: torch.nn.Module) -> list[torch.nn.Module]:
    """Every element of every ModuleList / Sequential inside ``module`` (nested ones too), each once."""
    seen: dict[int, torch.nn.Module] = {}
    for sub in module.modules():
        if isinstance(sub, (torch.nn.ModuleList, torch.nn.Sequential)):
            for block in sub:
                seen.setdefault(id(block), block)
    return list(seen.values())


@contextmanager
def cancel_points(modules: Iterable[Any]) -> Iterator[int]:
    """Check Cancel before every block of ``modules`` (non-modules are skipped) while the context is open;
    yields how many blocks were hooked."""
    handles = [block.register_forward_pre_hook(_check)
               for module in modules if isinstance(module, torch.nn.Module) for block in blocks_of(module)]
    try:
        yield len(handles)
    finally:
        for handle in handles:
            handle.remove()
