"""Independent re-statements of the reference implementations' forward passes, for equality tests.

Each follows the algorithm of the public reference code as ../shared/reference/token-reduction.md
describes it (YifanXu74/Evo-ViT deit/evo_deit.py): explicit N×N attention matrices, per-sample Python
loops and the reference's parameter layout — deliberately unlike the fast code under test. EViT and
ToMe are compared with the authors' own outputs instead (tests/fixtures/reference/)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


# --- Evo-ViT (functional, on a state dict in Evo-ViT's own naming) -----------------------------------
def evo_forward(sd, images, heads, patch, training=False, prune=0.5, start=4, stages=(4, 8), tradeoff=0.5):
    ln = lambda x, p: F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], 1e-6)  # noqa: E731
    lin = lambda x, p: F.linear(x, sd[p + ".weight"], sd[p + ".bias"])  # noqa: E731
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("qks."))
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]

    def attn_probs_and_out(i, x):
        B, N, C = x.shape
        h = ln(x, f"norms.{i}")
        q, k = lin(h, f"qks.{i}.qk").reshape(B, N, 2, heads, C // heads).permute(2, 0, 3, 1, 4)
        v = lin(h, f"vs.{i}.v").reshape(B, N, heads, C // heads).transpose(1, 2)
        attn = ((q @ k.transpose(-2, -1)) * (C // heads) ** -0.5).softmax(dim=-1)
        return attn, x + lin((attn @ v).transpose(1, 2).reshape(B, N, C), f"projs.{i}")

    def mlp(i, x):
        h = ln(x, f"blocks.{i}.norm2")
        return x + lin(F.gelu(lin(h, f"blocks.{i}.mlp.fc1")), f"blocks.{i}.mlp.fc2")

    def sort_all(x, cls_attn):
        order = torch.sort(cls_attn, dim=1, descending=True)[1]
        patches = torch.stack([x[b, 1:][order[b]] for b in range(x.shape[0])])
        scores = torch.stack([cls_attn[b][order[b]] for b in range(x.shape[0])])
        return torch.cat([x[:, :1], patches], dim=1), scores

    cls_attn = None
    full = None
    n_keep = None
    for i in range(depth):
        if i < start:
            attn, x = attn_probs_and_out(i, x)
            cls_attn = attn[:, :, 0, 1:].sum(dim=1)
            x = mlp(i, x)
            continue
        layerwise = training
        if layerwise or i in stages:
            full, cls_attn = sort_all(x, cls_attn)
            n_keep = int((full.shape[1] - 1) * prune)
            x = full[:, :n_keep + 1]
        attn, x = attn_probs_and_out(i, x)
        cls_attn = torch.cat([(1 - tradeoff) * cls_attn[:, :n_keep] + tradeoff * attn[:, :, 0, 1:].sum(dim=1),
                              cls_attn[:, n_keep:]], dim=1)
        x = mlp(i, x)
        next_stage = [s for s in stages if s > i]
        if layerwise or i + 1 == (next_stage[0] if next_stage else depth):
            x = torch.cat([x, full[:, n_keep + 1:]], dim=1)
    logits = lin(ln(x[:, 1:].mean(dim=1), "norm"), "head")
    if training:
        return logits, lin(ln(x[:, 0], "norm_cls"), "head_cls")
    return logits
