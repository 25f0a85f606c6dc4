"""The ``unet`` score network for images: residual blocks, GroupNorm, a time (and label)
embedding and self-attention (Ho et al. 2020; Song et al. 2021's NCSN++ in miniature),
wrapped by the shared preconditioner :class:`diffuse_plugins.networks.NetworkScore`."""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from diffuse_engine import DiffuseError, hookimpl
from diffuse_plugins.networks import NetworkConfig, NetworkScore, make_embedding


class UNetConfig(NetworkConfig):
    embedding: Literal["fourier", "sinusoidal"] = Field("sinusoidal", description="time embedding")
    channels: int = Field(64, ge=8, description="channels at the first level")
    channel_mult: list[Annotated[int, Field(ge=1)]] = Field(
        [1, 2], min_length=1, description="per-level multipliers (each >= 1)"
    )
    res_blocks: int = Field(2, ge=1, description="residual blocks per level")
    attention: list[int] = Field([4], description="resolutions with self-attention ([] = none)")
    groups: int = Field(8, ge=1, description="GroupNorm groups")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout in residual blocks")


def _norm(c: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(groups, c), c)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, time embedding added in between (Ho et al. 2020)."""

    def __init__(self, cin, cout, tdim, groups, dropout):
        super().__init__()
        self.n1, self.c1 = _norm(cin, groups), nn.Conv2d(cin, cout, 3, padding=1)
        self.t = nn.Linear(tdim, cout)
        self.n2, self.c2 = _norm(cout, groups), nn.Conv2d(cout, cout, 3, padding=1)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.c1(F.silu(self.n1(x))) + self.t(temb)[:, :, None, None]
        h = self.c2(self.drop(F.silu(self.n2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over pixels with a residual connection."""

    def __init__(self, c, groups):
        super().__init__()
        self.norm, self.qkv, self.proj = (
            _norm(c, groups),
            nn.Conv2d(c, 3 * c, 1),
            nn.Conv2d(c, c, 1),
        )

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        return x + self.proj(h.transpose(1, 2).reshape(B, C, H, W))


class UNet(nn.Module):
    """A DDPM-style U-Net sized for 8x8 to 32x32 images on a CPU."""

    def __init__(self, shape, c: UNetConfig):
        super().__init__()
        cin, H = shape[0], shape[1]
        tdim = 4 * c.channels
        self.embed = make_embedding(c.embedding, c.embedding_dim, c.fourier_scale)
        self.temb = nn.Sequential(
            nn.Linear(c.embedding_dim, tdim), nn.SiLU(), nn.Linear(tdim, tdim), nn.SiLU()
        )
        self.inp = nn.Conv2d(cin, c.channels, 3, padding=1)
        self.down, chans, ch, res = nn.ModuleList(), [c.channels], c.channels, H
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.res_blocks):
                blk = nn.ModuleList([ResBlock(ch, c.channels * mult, tdim, c.groups, c.dropout)])
                ch = c.channels * mult
                if res in c.attention:
                    blk.append(SelfAttention(ch, c.groups))
                self.down.append(blk)
                chans.append(ch)
            if level < len(c.channel_mult) - 1:
                self.down.append(nn.ModuleList([nn.Conv2d(ch, ch, 3, stride=2, padding=1)]))
                chans.append(ch)
                res //= 2
        self.mid = nn.ModuleList(
            [
                ResBlock(ch, ch, tdim, c.groups, c.dropout),
                SelfAttention(ch, c.groups),
                ResBlock(ch, ch, tdim, c.groups, c.dropout),
            ]
        )
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for _ in range(c.res_blocks + 1):
                blk = nn.ModuleList(
                    [ResBlock(ch + chans.pop(), c.channels * mult, tdim, c.groups, c.dropout)]
                )
                ch = c.channels * mult
                if res in c.attention:
                    blk.append(SelfAttention(ch, c.groups))
                self.up.append(blk)
            if level > 0:
                self.up.append(
                    nn.ModuleList(
                        [
                            nn.Upsample(scale_factor=2, mode="nearest"),
                            nn.Conv2d(ch, ch, 3, padding=1),
                        ]
                    )
                )
                res *= 2
        self.out = nn.Sequential(_norm(ch, c.groups), nn.SiLU(), nn.Conv2d(ch, cin, 3, padding=1))
        # labels 0 .. K-1 and the null label K, added to the time embedding
        self.label = None if c.num_classes is None else nn.Embedding(c.num_classes + 1, tdim)

    @staticmethod
    def _run(blk, h, temb):
        for layer in blk:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
        return h

    def forward(self, x, t, y=None):
        temb = self.temb(self.embed(t))
        if self.label is not None:
            temb = temb + self.label(y)
        h = self.inp(x)
        hs = [h]
        for blk in self.down:
            h = self._run(blk, h, temb)
            hs.append(h)
        h = self._run(self.mid, h, temb)
        for blk in self.up:
            if isinstance(blk[0], ResBlock):
                h = self._run(blk, torch.cat([h, hs.pop()], dim=1), temb)
            else:
                h = self._run(blk, h, temb)
        return self.out(h)


class UNetScore(NetworkScore):
    """U-Net score network (residual blocks, GroupNorm, time embedding, attention)."""

    name = "unet"
    Config = UNetConfig

    def build_net(self, shape):
        if len(shape) != 3:
            raise DiffuseError(
                f"score model unet needs image data (channels, height, "
                f"width); got shape {list(shape)}; use the mlp for vectors"
            )
        levels = len(self.config.channel_mult) - 1
        if shape[1] != shape[2] or shape[1] % (2**levels) or not 4 <= shape[1] <= 64:
            raise DiffuseError(
                f"score model unet: images must be square, 4..64 pixels and "
                f"divisible by 2^{levels} (channel_mult has {levels + 1} "
                f"levels); got {shape[1]}x{shape[2]}"
            )
        return UNet(shape, self.config)


@hookimpl
def diffuse_register_score_models():
    return [UNetScore]
