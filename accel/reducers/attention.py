"""Run a timm ViT block in two halves around a token-reduction step, reading the [CLS] attention
row (and the keys) without materialising the N×N attention matrix.

The block's attention output comes from ``F.scaled_dot_product_attention`` (fused kernels on GPU);
the [CLS] row is recomputed as one 1×N query product per head, which costs O(N·C) instead of the
O(N²·C) the reference implementations spend on an explicit attention matrix.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block
from torch import nn

from accel.errors import UserInputError


class AttnOut(NamedTuple):
    out: torch.Tensor                 # attention output after proj, [B, N, C] (before residual)
    cls_attn: Optional[torch.Tensor]  # softmax row of query 0 over all keys, per head [B, H, N]
    keys: Optional[torch.Tensor]      # keys averaged over heads [B, N, D] (ToMe's metric)


def check_plain_block(blk: nn.Module, where: str) -> None:
    """The reducers re-implement timm's ``Block``/``Attention`` forward: refuse variants they would
    silently get wrong (parallel blocks, gated attention)."""
    if not isinstance(blk, Block) or not isinstance(blk.attn, Attention):
        raise UserInputError(f"{where}: block type {type(blk).__name__} with {type(getattr(blk, 'attn', None)).__name__} "
                             "is not supported; expected timm's vision_transformer.Block with Attention.")
    if getattr(blk.attn, "gate", None) is not None:
        raise UserInputError(f"{where}: gated attention is not supported by token reducers.")


def attention(attn: Attention, x: torch.Tensor, bias: Optional[torch.Tensor] = None, cls_row: bool = False,
              mean_keys: bool = False, explicit: bool = False) -> AttnOut:
    """timm ``Attention.forward`` on ``x`` plus, on request, the [CLS] attention row and the
    head-averaged keys. ``bias`` [B, 1, 1, N] is added to the logits (ToMe's log-size).
    ``explicit`` computes the full N×N matrix as the reference implementations do (for comparison)."""
    B, N, C = x.shape
    H, D = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if explicit:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
        probs = attn.attn_drop((logits if bias is None else logits + bias).softmax(dim=-1))
        # A float32 bias (ToMe's log-size) promotes the probabilities; the product is in v's dtype.
        out = attn.proj_drop(attn.proj(attn.norm((probs.to(v.dtype) @ v).transpose(1, 2).reshape(B, N, H * D))))
        return AttnOut(out, probs[:, :, 0] if cls_row else None, k.mean(1) if mean_keys else None)
    drop = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), dropout_p=drop)
    row = None
    if cls_row:
        logits = (q[:, :, :1] * attn.scale) @ k.transpose(-2, -1)  # [B, H, 1, N]
        if bias is not None:
            logits = logits + bias
        row = logits.softmax(dim=-1).squeeze(2)
    out = attn.proj_drop(attn.proj(attn.norm(out.transpose(1, 2).reshape(B, N, H * D))))
    return AttnOut(out, row, k.mean(1) if mean_keys else None)


def attn_residual(blk: Block, x: torch.Tensor, a: AttnOut) -> torch.Tensor:
    """First half of a pre-norm block: ``x + drop_path(ls1(attn))``."""
    return x + blk.drop_path1(blk.ls1(a.out))


def mlp_residual(blk: Block, x: torch.Tensor) -> torch.Tensor:
    """Second half of a pre-norm block: ``x + drop_path(ls2(mlp(norm2(x))))``."""
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))
