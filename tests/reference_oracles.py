"""Independent re-statements of the reference implementations' forward passes, for equality tests.

Each follows the algorithm of the public reference code as ../shared/reference/token-reduction.md
describes it (youweiliang/evit evit.py; YifanXu74/Evo-ViT deit/evo_deit.py; facebookresearch/ToMe
tome/merge.py + tome/patch/timm.py): explicit N×N attention matrices, per-sample Python loops and
the references' parameter layouts — deliberately unlike the fast code under test."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def embed(vit, images):
    x = vit.patch_embed(images)
    return vit._pos_embed(x)


def explicit_attention(blk, x, size=None):
    """timm block attention the slow way: (probabilities [B,H,N,N], projected output, keys)."""
    a = blk.attn
    B, N, C = x.shape
    h = blk.norm1(x)
    q, k, v = a.qkv(h).reshape(B, N, 3, a.num_heads, C // a.num_heads).permute(2, 0, 3, 1, 4)
    logits = (q @ k.transpose(-2, -1)) * a.scale
    if size is not None:
        logits = logits + size.log()[:, None, None, :, 0]
    attn = logits.softmax(dim=-1)
    out = a.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
    return attn, out, k


# --- EViT ------------------------------------------------------------------------------------------
def evit_forward(vit, images, keep_rate, locations=(3, 6, 9), fuse=True):
    x = embed(vit, images)
    B = x.shape[0]
    for i, blk in enumerate(vit.blocks):
        attn, out, _ = explicit_attention(blk, x)
        x = x + out
        N = x.shape[1]
        left = math.ceil(keep_rate * (N - 1))
        if i in locations and keep_rate < 1 and left < N - 1:
            cls_attn = attn[:, :, 0, 1:].mean(dim=1)
            _, idx = torch.topk(cls_attn, left, largest=True, sorted=True)
            rows = []
            for b in range(B):
                kept = x[b, 1:][idx[b]]
                parts = [x[b, :1], kept]
                if fuse:
                    compl = sorted(set(range(N - 1)) - set(idx[b].tolist()))
                    w = cls_attn[b, compl].unsqueeze(-1)
                    parts.append((w * x[b, 1:][compl]).sum(dim=0, keepdim=True))
                rows.append(torch.cat(parts, dim=0))
            x = torch.stack(rows)
        x = x + blk.mlp(blk.norm2(x))
    return vit.head(vit.norm(x)[:, 0])


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


# --- ToMe ------------------------------------------------------------------------------------------
def tome_forward(vit, images, r_per_block, prop_attn=True, distilled=False):
    x = embed(vit, images)
    B = x.shape[0]
    size = None
    for i, blk in enumerate(vit.blocks):
        attn, out, k = explicit_attention(blk, x, size if prop_attn else None)
        x = x + out
        r = r_per_block[i]
        if r > 0:
            metric = k.mean(dim=1)
            sz = size if size is not None else torch.ones_like(x[..., :1])
            xs, sizes = [], []
            for b in range(B):
                m = metric[b] / metric[b].norm(dim=-1, keepdim=True)
                even, odd = list(range(0, x.shape[1], 2)), list(range(1, x.shape[1], 2))
                scores = m[even] @ m[odd].T
                scores[0, :] = -math.inf
                if distilled:
                    scores[:, 0] = -math.inf
                best, best_j = scores.max(dim=1)
                order = torch.argsort(best, descending=True).tolist()
                src, unm = order[:r], sorted(order[r:])
                dst_sum = (x[b, odd] * sz[b, odd]).clone()
                dst_size = sz[b, odd].clone()
                for s in src:
                    dst_sum[best_j[s]] += x[b, even[s]] * sz[b, even[s]]
                    dst_size[best_j[s]] += sz[b, even[s]]
                xs.append(torch.cat([x[b, [even[u] for u in unm]], dst_sum / dst_size]))
                sizes.append(torch.cat([sz[b, [even[u] for u in unm]], dst_size]))
            x, size = torch.stack(xs), torch.stack(sizes)
        x = x + blk.mlp(blk.norm2(x))
    x = vit.norm(x)
    if distilled:
        return (vit.head(x[:, 0]) + vit.head_dist(x[:, 1])) / 2
    return vit.head(x[:, 0])
