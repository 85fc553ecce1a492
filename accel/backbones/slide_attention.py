"""Slide attention: Pan et al., "Slide-Transformer: Hierarchical Vision Transformer with Local
Self-Attention", CVPR 2023 (Sec. 3.2 "shift as depthwise convolution", Sec. 3.3 "deformed
shifting" and its re-parameterisation).

Local ka×ka attention where the im2col of keys and values is re-read as ka² shifted copies, each a
fixed one-hot depthwise convolution; a learnable depthwise convolution on the same input ("deformed
shifting") adds to it. Layout and semantics as LeapLabTHU/Slide-Transformer's ``SlideAttention``
(parameter names included, so its checkpoints load): per head the qkv channels are contiguous
``[q|k|v]``; the position table is added to the keys; softmax over the ka² slots; zero padding at the
borders, no masking. ``reparameterize()`` merges the two depthwise convolutions into one for
inference (the reference repository runs both).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from accel.backbones import slide_kernel


def shift_kernel(channels: int, ka: int) -> torch.Tensor:
    """Depthwise weight [channels·ka², 1, ka, ka]: output channel ``c·ka² + i`` copies channel ``c``
    shifted by offset ``i`` (row-major over the ka×ka window)."""
    w = torch.zeros(channels * ka * ka, 1, ka, ka)
    for i in range(ka * ka):
        w[i::ka * ka, 0, i // ka, i % ka] = 1.0
    return w


class SlideAttention(nn.Module):
    """Local ka×ka self-attention on a [B, H, W, C] map, returning [B, H, W, C]."""

    def __init__(self, dim: int, num_heads: int, ka: int = 3, qkv_bias: bool = True, qk_scale=None,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, use_deform: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}.")
        self.dim, self.num_heads, self.ka = dim, num_heads, ka
        self.head_dim = dim // num_heads
        self.scale = qk_scale or self.head_dim ** -0.5
        self.use_deform = use_deform
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        hd, k2 = self.head_dim, ka * ka
        self.dep_conv = nn.Conv2d(hd, k2 * hd, ka, padding=ka // 2, groups=hd, bias=True)
        self.dep_conv.weight = nn.Parameter(shift_kernel(hd, ka), requires_grad=False)
        self.dep_conv1 = nn.Conv2d(hd, k2 * hd, ka, padding=ka // 2, groups=hd, bias=True)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(1, num_heads, 1, k2, 1, 1))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.merged: nn.Conv2d | None = None

    def neighbours(self, t: torch.Tensor) -> torch.Tensor:
        """The ka² neighbour slots of ``t`` [N, hd, H, W] → [N, hd·ka², H, W] (two-path form)."""
        out = self.dep_conv(t)
        return out + self.dep_conv1(t) if self.use_deform else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        nh, hd, k2 = self.num_heads, self.head_dim, self.ka * self.ka
        qkv = self.qkv(x)
        if self._use_kernel(qkv):
            out = slide_kernel.slide_attention(qkv, *self._kernel_weights, nh, self.ka, self.scale)
            return self.proj_drop(self.proj(out))
        qkv = qkv.permute(0, 3, 1, 2).reshape(B * nh, 3 * hd, H, W)
        q, k, v = qkv.split(hd, dim=1)
        if self.merged is not None:
            return self._forward_slots(q, k, v, B, H, W)
        kv = self.neighbours(torch.cat([k, v], dim=0))   # one convolution call for keys and values
        k_nb, v_nb = kv.reshape(2, B, nh, hd, k2, H, W).unbind(0)
        k_nb = k_nb + self.relative_position_bias_table
        q = (q * self.scale).reshape(B, nh, hd, 1, H, W)
        attn = self.attn_drop((q * k_nb).sum(dim=2, keepdim=True).softmax(dim=3))   # [B, nh, 1, k2, H, W]
        out = (attn * v_nb).sum(dim=3).reshape(B, C, H, W).permute(0, 2, 3, 1)
        return self.proj_drop(self.proj(out))

    def _use_kernel(self, qkv: torch.Tensor) -> bool:
        """The fused C kernel runs the re-parameterised module at inference on CPU float32 (the qkv
        projection's output decides: under autocast it is bf16/fp16 and the torch path runs)."""
        return (self.merged is not None and not self.training and qkv.device.type == "cpu"
                and qkv.dtype == torch.float32 and not (torch.is_grad_enabled() and qkv.requires_grad)
                and slide_kernel.supports(self.ka, self.head_dim) and slide_kernel.available())

    @property
    def _kernel_weights(self):
        """The merged convolution slot-major ([ka², ka², hd], [ka², hd]) and the table [nh, ka²]."""
        hd, k2 = self.head_dim, self.ka ** 2
        weight = self.merged.weight.detach().view(hd, k2, k2).permute(1, 2, 0)
        bias = self.merged.bias.detach().view(hd, k2).t()
        return weight, bias, self.relative_position_bias_table.detach().view(self.num_heads, k2)

    def _forward_slots(self, q, k, v, B: int, H: int, W: int) -> torch.Tensor:
        """Re-parameterised path: one neighbour slot at a time, so the k²-times expanded keys and
        values are never held in memory at once (1.3× faster on a CPU for Slide-Swin-T stage 1)."""
        nh, hd, ka = self.num_heads, self.head_dim, self.ka
        k2 = ka * ka
        weight = self.merged.weight.view(hd, k2, 1, ka, ka)
        bias = self.merged.bias.view(hd, k2)
        table = self.relative_position_bias_table.view(1, nh, k2, 1, 1)
        q = (q * self.scale).view(B, nh, hd, H, W)
        logits = torch.stack([
            (q * F.conv2d(k, weight[:, i], bias[:, i], padding=ka // 2, groups=hd).view(B, nh, hd, H, W)).sum(2)
            for i in range(k2)], dim=2)
        # The table is added to the keys, i.e. table_i · Σ_d q_d on the logits.
        attn = self.attn_drop((logits + table * q.sum(2, keepdim=True)).softmax(dim=2))   # [B, nh, k2, H, W]
        out = None
        for i in range(k2):
            v_i = F.conv2d(v, weight[:, i], bias[:, i], padding=ka // 2, groups=hd).view(B, nh, hd, H, W)
            term = attn[:, :, i:i + 1] * v_i
            out = term if out is None else out + term
        return self.proj_drop(self.proj(out.reshape(B, nh * hd, H, W).permute(0, 2, 3, 1)))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge the fixed shift and the deformed-shift convolutions into one (inference)."""
        merged = nn.Conv2d(self.head_dim, self.ka ** 2 * self.head_dim, self.ka, padding=self.ka // 2,
                           groups=self.head_dim, bias=True).to(self.dep_conv.weight)
        merged.weight.copy_(self.dep_conv.weight + (self.dep_conv1.weight if self.use_deform else 0))
        merged.bias.copy_(self.dep_conv.bias + (self.dep_conv1.bias if self.use_deform else 0))
        self.merged = merged.requires_grad_(False)
