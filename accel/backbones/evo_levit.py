"""Evo-LeViT: Xu et al., "Evo-ViT: Slow-Fast Token Evolution for Dynamic Vision Transformer", AAAI 2022
(Sec. 3.2 global class attention, Sec. 3.3 slow-fast updating with a representative token, Sec. 3.4
layer-to-stage training), on LeViT — as YifanXu74/Evo-ViT levit/evo_levit.py implements it.

Built from timm's LeViT layers (``Stem16``, ``LinearNorm``, ``LevitMlp``, ``NormLinear``,
``Downsample``); parameter names follow timm's ``levit_*`` so ``fuse_levit`` folds the BatchNorms.
What the reference changes in LeViT, and this module reproduces:

* a [CLS] token and a learnt position embedding (``poss``) replace LeViT's attention biases
  (evo_levit.py:571, 582-584; no ``attention_biases`` anywhere); every shrinking attention adds its
  own position embedding to its input (467, 510);
* global class attention ``A``: the head-mean of the [CLS] query row over the patch keys (394),
  then ``A ← (1−t)·A + t·s`` with ``t = sigmoid(learn_tradeoff)`` (inference, and training from the
  stage-wise epoch on) or 0.5 (388-408); selected tokens only while some are parked (401-408);
* pruned layers (per-layer ratio < 1) sort the patch tokens by ``A`` and keep ``int(P·r)`` (188);
  the placeholders are merged into one representative token weighted by ``A / ΣA`` (106-111),
  which goes through the layers and whose residual updates are added to every placeholder
  (203-212). Stage-wise (inference): one selection per stage with the stage ratio; layer-wise
  (training before epoch 200, engine_levit.py:36-41): re-selection at every pruned layer (136-162);
* the shrinking attention restores raster order, subsamples ``A``, updates it with its own [CLS]
  row (subsampled), and rescales it to keep ``ΣA`` (490-536);
* heads: mean of all patch tokens → class + distillation heads (averaged at evaluation), and in
  training auxiliary [CLS] heads (``head_cls``, ``head_cls_dist``; 720-733).

Line numbers: YifanXu74/Evo-ViT levit/evo_levit.py at fd630d01 (the same lines at 4c5d9b30, the
commit of the parity fixtures, tests/fixtures/reference/PROVENANCE.md). Where the code goes
beyond or against what the paper/README describe (paper PDF not checked here): the learnt,
per-layer trade-off (the method is described with a fixed one); head-mean scores (Evo-ViT on DeiT
sums over heads); the score carry and ΣA rescaling through the shrinking attention, the removal of
LeViT's attention biases and the repeated position embeddings are code-only; the auxiliary [CLS]
heads and the 'cls' distillation loss (losses_levit.py) are code-only; while training before epoch
200 the reference also *evaluates* layer-wise (engine_levit.py never switches back) — here
evaluation is always stage-wise, as its ``--eval``. The authors' revision 3d19ce41 differs: it
keeps ``int(P·r) − 1`` tokens in stage-wise selection, has the learnt trade-off off by default and
Evo-LeViT-128S undistilled; this file follows 4c5d9b30.

Reference quirk kept: the attention decides "nothing is parked" by sequence length
(``len(A) − N + 2 == 1``, 397), so when exactly one token is parked its score is updated too,
with the attention paid to the representative token (never with the reference's ratios at 224²).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import torch
from timm.layers import DropPath, trunc_normal_
from timm.models.levit import Downsample, LevitMlp, LinearNorm, NormLinear, Stem16, model_cfgs
from torch import nn

from accel.backbones.evo_levit_names import is_reference_evo_levit, reference_to_ours
from accel.checkpoint import load_into
from accel.errors import UserInputError
from accel.heads import Heads
from accel.reducers import evo_core
from accel.reducers.protocol import RecordsSelections
from accel.reducers.selection import Selection, SlowFastTokens

log = logging.getLogger(__name__)

FIXED_TRADEOFF = 0.5  # evo_levit.py:344 global_attn_tradeoff


class EvoAttention(nn.Module):
    """LeViT attention without attention biases; also returns the head-mean [CLS] query row."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, act_layer) -> None:
        super().__init__()
        self.num_heads, self.key_dim = num_heads, key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.scale = key_dim ** -0.5
        self.qkv = LinearNorm(dim, num_heads * (2 * key_dim + self.val_dim))
        self.proj = nn.Sequential(OrderedDict([("act", act_layer()),
                                               ("ln", LinearNorm(self.val_dim * num_heads, dim, bn_weight_init=0))]))
        self.learn_tradeoff = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        B, N, _ = x.shape
        # Per-head [q | k | v] channel layout, as LeViT.
        q, k, v = self.qkv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.key_dim, self.val_dim], dim=3)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # The explicit matrix, as the reference: its [CLS] row is the token score.
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(B, N, -1)
        return self.proj(out), attn[:, :, 0, 1:].mean(dim=1)


