"""The small denoising UNet behind the `sr3-tiny` example.

The network sees the noisy high-resolution image and the bicubic-upsampled low-resolution
image concatenated along the channels (SR3's conditioning), plus the diffusion timestep
through a sinusoidal embedding that every residual block adds to its features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 8  # GroupNorm groups; the width of every level must be a multiple of it


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps, shape [B, dim], in float32.

    Computed in float32 whatever the model's dtype: in bfloat16 neighbouring timesteps
    (e.g. 996 and 1000) would round to the same value and become indistinguishable.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half
    )
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added between the two convs."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(GROUPS, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # Zero-initialised so each block starts as the identity: a deep stack of blocks
        # then trains stably from the first step without warm-up.
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(emb)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over all positions, with a residual connection."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(GROUPS, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)
        out = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class SR3UNet(nn.Module):
    """Denoiser v(x_t, upsampled_lr, t); `sr3.py` turns its output into the noise estimate.

    Level i has `channels * multipliers[i]` channels; there are len(multipliers) - 1
    downsamplings, so the input side must be a multiple of 2 ** (len(multipliers) - 1).
    The full-resolution level has no ResBlock on the way down (its skip is conv_in's
    output, as in DDPM's UNet) and upsampling is a 2x2 stride-2 transposed conv rather
    than nearest + 3x3 conv: full-resolution convs dominate the cost, and these two
    choices took a 2-core CPU training step (batch 16, 64x64, fp32) from ~0.56 s to ~0.32 s.
    Self-attention runs only at the lowest resolution (16x16 there), where it costs ~4 %.
    """

    def __init__(
        self,
        in_channels: int = 6,
        out_channels: int = 3,
        channels: int = 32,
        multipliers: Sequence[int] = (1, 2, 2),
        attention: bool = True,
    ) -> None:
        super().__init__()
        widths = [channels * m for m in multipliers]
        if any(w % GROUPS for w in widths):
            raise ValueError(f"channels must be a multiple of {GROUPS}; got {channels}")
        self.embed_dim = channels
        emb_dim = 4 * channels
        self.time_mlp = nn.Sequential(
            nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        self.conv_in = nn.Conv2d(in_channels, widths[0], 3, padding=1)

        # down_blocks[i] runs at level i + 1, after downsamples[i].
        self.downsamples = nn.ModuleList()
        self.down_blocks = nn.ModuleList()
        for level in range(1, len(widths)):
            self.downsamples.append(
                nn.Conv2d(widths[level - 1], widths[level - 1], 3, stride=2, padding=1)
            )
            self.down_blocks.append(ResBlock(widths[level - 1], widths[level], emb_dim))

        self.mid = ResBlock(widths[-1], widths[-1], emb_dim)
        self.mid_attn = SelfAttention(widths[-1]) if attention else nn.Identity()

        # up_blocks[j] runs at level L - j; upsamples[j] then takes it one level up.
        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        prev = widths[-1]
        for level in reversed(range(len(widths))):
            self.up_blocks.append(ResBlock(prev + widths[level], widths[level], emb_dim))
            prev = widths[level]
            if level > 0:
                self.upsamples.append(nn.ConvTranspose2d(prev, widths[level - 1], 2, stride=2))
                prev = widths[level - 1]

        self.norm_out = nn.GroupNorm(GROUPS, prev)
        self.conv_out = nn.Conv2d(prev, out_channels, 3, padding=1)
        # A zero output (v = 0) makes the untrained model's clean-image estimate
        # sqrt(abar) x_t: a damped copy of its input instead of random structure.
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, x_t: torch.Tensor, cond: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # The caller's tensors are float32; a model cast to bfloat16 as a whole (no
        # autocast) would otherwise fail on the first conv with a dtype mismatch.
        dtype = self.conv_in.weight.dtype
        emb = self.time_mlp(timestep_embedding(t, self.embed_dim).to(dtype))
        h = self.conv_in(torch.cat([x_t, cond], dim=1).to(dtype))

        skips = [h]
        for down, block in zip(self.downsamples, self.down_blocks, strict=True):
            h = block(down(h), emb)
            skips.append(h)

        h = self.mid_attn(self.mid(h, emb))

        for j, block in enumerate(self.up_blocks):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if j < len(self.upsamples):
                h = self.upsamples[j](h)

        return self.conv_out(F.silu(self.norm_out(h)))
