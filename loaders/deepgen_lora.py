"""DeepGen's PEFT LoRA on its VLM: injected from the checkpoint under a name, switched on per session."""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelFolderError
from ..modeling.deepgen import checkpoint as ckpt
from ..modeling.deepgen.encode import compute_dtype
from .adapters import Adapter
from .cache import ModelHandle, Session
from .deepgen import CHECKPOINT_INPUT, DISPLAY, LORA_ALPHA

LORA_ADAPTER = "deepgen_lora"


def use_lora(handle: ModelHandle, session: Session, vlm_entry: Any, enabled: bool) -> bool:
    """Switch the checkpoint's LoRA on in the shared VLM for this session (off again afterwards)."""
    rank = int(handle.info_dict.get("lora_rank", "0"))
    if not enabled or rank == 0:
        session.use_adapters(vlm_entry, [])
        return False
    file = Path(handle.path(CHECKPOINT_INPUT))
    st = file.stat()
    session.use_adapters(vlm_entry, [Adapter(LORA_ADAPTER, (str(file), st.st_size, st.st_mtime_ns),
                                             lambda module, name: inject_lora(module, name, file, rank))])
    return True


DEFAULT_SEGMENT = re.compile(r"\.default(\.|$)")


def inject_lora(module: torch.nn.Module, name: str, file: Path, rank: int) -> None:
    """Add the checkpoint's PEFT LoRA to the VLM under ``name`` and load its tensors (strict)."""
    from peft import LoraConfig, inject_adapter_in_model  # noqa: PLC0415

    lora = ckpt.split(ckpt.read_state(file)).lora
    targets = ckpt.lora_targets(lora)
    # dropout 0: the official 0.05 acts in training only (identity in eval).
    config = LoraConfig(r=rank, lora_alpha=LORA_ALPHA, target_modules=targets, lora_dropout=0.0,
                        init_lora_weights=False)
    with warnings.catch_warnings():
        # The official LoRA has separate adapters on the tied embed_tokens and lm_head (as trained); PEFT warns
        # about adapters on tied layers, which is intended here (the base weights are never merged).
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*", category=UserWarning)
        inject_adapter_in_model(config, module, adapter_name=name)
    state = {DEFAULT_SEGMENT.sub(lambda m: f".{name}{m.group(1)}", k): v for k, v in lora.items()}
    expected = {k for k, _ in module.named_parameters() if f".{name}." in k or k.endswith(f".{name}")}
    missing, unexpected = ckpt.key_report(expected, state)
    if missing or unexpected:
        raise ModelFolderError(f"{DISPLAY} {CHECKPOINT_INPUT}: the LoRA tensors do not fit the VLM (got missing "
                               f"{missing}, unexpected {unexpected}, expected PEFT LoRA keys of Qwen2.5-VL). "
                               "Use the VLM the checkpoint was trained with (Qwen2.5-VL-3B-Instruct).")
    base = compute_dtype(module)  # LoRA layers compute unhooked: keep them in the VLM's compute dtype
    params = dict(module.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            params[key].data = value.to(device=params[key].device, dtype=base).clone()
