"""ATS: Fayyaz et al., "Adaptive Token Sampling for Efficient Vision Transformers", ECCV 2022 (Sec. 3:
token significance scores, inverse transform sampling). Parameter-free: drops into a trained ViT.

At each sampling block the [CLS] attention row scores every image token (``S_j = Σ_h A_h[0, j]·‖v_j‖``,
normalised to sum 1), the scores' CDF is sampled at evenly spaced points and the block keeps the
tokens the samples land on; repeated samples collapse, so every image keeps its own number of
tokens. The block's attention output is computed for the kept tokens only (over all current keys),
then its MLP runs on them. What this follows is adaptivetokensampling/ATS (``ats_block.py``), where
it differs from the paper:

* Samples: ``K = keep_rate · n₀`` points (n₀ = the image tokens the network started with; the code
  always takes n₀ — ``keep_rate=1`` is the released setting, and ATS still drops tokens there).
  The CDF is min-max normalised, the points run evenly from the smallest positive normalised CDF
  value to 1 (``y_k = y₀ + k(1 − y₀)/(K − 1)``), and each picks the token whose normalised CDF is
  nearest (first on ties), not the inverse CDF of the paper. Tokens are then in ascending score
  order, after the prefix tokens. The least significant token of the first sampling block sits at
  CDF 0 and is never kept.
* Scores sum the heads' [CLS] rows (no mean; the normalisation cancels it) and use the norm of the
  value over all heads. The [CLS] row is the masked softmax with eps that the code uses for every
  attention (``accel.reducers.masked_softmax``); the blocks' outputs use SDPA with padded keys
  masked out (the eps terms move each weight by O(1e-6), far below the parity tolerance).
* A batch is padded to its longest image (pads: patch index -1 in ``state["index"]``, zero rows,
  never attended to). Tokens dropped at an earlier block count as zero scores in later CDFs (so the
  min-max normalisation starts from 0 there), as the code does for every image with
  ``DROP_TOKENS=False`` and, with the released ``DROP_TOKENS=True``, for every image but the
  longest of its batch — the code normalises that one without its zeros, so its tokens depend on
  the other images in the batch. Here an image's tokens and logits never do (up to the eps terms):
  each image gets what the code gives with ``DROP_TOKENS=False``.
* ``static_width=True`` pads every image to the K samples instead (at most ``min(K, n)`` distinct tokens
  of the block's n), the width the code's ``DROP_TOKENS=False`` keeps: the width is then known from
  the shapes, so a forward reads nothing back to the host (the batch's widest count costs one
  read-back per sampling block) and torch.compile traces it as one graph (CUDA graphs too), at the
  cost of up to K rows per block where the batch's widest image may keep fewer. Tokens and logits
  are the same either way (padding is never attended to).
* No loop over images: sorting, the CDF, the nearest-sample search (a [B, K, n] distance table, as
  in the code) and the de-duplication are batched tensor operations.

Prefix tokens ([CLS], DIST) are always kept; only [CLS] attention scores. The code's check of the
last sample against the value 1 while de-duplicating only matters for n₀ ≤ 2 and is left out.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from accel.errors import UserInputError
from accel.reducers.attention import attention, attn_residual, check_plain_block, mlp_residual
from accel.reducers.base import State, TokenReducer
from accel.reducers.evo_core import gather_tokens
from accel.reducers.masked_softmax import masked_softmax
from accel.reducers.selection import KeptTokens


class ATS(TokenReducer):
    """Adaptive Token Sampling (ECCV 2022) at the blocks in ``locations`` (0-based; the authors' DeiT
    config samples in every block from 3 on).

    Args:
        keep_rate: samples per sampling block as a fraction of the image tokens the network started
            with, in (0, 1]; 1 = the authors' setting. Images keep at most that many tokens.
        locations: 0-based indices of the sampling blocks.
        explicit_attention: the reference style (full N×N attention with the masked softmax).
        static_width: pad to the K samples rather than to the batch's widest image: no host read-back
            and one torch.compile graph, more rows per block (see the module docstring).
    """

    def __init__(self, keep_rate: float = 1.0, locations: Sequence[int] = tuple(range(3, 12)),
                 explicit_attention: bool = False, static_width: bool = False) -> None:
        super().__init__(keep_rate, explicit_attention)
        self.locations = tuple(int(i) for i in locations)
        self.static_width = bool(static_width)

    def bind(self, vit: nn.Module) -> None:
        super().bind(vit)
        if getattr(vit, "cls_token", None) is None or not set(self.locations) <= set(range(len(vit.blocks))):
            raise UserInputError(f"ATS locations={list(self.locations)}: expected a model with a [CLS] token and "
                                 f"0-based block indices below its {len(vit.blocks)} blocks.")
        if getattr(vit, "global_pool", "token") != "token":
            raise UserInputError(f"ATS keeps a different number of tokens per image, so the head must read [CLS], "
                                 f"but the model pools with global_pool={vit.global_pool!r}; expected 'token'.")
        for blk in vit.blocks:
            check_plain_block(blk, "ATS")

    def reset(self, x: torch.Tensor, num_prefix: int) -> State:
        state = super().reset(x, num_prefix)
        # Original patch index of every current image token, -1 for padding.
        state["index"] = torch.arange(x.shape[1] - num_prefix, device=x.device).expand(x.shape[0], -1)
        state["n0"], state["padded"] = x.shape[1] - num_prefix, False
        return state

    def samples(self, n0: int) -> int:
        return max(2, round(self.keep_rate * n0))

    def block(self, i: int, blk: nn.Module, x: torch.Tensor, state: State) -> Tuple[torch.Tensor, State]:
        p, index = state["num_prefix"], state["index"]
        keys = torch.cat([index.new_ones(index.shape[0], p, dtype=torch.bool), index >= 0], dim=1)  # [B, N]
        if i not in self.locations:
            if not state["padded"]:
                return self.full_block(blk, x), state
            bias = torch.zeros(keys.shape, dtype=x.dtype, device=x.device).masked_fill_(~keys, float("-inf"))
            x = attn_residual(blk, x, attention(blk.attn, blk.norm1(x), bias=bias[:, None, None],
                                                explicit=self.explicit_attention))
            return mlp_residual(blk, x) * keys.unsqueeze(-1), state

        q, k, v = self._qkv(blk.attn, blk.norm1(x))
        scores = self._significance(blk.attn, q, k, v, keys, p)                # [B, n], 0 for padding
        chosen, valid, padded = self._sample(scores, index, state["n0"])
        rows = torch.cat([torch.arange(p, device=x.device).expand(x.shape[0], -1), p + chosen], dim=1)
        out = self._attend(blk.attn, q, k, v, keys, rows)                      # [B, p + W, C]
        keep = torch.cat([valid.new_ones(valid.shape[0], p), valid], dim=1).unsqueeze(-1)
        x = (gather_tokens(x, rows) + blk.drop_path1(blk.ls1(out))) * keep
        x = mlp_residual(blk, x) * keep
        kept = torch.where(valid, index.gather(1, chosen), -1)
        self.record(state, KeptTokens(i, self.grid, kept=kept, scores=scores, source_index=index, valid=valid))
        state["index"], state["padded"] = kept, padded
        return x, state

    # --- the pieces of a sampling block ---------------------------------------------------------
    @staticmethod
    def _qkv(attn: nn.Module, x: torch.Tensor):
        B, N, _ = x.shape
        q, k, v = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    @torch.no_grad()
    def _significance(self, attn, q, k, v, keys, p) -> torch.Tensor:
        """Normalised significance scores of the image tokens (Sec. 3.2), 0 for padding."""
        B, H, N, D = v.shape
        logits = (q[:, :, :1] @ k.transpose(-2, -1)) * attn.scale                 # [B, H, 1, N], as the code
        row = masked_softmax(logits.masked_fill(~keys[:, None, None], float("-inf")), keys)
        value_norm = torch.linalg.vector_norm(v.transpose(1, 2).reshape(B, N, H * D), dim=-1)
        # float32: under bf16 autocast the CDF would not resolve the gaps between samples
        s = (row[:, :, 0].sum(dim=1).float() * value_norm.float())[:, p:] * keys[:, p:]
        return s / s.sum(dim=1, keepdim=True)

    @torch.no_grad()
    def cdf_samples(self, scores: torch.Tensor, index: torch.Tensor, n0: int):
        """The sampling of Sec. 3.3 as the code sets it up, for ``n0`` starting image tokens: the tokens
        in ascending score order [B, n] (padding first), their normalised CDF [B, n] and the K sample
        points [B, K]; each sample keeps the token whose CDF value is nearest."""
        n = scores.shape[1]
        sorted_scores, order = scores.sort(dim=1)                                # padding first (score 0)
        cdf = sorted_scores.cumsum(dim=1)
        count = (index >= 0).sum(dim=1)
        # Min-max normalisation; tokens dropped earlier are zero entries of the CDF, so its min is 0 then.
        first = cdf.gather(1, (n - count).clamp(max=n - 1).unsqueeze(1)).squeeze(1)
        lo = torch.where(count < n0, torch.zeros_like(first), first).unsqueeze(1)
        cdf = (cdf - lo) / (cdf[:, -1:] - lo)
        K = self.samples(n0)
        y0 = (cdf + (cdf == 0).to(cdf.dtype) * 1e8).min(dim=1, keepdim=True).values
        steps = torch.arange(K, device=cdf.device, dtype=cdf.dtype)
        ys = y0 + ((torch.linspace(0, 1, K, device=cdf.device, dtype=cdf.dtype) * (K - 1)) - y0 * steps) / (K - 1)
        return order, cdf, ys

    @torch.no_grad()
    def _sample(self, scores: torch.Tensor, index: torch.Tensor, n0: int):
        """Inverse transform sampling (Sec. 3.3) as the code does it: the kept tokens [B, W] in ascending
        score order (padded with a repeat), which of them are real, and whether any image is padded."""
        n, K = scores.shape[1], self.samples(n0)
        order, cdf, ys = self.cdf_samples(scores, index, n0)
        picked = (ys.unsqueeze(2) - cdf.unsqueeze(1)).abs().min(dim=2).indices.sort(dim=1).values   # [B, K]
        repeat = F.pad(picked[:, 1:] == picked[:, :-1], (0, 1), value=False)   # keep the last of each run
        picked = picked.masked_fill(repeat, n).sort(dim=1).values
        if self.static_width:
            width, padded = min(K, n), True    # at most K distinct samples of n tokens: known from the shapes
        else:
            counts = (~repeat).sum(dim=1)
            fewest, width = torch.stack([counts.min(), counts.max()]).tolist()     # one host sync per block
            padded = fewest < width
        picked = picked[:, :width]
        return order.gather(1, picked.clamp(max=n - 1)), picked < n, padded

    def _attend(self, attn, q, k, v, keys, rows) -> torch.Tensor:
        """The attention output of the query rows ``rows`` [B, R] over every unpadded key, after proj."""
        B, H, N, D = q.shape
        q = q.gather(2, rows[:, None, :, None].expand(-1, H, -1, D))
        if self.explicit_attention:
            logits = (q @ k.transpose(-2, -1)) * attn.scale
            out = masked_softmax(logits.masked_fill(~keys[:, None, None], float("-inf")), keys).to(v.dtype) @ v
        else:
            drop = attn.attn_drop.p if attn.training else 0.0
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=keys[:, None, None], dropout_p=drop)
        return attn.proj_drop(attn.proj(attn.norm(out.transpose(1, 2).reshape(B, rows.shape[1], H * D))))
