"""The IBQ vision tokenizer (Emu3.5-VisionTokenizer), written from its description.

Taming/LDM-style convolutional encoder and decoder (GroupNorm(32, eps 1e-6), swish, residual blocks,
single-head attention at the resolutions ``attn_resolutions`` counted from the static ``resolution``,
stride-2 convs with (0,1,0,1) padding down, nearest x2 + conv up), a 1x1 ``quant_conv`` to the code
dimension and back, and the "index propagation" quantiser: code = argmax over the codebook of the dot
product <z, e_n>. The argmax is taken in chunks so the [B, n_codes, h, w] score tensor is never built.
State-dict keys are the reference's (``encoder.down.0.block.0.norm1.weight``, ``quantize.embedding.weight``…).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32
NORM_EPS = 1e-6
MIN_NORM_VALUES = 2  # values a GroupNorm group must hold (one value has no variance: torch raises)
# Bytes of one chunk of dot-product scores in the quantiser (rows x codebook slice, fp32).
QUANT_CHUNK_BYTES = 64 * 1024 * 1024
QUANT_ROWS = 1024  # latent positions scored per chunk
FP32_BYTES = 4


@dataclass(frozen=True)
class IBQConfig:
    """``ddconfig`` + codebook size/dim of config.yaml (or the same fields of the remote-code config.json)."""

    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_resolutions: tuple[int, ...]
    resolution: int
    z_channels: int
    n_embed: int
    embed_dim: int
    in_channels: int = 3
    out_ch: int = 3
    double_z: bool = False
    extra: dict = field(default_factory=dict)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def min_code_positions(self) -> int:
        """Fewest code positions (rows x columns) the encoder and decoder accept: torch's GroupNorm refuses
        a group that holds a single value, and the narrowest norms run at the code grid's own size with
        ``ch * ch_mult[-1]`` channels in GROUPS groups: 1 with 64 or more channels there, 2 for the test
        kit's 32-channel tokenizer."""
        per_group = max(1, self.ch * self.ch_mult[-1] // GROUPS)
        return -(-MIN_NORM_VALUES // per_group)

    @classmethod
    def from_hf_dict(cls, cfg: Mapping[str, Any]) -> "IBQConfig":
        """The flat ``config.json`` of the repo's transformers remote-code form (model_type Emu3p5VisionVQ):
        the ddconfig fields at top level, ``codebook_size`` for ``n_embed``."""
        return cls.from_yaml_dict({"ddconfig": cfg, "n_embed": cfg["codebook_size"], "embed_dim": cfg["embed_dim"]})

    @classmethod
    def from_yaml_dict(cls, cfg: Mapping[str, Any]) -> "IBQConfig":
        dd = dict(cfg["ddconfig"])
        return cls(ch=int(dd["ch"]), ch_mult=tuple(int(m) for m in dd["ch_mult"]),
                   num_res_blocks=int(dd["num_res_blocks"]),
                   attn_resolutions=tuple(int(r) for r in dd.get("attn_resolutions", ())),
                   resolution=int(dd["resolution"]), z_channels=int(dd["z_channels"]),
                   n_embed=int(cfg["n_embed"]), embed_dim=int(cfg["embed_dim"]),
                   in_channels=int(dd.get("in_channels", 3)), out_ch=int(dd.get("out_ch", 3)),
                   double_z=bool(dd.get("double_z", False)))


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all positions, 1x1 conv projections."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        h = self.norm(x)
        q, k, v = (p(h).reshape(b, 1, c, hh * ww).transpose(-1, -2) for p in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(c), as the reference
        return x + self.proj_out(out.transpose(-1, -2).reshape(b, c, hh, ww))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric: right and bottom only


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], attns: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attns)
    return level


def _middle(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(
        channels, channels)
    return mid


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    for i, block in enumerate(level.block):
        h = block(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


class Encoder(nn.Module):
    def __init__(self, cfg: IBQConfig) -> None:
        super().__init__()
        mult = (1,) + cfg.ch_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1)
        res, cin = cfg.resolution, cfg.ch
        self.down = nn.ModuleList()
        for i, m in enumerate(cfg.ch_mult):
            cin, cout = cfg.ch * mult[i], cfg.ch * m
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(cin, cout))
                cin = cout
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(cout))
            level = _level(blocks, attns)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(cin)
                res //= 2
            self.down.append(level)
        self.mid = _middle(cin)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: IBQConfig) -> None:
        super().__init__()
        n = len(cfg.ch_mult)
        cin = cfg.ch * cfg.ch_mult[-1]
        res = cfg.resolution // 2 ** (n - 1)
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _middle(cin)
        levels: list[nn.Module] = []
        for i in reversed(range(n)):
            cout = cfg.ch * cfg.ch_mult[i]
            blocks, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, cout))
                cin = cout
                if res in cfg.attn_resolutions:
                    attns.append(AttnBlock(cout))
            level = _level(blocks, attns)
            if i != 0:
                level.upsample = Upsample(cin)
                res *= 2
            levels.insert(0, level)  # stored low index = high resolution, as the reference
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Quantizer(nn.Module):
    """Index propagation at inference: code = argmax_n <z, e_n>; z_q = e[code]."""

    def __init__(self, n_embed: int, embed_dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(n_embed, embed_dim)

    def codes(self, z: torch.Tensor, chunk_bytes: int = QUANT_CHUNK_BYTES) -> torch.Tensor:
        """[B, D, h, w] -> codes [B, h, w], in chunks of at most ``chunk_bytes`` of scores."""
        b, d, hh, ww = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, d)
        book = self.embedding.weight.to(flat.dtype)
        n_codes = book.shape[0]
        row_chunk = min(flat.shape[0], QUANT_ROWS)
        code_chunk = max(1, min(n_codes, chunk_bytes // (FP32_BYTES * row_chunk)))
        out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
        for r in range(0, flat.shape[0], row_chunk):
            rows = flat[r:r + row_chunk].float()
            best = torch.full((rows.shape[0],), float("-inf"), device=flat.device)
            arg = torch.zeros(rows.shape[0], dtype=torch.long, device=flat.device)
            for c in range(0, n_codes, code_chunk):
                scores = rows @ book[c:c + code_chunk].float().T
                val, idx = scores.max(dim=1)
                better = val > best  # strict: the first of equal maxima wins, as a single argmax does
                best = torch.where(better, val, best)
                arg = torch.where(better, idx + c, arg)
            out[r:r + row_chunk] = arg
        return out.view(b, hh, ww)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> [B, D, h, w]."""
        return self.embedding(codes).permute(0, 3, 1, 2).contiguous()


class IBQ(nn.Module):
    """Encoder + quantiser + decoder with the reference key names."""

    def __init__(self, cfg: IBQConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = Quantizer(cfg.n_embed, cfg.embed_dim)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def dtype_device(self) -> tuple[torch.dtype, torch.device]:
        w = self.quant_conv.weight
        return w.dtype, w.device

    @torch.no_grad()
    def encode_codes(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels [B, 3, H, W] in -1..1 (H, W multiples of the downsampling) -> codes [B, H/16, W/16]."""
        dtype, device = self.dtype_device()
        z = self.quant_conv(self.encoder(pixels.to(device, dtype)))
        return self.quantize.codes(z)

    @torch.no_grad()
    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """codes [B, h, w] -> pixels [B, 3, 16h, 16w] in about -1..1."""
        _, device = self.dtype_device()
        quant = self.quantize.lookup(codes.to(device))
        return self.decoder(self.post_quant_conv(quant))
