"""The Emu3.5 LLM as transformers' ``Qwen3ForCausalLM``.

The reference ``Emu3ForCausalLM`` computes exactly what ``Qwen3ForCausalLM`` computes (RMSNorm on q and
k over head_dim, GQA, SwiGLU, untied head, standard RoPE, no biases) with the same state-dict keys
(backend_specs.md §3.1), so the config is translated and transformers' class is used as is.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ...errors import ModelFolderError

DISPLAY = "Emu3.5"
# Emu3Config defaults, used when the config file leaves a field out.
EMU3_DEFAULTS = {"head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 1_000_000.0, "hidden_act": "silu",
                 "max_position_embeddings": 9216, "tie_word_embeddings": False}
REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
ROPE_TYPES = {"linear": "linear", "dynamic": "dynamic"}


def qwen3_config(emu: Mapping[str, Any]) -> Any:
    """A ``Qwen3Config`` equal in computation to an Emu3.5 ``config.json``."""
    from transformers import Qwen3Config  # noqa: PLC0415

    missing = [k for k in REQUIRED if k not in emu]
    if missing:
        raise ModelFolderError(f"{DISPLAY} model config: fields missing (got no {', '.join(missing)}, expected an "
                               "Emu3.5 config.json). Re-download config.json of the model.")
    get = lambda k: emu.get(k, EMU3_DEFAULTS.get(k))  # noqa: E731
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(get("rope_theta"))}
    scaling = emu.get("rope_scaling")
    if scaling:
        kind = scaling.get("type") or scaling.get("rope_type")
        if kind not in ROPE_TYPES:
            raise ModelFolderError(f"{DISPLAY} model config: unsupported rope_scaling (got {kind!r}, expected none, "
                                   "'linear' or 'dynamic'). Use the released Emu3.5 config.json.")
        rope.update(rope_type=ROPE_TYPES[kind], factor=float(scaling["factor"]))
    heads = int(emu["num_attention_heads"])
    return Qwen3Config(
        vocab_size=int(emu["vocab_size"]), hidden_size=int(emu["hidden_size"]),
        intermediate_size=int(emu["intermediate_size"]), num_hidden_layers=int(emu["num_hidden_layers"]),
        num_attention_heads=heads, num_key_value_heads=int(emu.get("num_key_value_heads") or heads),
        head_dim=int(get("head_dim")), hidden_act=get("hidden_act"), rms_norm_eps=float(get("rms_norm_eps")),
        max_position_embeddings=int(get("max_position_embeddings")), rope_parameters=rope,
        tie_word_embeddings=bool(get("tie_word_embeddings")), attention_bias=False,
        # The reference's dropout (0.1) only acts in training; inference is dropout-free.
        attention_dropout=0.0, use_cache=True, pad_token_id=emu.get("pad_token_id"),
        bos_token_id=emu.get("bos_token_id"), eos_token_id=emu.get("eos_token_id"))


class VocabHead(nn.Linear):
    """The LM head (282,926 x hidden, bias-free): ``x @ W^T``, on the CPU in fp32 computed as ``(W @ x^T)^T``.

    Same product and accumulation dtype; one row gives bit-identical logits. Why: with MKL on the test
    machine's AMD EPYC, ``F.linear`` on the 2 rows of a CFG decode step takes 2.2x the 1-row time for a
    hidden size of 512, ``W @ x^T`` ~1.0x (benchmarks/bench_emu35.py, part "parts"). From hidden ~1024 up
    (the released model has 5120) both forms take ~1.8-2x on that CPU: MKL's 2-row fp32 GEMM runs there at
    a few GFLOP/s instead of streaming the weight once. Other devices and dtypes keep ``F.linear`` (cuBLAS
    reads the weight once for a few rows).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32:
            return super().forward(x)
        flat = x.reshape(-1, x.shape[-1])
        return torch.mm(self.weight, flat.T).T.reshape(*x.shape[:-1], self.out_features)


def build_decoder(config: Any) -> Any:
    """An empty ``Qwen3ForCausalLM`` (call inside ``torch.device('meta')`` to allocate nothing); SDPA attention.

    Its head is a :class:`VocabHead` (an ``nn.Linear`` with the same key, shape and hooks)."""
    from transformers import Qwen3ForCausalLM  # noqa: PLC0415

    config._attn_implementation = "sdpa"
    model = Qwen3ForCausalLM(config)
    head = VocabHead(model.lm_head.in_features, model.lm_head.out_features, bias=False, device="meta")
    head.weight = model.lm_head.weight  # the same parameter: its initialisation and placement are kept
    model.lm_head = head
    return model
