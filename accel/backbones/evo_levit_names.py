"""Parameter names of the reference Evo-LeViT (YifanXu74/Evo-ViT levit/evo_levit.py) ↔ this project's
(accel/backbones/evo_levit.py, timm's ``levit_*`` naming plus ``cls_token``/``pos_embed``).

The reference registers every layer twice: in ``blocks`` (the layer-wise path: one ``CatModule``
per layer holding ``m1`` = attention and ``m2`` = MLP residuals, then per stage change the shrinking
attention and its MLP) and in ``stage_blocks`` (the stage-wise path: the full layers' residuals one
by one, then one ``StageModule`` whose ``m`` lists the pruned layers' residuals), so its state dict
holds each tensor under both names (evo_levit.py:596-664). ``ours_to_reference`` writes both;
``reference_to_ours`` reads both and insists the two copies agree."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from accel.errors import UserInputError

StateDict = Dict[str, torch.Tensor]

_ATTN = [("attn.qkv.", "m.qkv."), ("attn.proj.ln.", "m.proj.1."), ("attn.learn_tradeoff", "m.learn_tradeoff")]
_MLP = [("mlp.ln1.", "m.0."), ("mlp.ln2.", "m.2.")]
_DOWN = [("attn_downsample.kv.", "kv."), ("attn_downsample.q.ln.", "q.1."), ("attn_downsample.proj.ln.", "proj.1."),
         ("attn_downsample.pos_embed", "poss"), ("attn_downsample.learn_tradeoff", "learn_tradeoff")]
HEADS = ("head", "head_dist", "head_cls", "head_cls_dist")


def is_reference_evo_levit(sd: StateDict) -> bool:
    return "poss" in sd and "patch_embed.0.c.weight" in sd


def prefix_pairs(depth: Sequence[int], pruned: Sequence[bool]) -> List[Tuple[str, List[str], str]]:
    """(our prefix, the reference prefixes holding the same tensor, leaf for ``linear.``) in model order."""
    pairs: List[Tuple[str, List[str], str]] = [(f"stem.conv{i + 1}.", [f"patch_embed.{2 * i}."], "c.")
                                               for i in range(4)]
    pairs += [("cls_token", ["cls_token"], ""), ("pos_embed", ["poss"], "")]
    k = 0       # index in the reference's ``blocks``
    sb = 0      # index in its ``stage_blocks``
    layer = 0
    for s, d in enumerate(depth):
        if s > 0:  # the shrinking attention + MLP opening this stage (evo_levit.py:635-661)
            ours = f"stages.{s}.downsample."
            pairs += [(ours + a, [f"blocks.{k}.{b}", f"stage_blocks.{sb}.{b}"], "c.") for a, b in _DOWN]
            pairs += [(ours + a, [f"blocks.{k + 1}.{b}", f"stage_blocks.{sb + 1}.{b}"], "c.") for a, b in _MLP]
            k, sb = k + 2, sb + 2
        j_sub = 0
        for j in range(d):
            ours = f"stages.{s}.blocks.{j}."
            if not pruned[layer]:  # residuals listed one by one (606-625)
                attn_sb, mlp_sb = f"stage_blocks.{sb}.", f"stage_blocks.{sb + 1}."
                sb += 2
            else:  # inside the stage's StageModule, which comes after the full layers (631-633)
                attn_sb, mlp_sb = f"stage_blocks.{sb}.m.{j_sub}.", f"stage_blocks.{sb}.m.{j_sub + 1}."
                j_sub += 2
            pairs += [(ours + a, [f"blocks.{k}.m1.{b}", attn_sb + b], "c.") for a, b in _ATTN]
            pairs += [(ours + a, [f"blocks.{k}.m2.{b}", mlp_sb + b], "c.") for a, b in _MLP]
            k += 1
            layer += 1
        if j_sub:
            sb += 1
    pairs += [(f"{h}.", [f"{h}."], "l.") for h in HEADS]
    return pairs


def _split(key: str, pairs) -> Tuple[int, str]:
    for i, (ours, _, _) in enumerate(pairs):
        if key == ours or (ours.endswith(".") and key.startswith(ours)):
            return i, key[len(ours):]
    raise UserInputError(f"Evo-LeViT parameter {key!r} has no name in the reference naming; expected a state dict "
                         "of this project's EvoLevit.")


def _leaf(rest: str, linear: str) -> str:
    return linear + rest[len("linear."):] if rest.startswith("linear.") else rest


def ours_to_reference(sd: StateDict, depth: Sequence[int], pruned: Sequence[bool]) -> StateDict:
    """This project's names → the reference's (``blocks.*`` and ``stage_blocks.*`` copies)."""
    pairs = prefix_pairs(depth, pruned)
    out: StateDict = {}
    for key, v in sd.items():
        i, rest = _split(key, pairs)
        for ref in pairs[i][1]:
            out[ref + _leaf(rest, pairs[i][2])] = v
    return out


def reference_to_ours(sd: StateDict, depth: Sequence[int], pruned: Sequence[bool]) -> StateDict:
    """The reference's names → this project's; ``depth``/``pruned`` (the target model's) fix
    the layout (``pruned[layer]``: the layer sits in its stage's StageModule). Unknown names pass
    through, so that the loader can name them."""
    ours_of: Dict[str, str] = {}
    for ours, refs, linear in prefix_pairs(depth, pruned):
        for ref in refs:
            ours_of[ref] = (ours, linear)
    out: StateDict = {}
    for key, v in sd.items():
        target = None
        for ref in (key, *[key[:i + 1] for i in range(len(key)) if key[i] == "."][::-1]):
            if ref in ours_of:
                ours, linear = ours_of[ref]
                rest = key[len(ref):]
                target = ours + (linear_to_ours(rest, linear) if rest else "")
                break
        target = target or key
        if target in out and not torch.equal(out[target], v):
            raise UserInputError(f"Reference checkpoint holds two different tensors for {target!r} (its 'blocks' and "
                                 f"'stage_blocks' copies, e.g. {key!r}); expected one shared tensor.")
        out[target] = v
    return out


def linear_to_ours(rest: str, linear: str) -> str:
    return "linear." + rest[len(linear):] if rest.startswith(linear) else rest
