"""FLUX-style KL autoencoder with the original key names of ``ae.safetensors``.

GroupNorm(32, eps 1e-6), swish, Downsample = zero pad (0,1,0,1) + 3x3 stride-2 conv, Upsample = nearest x2
+ 3x3 conv, one single-head attention block in each mid stage. ``encode`` returns the normalised latent
``scale * (z - shift)``; z is the posterior SAMPLE (as the reference does), drawn from ``generator`` so a
seed fixes it, or the posterior mean with ``sample=False``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import GROUPNORM_GROUPS, AEConfig

GN_EPS = 1e-6


def _norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPNORM_GROUPS, ch, eps=GN_EPS, affine=True)


class AttnBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm = _norm(ch)
        self.q = nn.Conv2d(ch, ch, 1)
        self.k = nn.Conv2d(ch, ch, 1)
        self.v = nn.Conv2d(ch, ch, 1)
        self.proj_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, 1, c, hh * ww).transpose(2, 3)

        out = F.scaled_dot_product_attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))
        return x + self.proj_out(out.transpose(2, 3).reshape(b, c, hh, ww))


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1 = _norm(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Mid(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block_1 = ResnetBlock(ch, ch)
        self.attn_1 = AttnBlock(ch)
        self.block_2 = ResnetBlock(ch, ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Stage(nn.Module):
    """One resolution level: ``block`` (ResnetBlocks), an empty ``attn`` list, optional down/upsample."""

    def __init__(self, cin: int, cout: int, blocks: int):
        super().__init__()
        self.block = nn.ModuleList(ResnetBlock(cin if i == 0 else cout, cout) for i in range(blocks))
        self.attn = nn.ModuleList()


class Encoder(nn.Module):
    def __init__(self, cfg: AEConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for level, m in enumerate(mult):
            stage = _Stage(cin, ch * m, cfg.num_res_blocks)
            cin = ch * m
            if level != len(mult) - 1:
                stage.downsample = Downsample(cin)
            self.down.append(stage)
        self.mid = _Mid(cin)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, 2 * cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: AEConfig):
        super().__init__()
        ch, mult = cfg.ch, cfg.ch_mult
        cin = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _Mid(cin)
        stages = []
        for level in reversed(range(len(mult))):
            stage = _Stage(cin, ch * mult[level], cfg.num_res_blocks + 1)
            cin = ch * mult[level]
            if level != 0:
                stage.upsample = Upsample(cin)
            stages.insert(0, stage)  # stored lowest level first, as in the checkpoint
        self.up = nn.ModuleList(stages)
        self.norm_out = _norm(cin)
        self.conv_out = nn.Conv2d(cin, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoEncoder(nn.Module):
    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None, sample: bool = True) -> torch.Tensor:
        """Images [B,3,H,W] in [-1,1] -> normalised latents [B,C,H/8,W/8]. The noise of the posterior sample
        is drawn on the CPU from ``generator`` (device independent), then moved to the latent's device."""
        moments = self.encoder(x)
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if sample:
            noise = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(mean.device, mean.dtype)
            z = mean + torch.exp(0.5 * logvar) * noise
        return self.cfg.scale_factor * (z - self.cfg.shift_factor)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents -> images in about [-1,1]."""
        return self.decoder(z / self.cfg.scale_factor + self.cfg.shift_factor)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(z)