class EvoBlock(nn.Module):
    def __init__(self, dim: int, key_dim: int, num_heads: int, attn_ratio: float, mlp_ratio: float, act_layer,
                 drop_path: float) -> None:
        super().__init__()
        self.attn = EvoAttention(dim, key_dim, num_heads, attn_ratio, act_layer)
        self.mlp = LevitMlp(dim, int(dim * mlp_ratio), act_layer=act_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()


class EvoAttentionDownsample(nn.Module):
    """LeViT's shrinking attention (queries on the stride-2 grid) with the [CLS] token, a position
    embedding added to its input, and the global class attention carried to the coarser grid."""

    def __init__(self, in_dim: int, out_dim: int, key_dim: int, num_heads: int, attn_ratio: float, resolution: int,
                 act_layer) -> None:
        super().__init__()
        self.num_heads, self.key_dim = num_heads, key_dim
        self.val_dim = int(attn_ratio * key_dim)
        self.scale = key_dim ** -0.5
        self.kv = LinearNorm(in_dim, num_heads * (key_dim + self.val_dim))
        self.q = nn.Sequential(OrderedDict([("down", Downsample(2, resolution)),
                                            ("ln", LinearNorm(in_dim, num_heads * key_dim))]))
        self.proj = nn.Sequential(OrderedDict([("act", act_layer()),
                                               ("ln", LinearNorm(self.val_dim * num_heads, out_dim))]))
        self.pos_embed = nn.Parameter(trunc_normal_(torch.zeros(1, resolution ** 2 + 1, in_dim), std=0.02))
        self.learn_tradeoff = nn.Parameter(torch.zeros(1))

    def _down(self, scores: torch.Tensor) -> torch.Tensor:
        return self.q.down(scores.unsqueeze(-1)).squeeze(-1)

    def forward(self, x: torch.Tensor, A: torch.Tensor, index: torch.Tensor, t) -> Tuple[torch.Tensor, torch.Tensor]:
        total = A.sum(dim=1, keepdim=True)
        order = torch.argsort(index, dim=1)  # back to raster order for the grid subsampling
        A = self._down(A.gather(1, order))
        x = torch.cat([x[:, :1], evo_core.gather_tokens(x[:, 1:], order)], dim=1) + self.pos_embed
        B, N, _ = x.shape
        k, v = self.kv(x).view(B, N, self.num_heads, -1).split([self.key_dim, self.val_dim], dim=3)
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        q = self.q.ln(torch.cat([x[:, :1], self.q.down(x[:, 1:])], dim=1))
        q = q.view(B, -1, self.num_heads, self.key_dim).transpose(1, 2)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        A = (1 - t) * A + t * self._down(attn[:, :, 0, 1:].mean(dim=1))
        A = A * (total / A.sum(dim=1, keepdim=True))  # the reference keeps ΣA across the shrink
        out = (attn @ v).transpose(1, 2).reshape(B, q.shape[2], -1)
        return self.proj(out), A


class EvoDownsample(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, key_dim: int, resolution: int, act_layer, drop_path: float) -> None:
        super().__init__()
        # Down-op parameters of LeViT's model_factory: num_heads = in_dim // key_dim, attn_ratio 4, mlp 2.
        self.attn_downsample = EvoAttentionDownsample(in_dim, out_dim, key_dim, in_dim // key_dim, 4.0, resolution,
                                                      act_layer)
        self.mlp = LevitMlp(out_dim, out_dim * 2, act_layer=act_layer)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x, A, index, t):
        x, A = self.attn_downsample(x, A, index, t)
        return x + self.drop_path(self.mlp(x)), A


class EvoLevitStage(nn.Module):
    def __init__(self, downsample: Optional[nn.Module], blocks: List[EvoBlock]) -> None:
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.ModuleList(blocks)


