"""BAGEL configuration: what the files say plus the constants the official loader sets in code.

Sources of the facts: backend_specs.md §1.2 (llm_config.json / vit_config.json are read, then
``qk_norm``, ``tie_word_embeddings=False`` and "one ViT layer fewer" are forced; the autoencoder has no
config file, so its sizes are read from the tensor shapes in ``ae.safetensors``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

# Bagel-level constants of the released checkpoint (not stored in any file).
LATENT_PATCH_SIZE = 2
MAX_LATENT_SIZE = 64  # latent position table side: 64 * 16 px = 1024 px per side at most
VIT_MAX_PATCHES_PER_SIDE = 70  # ViT position table side (980 px / 14)
CONNECTOR_ACT = "gelu_pytorch_tanh"
TIMESTEP_FREQ_DIM = 256
# FLUX autoencoder latent normalisation (hard-coded in the reference load_ae, not stored in ae.safetensors).
AE_SCALE_FACTOR = 0.3611
AE_SHIFT_FACTOR = 0.1159
GROUPNORM_GROUPS = 32


class ConfigError(ValueError):
    """A config file lacks a key or holds an impossible value (the loader turns it into a ModelFolderError)."""


def _need(cfg: Mapping[str, Any], key: str, what: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{what} has no '{key}'")
    return cfg[key]


@dataclass(frozen=True)
class LLMConfig:
    """The Qwen2 decoder (both experts share these sizes)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    hidden_act: str = "silu"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "LLMConfig":
        what = "llm_config.json"
        rope = cfg.get("rope_theta")
        if rope is None:  # transformers 5 writes it inside rope_parameters
            rope = (cfg.get("rope_parameters") or {}).get("rope_theta", 1e6)
        out = cls(
            vocab_size=int(_need(cfg, "vocab_size", what)),
            hidden_size=int(_need(cfg, "hidden_size", what)),
            intermediate_size=int(_need(cfg, "intermediate_size", what)),
            num_layers=int(_need(cfg, "num_hidden_layers", what)),
            num_heads=int(_need(cfg, "num_attention_heads", what)),
            num_kv_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope),
            hidden_act=str(cfg.get("hidden_act", "silu")),
        )
        if out.hidden_size % out.num_heads or out.num_heads % out.num_kv_heads:
            raise ConfigError(f"{what}: hidden_size {out.hidden_size}, heads {out.num_heads}, kv heads "
                              f"{out.num_kv_heads} do not divide")
        return out


@dataclass(frozen=True)
class ViTConfig:
    """The SigLIP vision tower; ``num_layers`` is the number USED (file value - 1, features of layer -2)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    patch_size: int = 14
    image_size: int = 980
    num_channels: int = 3
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, cfg: Mapping[str, Any]) -> "ViTConfig":
        what = "vit_config.json"
        layers = int(_need(cfg, "num_hidden_layers", what))
        if layers < 2:
            raise ConfigError(f"{what}: num_hidden_layers {layers} < 2 (BAGEL uses all but the last layer)")
        return cls(
            hidden_size=int(_need(cfg, "hidden_size", what)),
            intermediate_size=int(_need(cfg, "intermediate_size", what)),
            num_layers=layers - 1,  # the reference drops the last layer (vit_select_layer = -2)
            num_heads=int(_need(cfg, "num_attention_heads", what)),
            patch_size=int(cfg.get("patch_size", 14)),
            image_size=int(cfg.get("image_size", 980)),
            num_channels=int(cfg.get("num_channels", 3)),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-6)),
            hidden_act=str(cfg.get("hidden_act", "gelu_pytorch_tanh")),
        )


@dataclass(frozen=True)
class AEConfig:
    """FLUX-style autoencoder sizes (real: ch 128, ch_mult 1,2,4,4, 2 res blocks, 16 latent channels)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 16
    in_channels: int = 3
    out_ch: int = 3
    scale_factor: float = AE_SCALE_FACTOR
    shift_factor: float = AE_SHIFT_FACTOR

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @classmethod
    def from_shapes(cls, shapes: Mapping[str, tuple[int, ...]]) -> "AEConfig":
        """Read the sizes from ``ae.safetensors`` tensor shapes (original FLUX key names)."""
        what = "ae.safetensors"
        conv_in = _need(shapes, "encoder.conv_in.weight", what)
        ch = int(conv_in[0])
        levels = sorted({int(k.split(".")[2]) for k in shapes if k.startswith("encoder.down.")})
        if not levels or ch % GROUPNORM_GROUPS:
            raise ConfigError(f"{what}: no encoder.down.* blocks or conv_in width {ch} not a multiple of 32")
        mult = []
        for level in levels:
            out_ch = _need(shapes, f"encoder.down.{level}.block.0.conv1.weight", what)[0]
            mult.append(int(out_ch) // ch)
        blocks = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")})
        z2 = int(_need(shapes, "encoder.conv_out.weight", what)[0])
        return cls(ch=ch, ch_mult=tuple(mult), num_res_blocks=blocks, z_channels=z2 // 2,
                   in_channels=int(conv_in[1]), out_ch=int(_need(shapes, "decoder.conv_out.weight", what)[0]))


@dataclass(frozen=True)
class BagelConfig:
    llm: LLMConfig
    vit: ViTConfig
    ae: AEConfig = field(default_factory=AEConfig)
    latent_patch_size: int = LATENT_PATCH_SIZE
    max_latent_size: int = MAX_LATENT_SIZE
    vit_max_patches_per_side: int = VIT_MAX_PATCHES_PER_SIDE

    @property
    def latent_downsample(self) -> int:
        """Pixels per latent token side (8 x 2 = 16)."""
        return self.ae.downsample * self.latent_patch_size

    @property
    def patch_latent_dim(self) -> int:
        return self.latent_patch_size**2 * self.ae.z_channels

    @property
    def max_image_side(self) -> int:
        return self.max_latent_size * self.latent_downsample
