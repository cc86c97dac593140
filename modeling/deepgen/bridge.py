"""The stacked-channel bridge between the VLM and the DiT (DeepGen's "SCB").

Meta queries are appended to the prompt, six hidden states of the VLM are concatenated on channels,
``projector_1`` maps them to the connector width, a stack of pre-norm encoder layers mixes them, and
``projector_2`` (mean over the sequence) / ``projector_3`` (every token) give the DiT its pooled and
sequence conditioning. Parameter names match the official checkpoint so it loads strictly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

NUM_STACKED_LAYERS = 6
LAYER_STRIDE = 6  # hidden states at L-1, L-7, ... (every sixth layer from the top)
# The connector's head count is not in the weights (q/k/v are [hidden, hidden] for any count): it is read from a
# connector config (``num_attention_heads``, the field of DeepGen's ConnectorConfig), or, for the released sizes
# only, taken from the official model config (deepgenteam/deepgen e6cb0c2 configs/models/deepgen_scb.py:
# connector hidden_size 2048, intermediate_size 11946, num_hidden_layers 6, num_attention_heads 32).
HEADS_KEY = "num_attention_heads"
OFFICIAL_CONNECTOR = {"hidden_size": 2048, "intermediate_size": 11946, "num_hidden_layers": 6, HEADS_KEY: 32}
LAYER_NORM_EPS = 1e-6
QUERIES_KEY = "meta_queries"
BRIDGE_PREFIXES = ("connector.", "projector_1.", "projector_2.", "projector_3.")


@dataclass(frozen=True)
class BridgeConfig:
    """Sizes of the bridge; read from the checkpoint's tensor shapes (``from_shapes``)."""

    llm_hidden: int  # VLM text hidden size (2048 for Qwen2.5-VL-3B)
    num_queries: int  # 128
    hidden: int  # connector width (2048)
    intermediate: int  # connector MLP width (11946)
    num_layers: int  # connector depth (6)
    num_heads: int  # connector heads (32)
    pooled_dim: int  # DiT pooled_projection_dim (2048)
    joint_dim: int  # DiT joint_attention_dim (4096)
    num_stacked: int = NUM_STACKED_LAYERS

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, Sequence[int]], connector: Mapping | None = None) -> "BridgeConfig":
        """Sizes from ``{key: shape}`` of the bridge tensors (official names, no prefix); the head count from
        ``connector`` (a connector config) or the official config (``connector_heads``)."""
        queries = shapes[QUERIES_KEY]
        hidden, stacked = shapes["projector_1.weight"]
        layers = {k.split(".")[2] for k in shapes if k.startswith("connector.layers.")}
        intermediate = int(shapes["connector.layers.0.mlp.fc1.weight"][0])
        return cls(
            llm_hidden=int(queries[1]), num_queries=int(queries[0]), hidden=int(hidden), intermediate=intermediate,
            num_layers=len(layers), num_heads=connector_heads(int(hidden), intermediate, len(layers), connector)[0],
            pooled_dim=int(shapes["projector_2.weight"][0]), joint_dim=int(shapes["projector_3.weight"][0]),
            num_stacked=int(stacked) // int(queries[1]))


class ConnectorHeadsUnknown(ValueError):
    """The connector's head count is neither in a config nor implied by the released sizes."""


def connector_heads(hidden: int, intermediate: int, layers: int, config: Mapping | None) -> tuple[int, str]:
    """(head count, where it came from) for a connector of these sizes.

    A config must agree with the weights (its widths, when it gives them) and divide the width; without one, only
    the released sizes have a known head count: any other width is refused rather than guessed.
    """
    sizes = {"hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers}
    if config is not None and config.get(HEADS_KEY) is not None:
        heads = int(config[HEADS_KEY])
        wrong = {k: (config[k], v) for k, v in sizes.items() if config.get(k) is not None and int(config[k]) != v}
        if wrong:
            raise ConnectorHeadsUnknown(f"the connector config does not describe these weights (got "
                                        f"{', '.join(f'{k} {c}' for k, (c, _) in wrong.items())}, expected "
                                        f"{', '.join(f'{k} {w}' for k, (_, w) in wrong.items())})")
        if heads < 1 or hidden % heads:
            raise ConnectorHeadsUnknown(f"the connector config's {HEADS_KEY} does not divide the width (got {heads} "
                                        f"heads for width {hidden}, expected a divisor of {hidden})")
        return heads, "connector config"
    if all(OFFICIAL_CONNECTOR[k] == v for k, v in sizes.items()):
        return OFFICIAL_CONNECTOR[HEADS_KEY], "the official DeepGen 1.0 config"
    raise ConnectorHeadsUnknown(
        f"the connector's head count is not stored in its weights and no connector config gives it (got width "
        f"{hidden}, MLP {intermediate}, {layers} layers and no {HEADS_KEY}, expected the released sizes "
        f"{OFFICIAL_CONNECTOR['hidden_size']} / {OFFICIAL_CONNECTOR['intermediate_size']} / "
        f"{OFFICIAL_CONNECTOR['num_hidden_layers']} or a config.json with {HEADS_KEY})")


class ConnectorAttention(nn.Module):
    """Bidirectional multi-head self-attention with biased q/k/v/out projections (no mask)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"connector width {hidden} is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, c // self.heads).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x)))
        return self.out_proj(out.transpose(1, 2).reshape(b, n, c))


class ConnectorMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ConnectorLayer(nn.Module):
    """Pre-norm encoder layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, hidden: int, intermediate: int, heads: int) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.self_attn = ConnectorAttention(hidden, heads)
        self.layer_norm2 = nn.LayerNorm(hidden, eps=LAYER_NORM_EPS)
        self.mlp = ConnectorMLP(hidden, intermediate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Connector(nn.Module):
    """The encoder stack (no positional embedding, no final norm)."""

    def __init__(self, hidden: int, intermediate: int, num_layers: int, heads: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ConnectorLayer(hidden, intermediate, heads) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class DeepGenBridge(nn.Module):
    """Meta queries + projectors + connector, with the official parameter names."""

    def __init__(self, config: BridgeConfig) -> None:
        super().__init__()
        self.config = config
        self.meta_queries = nn.Parameter(torch.zeros(config.num_queries, config.llm_hidden))
        self.projector_1 = nn.Linear(config.llm_hidden * config.num_stacked, config.hidden)
        self.connector = Connector(config.hidden, config.intermediate, config.num_layers, config.num_heads)
        self.projector_2 = nn.Linear(config.hidden, config.pooled_dim)
        self.projector_3 = nn.Linear(config.hidden, config.joint_dim)

    def queries(self, batch: int) -> torch.Tensor:
        """[batch, num_queries, llm_hidden] query embeddings appended after the prompt."""
        return self.meta_queries[None].expand(batch, -1, -1)

    def forward(self, stacked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, N, llm_hidden*6] -> (pooled [B, pooled_dim], sequence [B, N, joint_dim])."""
        x = self.connector(self.projector_1(stacked))
        return self.projector_2(x.mean(1)), self.projector_3(x)


def selected_layers(num_states: int) -> list[int]:
    """Indices into ``output_hidden_states`` (embeddings + one per layer) that are stacked.

    For 37 states (36 layers) that is 35, 29, 23, 17, 11, 5: the state before the last layer and every
    sixth one below it; the final normed state is never used.
    """
    num_layers = num_states - 1
    return list(range(num_layers - 1, 0, -LAYER_STRIDE))


def stack_hidden_states(hidden_states: Sequence[torch.Tensor], expected: int = NUM_STACKED_LAYERS) -> torch.Tensor:
    """Concatenate the selected hidden states on channels (in the selection order)."""
    picks = selected_layers(len(hidden_states))
    if len(picks) != expected:
        raise ValueError(f"the VLM has {len(hidden_states) - 1} layers, which selects {len(picks)} hidden states "
                         f"where the bridge needs {expected} (a VLM with {LAYER_STRIDE * (expected - 1) + 2}-"
                         f"{LAYER_STRIDE * expected + 1} layers)")
    return torch.cat([hidden_states[i] for i in picks], dim=-1)