class EvoLevit(evo_core.LayerToStage, RecordsSelections, nn.Module):
    """Evo-LeViT with the reference's layout (3 stages, key dim ``key_dim``, attention ratio 2,
    MLP ratio 2, Hardswish) and its prune ratios: ``prune_ratios`` per layer (1 = full layer; the
    full layers of a stage come first) and ``stage_prune_ratios`` per stage (stage-wise selection).

    A token-reducing network (``accel.reducers.protocol.TokenReducingNet``): ``keep_rate``,
    ``layerwise``, ``selections`` (one ``SlowFastTokens`` per selection, indices on the stage's
    grid) and ``forward_features`` / ``forward_head`` as timm's.
    """

    def __init__(self, embed_dim: Sequence[int], key_dim: int, num_heads: Sequence[int], depth: Sequence[int],
                 prune_ratios: Sequence[float], stage_prune_ratios: Sequence[float], num_classes: int = 1000,
                 img_size: int = 224, distilled: bool = True, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.prune_ratios = [float(r) for r in prune_ratios]
        self.stage_prune_ratios = [float(r) for r in stage_prune_ratios]
        self.depth = tuple(int(d) for d in depth)
        _check_ratios(self.prune_ratios, self.stage_prune_ratios, self.depth)
        self.pruned_layers = [r < 1 for r in self.prune_ratios]  # fixed: set_keep_rate changes only their ratio
        if img_size % 16:
            raise UserInputError(f"Evo-LeViT img_size={img_size} is not a multiple of 16 (its stem has stride 16); "
                                 "expected e.g. 224.")
        act = nn.Hardswish
        self.img_size, self.num_classes, self.distilled = img_size, num_classes, distilled
        self.num_features = embed_dim[-1]
        self.stem = Stem16(3, embed_dim[0], act_layer=act)
        res = img_size // 16
        self.grids: List[Tuple[int, int]] = []  # each stage's token grid
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim[0]))
        self.pos_embed = nn.Parameter(trunc_normal_(torch.zeros(1, res ** 2 + 1, embed_dim[0]), std=0.02))
        stages = []
        for s, (dim, heads, d) in enumerate(zip(embed_dim, num_heads, self.depth)):
            down = None
            if s > 0:
                down = EvoDownsample(embed_dim[s - 1], dim, key_dim, res, act, drop_path_rate)
                res = (res - 1) // 2 + 1
            self.grids.append((res, res))
            stages.append(EvoLevitStage(down, [EvoBlock(dim, key_dim, heads, 2.0, 2.0, act, drop_path_rate)
                                               for _ in range(d)]))
        self.stages = nn.ModuleList(stages)
        self.head = NormLinear(self.num_features, num_classes)
        self.head_dist = NormLinear(self.num_features, num_classes) if distilled else None
        self.head_cls: Optional[nn.Module] = NormLinear(self.num_features, num_classes)
        self.head_cls_dist = NormLinear(self.num_features, num_classes) if distilled else None
        self.distilled_training = False
        # True before the stage-wise epoch: selection at every pruned layer, fixed trade-off 0.5;
        # False: stage-wise with the learnt trade-off (later epochs, inference).
        self.layerwise = False
        self._selections: List[Selection] = []

    # --- the token-reducing surface (accel.reducers.protocol.TokenReducingNet) ------------------
    @property
    def tracing(self) -> bool:
        return True  # the selections always hold everything the pictures draw

    def set_tracing(self, enable: bool) -> None:
        """Nothing to switch: the selections are always complete."""

    def set_distilled_training(self, enable: bool = True) -> None:
        if not self.distilled:
            raise UserInputError("This Evo-LeViT was built with distilled=false; it has no distillation heads.")
        self.distilled_training = bool(enable)

    def set_keep_rate(self, keep_rate: float) -> None:
        """Set every pruned layer's and stage's ratio (the reference uses 0.5 everywhere)."""
        if not 0.0 < keep_rate <= 1.0:
            raise UserInputError(f"Evo-LeViT keep_rate={keep_rate} is outside (0, 1].")
        self.prune_ratios = [keep_rate if p else 1.0 for p in self.pruned_layers]
        self.stage_prune_ratios = [keep_rate] * len(self.stage_prune_ratios)

    @property
    def keep_rate(self) -> float:
        return min(self.stage_prune_ratios)

    def remove_cls(self) -> None:
        """Drop the training-only auxiliary [CLS] heads for deployment (evo_levit.py:691-695)."""
        self.head_cls = self.head_cls_dist = None

    def no_weight_decay(self):
        # The reference exempts only the position embeddings (evo_levit.py:681-682).
        return {n for n, _ in self.named_parameters() if n.endswith("pos_embed")}

    # --- forward --------------------------------------------------------------------------------
    def _tradeoff(self, module: nn.Module):
        if self.selects_every_layer():
            return FIXED_TRADEOFF
        return torch.sigmoid(module.learn_tradeoff)

    @staticmethod
    def _residuals(blk: EvoBlock, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The block's output, its [CLS] attention row over the other tokens (head mean), and what
        its two residual branches added to the last token."""
        a, s = blk.attn(x)
        a = blk.drop_path(a)
        x = x + a
        f = blk.drop_path(blk.mlp(x))
        return x + f, s, a[:, -1:] + f[:, -1:]

    def _full(self, blk: EvoBlock, x: torch.Tensor, A: Optional[torch.Tensor]):
        x, s, _ = self._residuals(blk, x)
        return x, evo_core.update_global_attention(A, s, self._tradeoff(blk.attn))

    def _slow_fast(self, blocks: List[EvoBlock], keep: float, x, A, index, layer: int, grid: Tuple[int, int]):
        """Sort by A; the top int(P·keep) tokens (+ the representative of the others) run
        ``blocks``; every placeholder receives the representative's residual updates."""
        P = x.shape[1] - 1
        n_keep = int(P * keep)
        h, parked, A, index = evo_core.split(x, A, index, n_keep, representative=True)
        self._selections.append(SlowFastTokens(layer, grid, kept=index[:, :n_keep], global_attention=A.detach(),
                                               source_index=index))
        # Scores updated: the kept tokens, and the one placeholder too when only one is parked (quirk, 397).
        m = P if n_keep + 1 == P else n_keep
        update = 0
        for blk in blocks:
            h, s, added = self._residuals(blk, h)
            A = evo_core.update_global_attention(A, s, self._tradeoff(blk.attn), m)
            update = update + added
        return evo_core.join(h, parked, update), A, index

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (self.img_size, self.img_size):
            raise UserInputError(f"Evo-LeViT was built for {self.img_size}×{self.img_size} images (its position "
                                 f"embeddings are sized for it) but got {tuple(images.shape[-2:])}; set "
                                 f"model.img_size to the data's image size.")
        self._selections = []
        x = self.stem(images).flatten(2).transpose(1, 2)
        B, P, _ = x.shape
        x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1) + self.pos_embed
        A = None
        index = torch.arange(P, device=x.device).expand(B, -1)  # raster position of each patch token
        layer = 0
        layerwise = self.selects_every_layer()
        for s, stage in enumerate(self.stages):
            if stage.downsample is not None:
                x, A = stage.downsample(x, A, index, self._tradeoff(stage.downsample.attn_downsample))
                index = torch.arange(x.shape[1] - 1, device=x.device).expand(B, -1)
            ratios = self.prune_ratios[layer:layer + len(stage.blocks)]
            first_pruned = layer + sum(r == 1 for r in ratios)  # the full layers of a stage come first
            layer += len(stage.blocks)
            pruned = [(blk, r) for blk, r in zip(stage.blocks, ratios) if r < 1]
            for blk, r in zip(stage.blocks, ratios):
                if r == 1:
                    x, A = self._full(blk, x, A)
            if pruned and layerwise:
                for j, (blk, r) in enumerate(pruned):
                    x, A, index = self._slow_fast([blk], r, x, A, index, first_pruned + j, self.grids[s])
            elif pruned and self.stage_prune_ratios[s] < 1:
                x, A, index = self._slow_fast([b for b, _ in pruned], self.stage_prune_ratios[s], x, A, index,
                                              first_pruned, self.grids[s])
            else:  # keep rate 1 (set_keep_rate(1.0)): plain LeViT layers with the [CLS] token
                for blk, _ in pruned:
                    x, A = self._full(blk, x, A)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """Heads on ``forward_features``' tokens: the mean of the patch tokens (and [CLS] for the
        auxiliary heads). Eval mode: the class and distillation heads averaged; training mode:
        ``Heads``, with the distillation heads apart only in distilled training."""
        cls, feat = x[:, 0], x[:, 1:].mean(dim=1)
        if pre_logits:
            return feat
        aux = self.training and self.head_cls is not None
        heads = Heads(self.head(feat), dist=None if self.head_dist is None else self.head_dist(feat),
                      aux_cls=self.head_cls(cls) if aux else None,
                      aux_dist=self.head_cls_dist(cls) if aux and self.head_cls_dist is not None else None)
        if not self.training:
            return heads.eval_logits()
        return heads if self.distilled_training else heads.averaged()

    def forward(self, images: torch.Tensor):
        return self.forward_head(self.forward_features(images))


