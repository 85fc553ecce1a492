"""DynamicViT: dynamic token sparsification with learned prediction modules (Rao et al., NeurIPS 2021;
raoyongming/DynamicViT, DeiT variant, models/dyvit.py and losses.py).

Before each block in ``locations`` a prediction module (Sec. 3.2) scores the image tokens from a
local feature and a global one (the mean over the tokens still kept) and outputs log-probabilities
of (keep, drop). At stage ``s`` (0-based) the target keep ratio is ``ρ^(s+1)`` of the *original*
image tokens (``ρ`` = ``keep_rate``; 0.7 gives 0.7, 0.49, 0.343).

* Training (Sec. 3.3): the decision is a hard Gumbel-softmax sample (straight-through gradients,
  noise from the global torch RNG as the authors' ``F.gumbel_softmax``), multiplied by the previous
  decision so that a dropped token stays dropped. No token is removed: from the first location on,
  every block runs with the attention masked so that no token attends to a dropped one (a dropped
  token still attends to itself), through the authors' masked softmax with its eps terms
  (``accel.reducers.masked_softmax``). The ratio loss (Sec. 3.4) is ``training_losses``; the final
  normed image tokens and the final decision go out in ``Heads.tokens`` / ``Heads.token_keep`` for
  the teacher's token distillation (``callbacks.distillation.DynamicViTDistillationLoss``).
* Evaluation: the ``int(n0·ρ^(s+1))`` tokens with the highest keep score are gathered (``n0``: image
  tokens of the input), in descending score order as the authors' ``argsort``; the blocks run on
  them with plain attention (timm's, fused).

Where the public code and the paper differ, this follows the code:

* the ratio loss uses the hard Gumbel samples, per image, summed over stages and divided by their
  number (losses.py ``DistillDiffPruningLoss_dynamic``), weighted by ``ratio_weight`` (2.0 for DeiT-S,
  5.0 for DeiT-B in their README);
* the masked softmax adds eps (1e-6) to numerator and denominator, which the paper's Eq. 11 does not;
* the kept count at inference truncates (``int``) rather than rounding, always from the original
  token count, and the kept tokens are ordered by score, not by position;
* the token-distillation MSE averages over tokens *and* channels (the paper normalises by tokens).

Where the code would give NaN, or differs by O(eps), this does not follow it: an image whose every
token was dropped gets a zero global feature instead of 0/0 (NaN); a stage keeps at least one token
at inference; and before the first location (nothing dropped yet), where the authors also run the
eps-softmax, the blocks run timm's own attention, whose weights differ by at most ~1e-6 relative
there (every key is kept and the largest term is at least 1). The
authors hard-code 196 image tokens (``init_n = 14*14``); here ``n0`` is the model's own count.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from accel.errors import UserInputError
from accel.heads import Heads
from accel.reducers.attention import AttnOut, attn_residual, check_plain_block, mlp_residual
from accel.reducers.base import State, TokenReducer
from accel.reducers.evo_core import gather_tokens
from accel.reducers.masked_softmax import masked_softmax
from accel.reducers.selection import KeptTokens


class Predictor(nn.Module):
    """The prediction module (Sec. 3.2; dyvit.py ``PredictorLG``): ``h = GELU(Linear(LayerNorm(x)))``;
    the first half of ``h``'s channels is the local feature, the second half averaged over the kept
    tokens the global one; an MLP C → C/2 → C/4 → 2 on [local, global] gives log-probabilities of
    (keep, drop). Submodule names follow the authors' (``in_conv``, ``out_conv``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                      nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        """``x`` [B, n, C] image tokens; ``keep`` [B, n, 1] the current decision (None: all kept)."""
        h = self.in_conv(x)
        half = h.shape[-1] // 2
        local, glob = h[..., :half], h[..., half:]
        if keep is None:
            glob = glob.mean(dim=1, keepdim=True)
        else:
            # The authors divide by the count as it is: an image whose every token was dropped gets NaN
            # (likely with few tokens: 16 of them, 3 stages, p = ½ at the start). Clamped, its global
            # feature is 0 instead; any image with a kept token is unchanged.
            glob = (glob * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp_min(1e-6)
        z = self.out_conv[:-2](torch.cat([local, glob.expand(-1, h.shape[1], -1)], dim=-1))
        # The last layer in float32: the keep and drop logits are each O(1) while their difference, which
        # ranks the tokens, can be far smaller; rounded to bfloat16 (steps of 2⁻⁷ near 1) whole runs of
        # tokens would tie and top-k would keep them by position.
        with _without_autocast(z.device):
            return self.out_conv[-1](self.out_conv[-2](z.float()))


def _without_autocast(device: torch.device):
    """A context with autocast off on ``device``; the meta device has no autocast to turn off."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def masked_attention(attn: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> AttnOut:
    """timm ``Attention`` on ``x`` [B, N, C] with the keys masked by ``keep`` [B, N] (the authors'
    ``softmax_with_policy``); the N×N matrix is explicit, as the mask's eps terms need it."""
    B, N, C = x.shape
    H, D = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    probs = attn.attn_drop(masked_softmax((q @ k.transpose(-2, -1)) * attn.scale, keep))
    out = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(B, N, H * D)
    return AttnOut(attn.proj_drop(attn.proj(attn.norm(out))), None, None)


class DynamicViT(TokenReducer):
    """DynamicViT's token sparsification on any timm ViT (see the module docstring).

    ``keep_rate`` ρ: the stage targets are ρ, ρ², ρ³ of the original image tokens (their README: 0.7).
    ``locations``: the 0-based blocks whose input is pruned (DeiT: 3, 6, 9).
    ``ratio_weight``: weight of the keep-ratio loss (``train/loss_ratio``), divided by the number of
    stages as the authors' loss does.
    At inference each pruning block records ``KeptTokens`` (``scores``: the predictor's keep
    probability of every token it scored). The predictors are ``reducer.score_predictor.<s>.*`` (the authors' names behind ``reducer.``:
    ``from_authors_state_dict`` converts their checkpoints).
    """

    def __init__(self, keep_rate: float = 0.7, locations: Sequence[int] = (3, 6, 9), ratio_weight: float = 2.0) -> None:
        super().__init__(keep_rate)
        self.locations = tuple(int(i) for i in locations)
        if not self.locations or list(self.locations) != sorted(set(self.locations)):
            raise UserInputError(f"DynamicViT locations={list(locations)}: expected increasing, distinct block indices.")
        if ratio_weight < 0:
            raise UserInputError(f"DynamicViT ratio_weight={ratio_weight}: expected a weight ≥ 0.")
        self.ratio_weight = float(ratio_weight)
        self.score_predictor = nn.ModuleList()

    def bind(self, vit: nn.Module) -> None:
        super().bind(vit)
        depth = len(vit.blocks)
        if self.locations[-1] >= depth:
            raise UserInputError(f"DynamicViT locations={list(self.locations)}: expected 0-based block indices below "
                                 f"the model's {depth} blocks.")
        for blk in vit.blocks[self.locations[0]:]:
            check_plain_block(blk, "DynamicViT")
        if len(self.score_predictor) == 0:
            self.score_predictor = nn.ModuleList(Predictor(vit.embed_dim) for _ in self.locations)
            self.score_predictor.apply(_init_weights)

    def stage_ratio(self, stage: int) -> float:
        """Target keep ratio of stage ``stage`` (0-based), of the original image tokens: ρ^(stage+1)."""
        return self.keep_rate ** (stage + 1)

    def reset(self, x, num_prefix):
        state = super().reset(x, num_prefix)
        B, n = x.shape[0], x.shape[1] - num_prefix
        state["num_patches"] = n
        state["index"] = torch.arange(n, device=x.device).expand(B, -1)
        state["decision"] = None     # training: [B, n, 1], the cumulative hard decision
        state["hard"] = ()           # training: each stage's decision [B, n]
        return state

    def block(self, i, blk, x, state):
        p = state["num_prefix"]
        if i in self.locations:
            stage = self.locations.index(i)
            log_probs = self.score_predictor[stage](x[:, p:], state["decision"])
            if self.training:
                return self._train_block(blk, x, state, log_probs)
            return self._eval_block(i, stage, blk, x, state, log_probs)
        if self.training and state["decision"] is not None:
            return self._masked_block(blk, x, state), state
        return self.full_block(blk, x), state

    def _train_block(self, blk, x, state, log_probs):
        decision = state["decision"]
        hard = F.gumbel_softmax(log_probs, hard=True)[..., 0:1]
        hard = hard if decision is None else hard * decision
        state["decision"] = hard
        state["hard"] = state["hard"] + (hard.squeeze(-1),)
        return self._masked_block(blk, x, state), state

    def _masked_block(self, blk, x, state):
        hard = state["decision"].squeeze(-1)
        keep = torch.cat([hard.new_ones(hard.shape[0], state["num_prefix"]), hard], dim=1)
        return mlp_residual(blk, attn_residual(blk, x, masked_attention(blk.attn, blk.norm1(x), keep)))

    def _eval_block(self, i, stage, blk, x, state, log_probs):
        p = state["num_prefix"]
        keep = max(int(state["num_patches"] * self.stage_ratio(stage)), 1)
        if keep >= x.shape[1] - p:
            return self.full_block(blk, x), state
        score = log_probs[..., 0]
        idx = score.topk(keep, dim=1).indices                          # descending score, as their argsort
        x = torch.cat([x[:, :p], gather_tokens(x[:, p:], idx)], dim=1)
        kept = state["index"].gather(1, idx)
        self.record(state, KeptTokens(i, self.grid, kept=kept, scores=score.detach().exp(),
                                      source_index=state["index"]))
        state["index"] = kept
        return self.full_block(blk, x), state

    def head(self, vit, x, state, pre_logits=False):
        out = super().head(vit, x, state, pre_logits=pre_logits)
        if not self.training or pre_logits or state is None or state["decision"] is None:
            return out
        # Token distillation reads the final image tokens and which of them are still kept.
        return Heads.of(out).with_tokens(x[:, state["num_prefix"]:], state["decision"].squeeze(-1).detach())

    def training_losses(self, state: State) -> Dict[str, torch.Tensor]:
        """The keep-ratio loss: Σ_s mean_b (mean_i D^s_bi − ρ^(s+1))², × ratio_weight / stages."""
        if not state["hard"]:
            return {}
        loss = sum(((hard.mean(dim=1) - self.stage_ratio(s)) ** 2).mean() for s, hard in enumerate(state["hard"]))
        return {"ratio": self.ratio_weight * loss / len(self.locations)}

    def extra_repr(self) -> str:
        return f"keep_rate={self.keep_rate}, locations={list(self.locations)}, ratio_weight={self.ratio_weight}"


def _init_weights(m: nn.Module) -> None:
    # As the authors' model initialises its predictors (pretrained weights never cover them).
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def from_authors_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A raoyongming/DynamicViT DeiT checkpoint (``model`` entry) in this wrapper's naming: the
    predictors move under ``reducer.``; every other key is timm's already."""
    return {(f"reducer.{k}" if k.startswith("score_predictor.") else k): v for k, v in state_dict.items()}