def _check_ratios(prune_ratios: List[float], stage_ratios: List[float], depth: Tuple[int, ...]) -> None:
    if len(prune_ratios) != sum(depth) or len(stage_ratios) != len(depth):
        raise UserInputError(f"Evo-LeViT prune_ratios has {len(prune_ratios)} entries and stage_prune_ratios "
                             f"{len(stage_ratios)}; expected one per layer ({sum(depth)}) and one per stage "
                             f"({len(depth)}).")
    if any(not 0 < r <= 1 for r in prune_ratios + stage_ratios):
        raise UserInputError(f"Evo-LeViT prune ratios {prune_ratios} / {stage_ratios}: expected values in (0, 1].")
    if prune_ratios[0] != 1:
        raise UserInputError("Evo-LeViT prune_ratios[0] must be 1: the first layer's [CLS] attention starts the "
                             "global class attention that later layers rank by.")
    start = 0
    for s, d in enumerate(depth):
        stage = prune_ratios[start:start + d]
        start += d
        if any(a < 1 and b == 1 for a, b in zip(stage, stage[1:])):
            raise UserInputError(f"Evo-LeViT stage {s} prune ratios {stage}: the full layers (ratio 1) must come "
                                 "before the pruned ones, as in the reference's stage modules.")


def create_evo_levit(name: str, prune_ratios: Sequence[float], stage_prune_ratios: Sequence[float],
                     num_classes: int = 1000, img_size: int = 224, distilled: bool = True,
                     drop_path_rate: float = 0.0, pretrained_path: Optional[str] = None,
                     keep_rate: Optional[float] = None) -> EvoLevit:
    """Evo-LeViT ``name`` (``evo_levit_128s`` … ``evo_levit_384``) with the LeViT architecture of the
    same size (timm's ``model_cfgs``); ``pretrained_path`` loads a local file in this project's or
    the reference's (YifanXu74/Evo-ViT) naming. ``keep_rate`` (the run's ``keep_rate``) replaces the
    ratio of every pruned layer and stage; which layers prune stays as ``prune_ratios`` says."""
    arch = name[len("evo_"):] if name.startswith("evo_levit_") else ""
    if arch not in model_cfgs or arch not in ("levit_128s", "levit_128", "levit_192", "levit_256", "levit_384"):
        raise UserInputError(f"Unknown Evo-LeViT model {name!r}; expected one of evo_levit_128s, evo_levit_128, "
                             "evo_levit_192, evo_levit_256, evo_levit_384.")
    cfg = model_cfgs[arch]
    model = EvoLevit(cfg["embed_dim"], cfg["key_dim"], cfg["num_heads"], cfg["depth"], prune_ratios,
                     stage_prune_ratios, num_classes=num_classes, img_size=img_size, distilled=distilled,
                     drop_path_rate=drop_path_rate)
    if keep_rate is not None:
        model.set_keep_rate(keep_rate)
    if pretrained_path:
        heads = ("head.", "head_dist.", "head_cls.", "head_cls_dist.")
        missing = load_into(model, pretrained_path, filter_fn=_filter, droppable=heads)
        if missing:
            log.warning("Loaded %s; re-initialised %s (class count differs).", pretrained_path, ", ".join(missing))
    return model


def _filter(sd, model: EvoLevit):
    if is_reference_evo_levit(sd):
        sd = reference_to_ours(sd, model.depth, model.pruned_layers)
    if model.head_dist is None:
        # A distilled file into an undistilled model: the distillation heads have no place here.
        sd = {k: v for k, v in sd.items() if not k.startswith(("head_dist.", "head_cls_dist."))}
    return sd
