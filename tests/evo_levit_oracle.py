"""An independent re-statement of the reference Evo-LeViT forward (YifanXu74/Evo-ViT levit/evo_levit.py,
as read at commit fd630d01), for equality tests: functional, on a state dict in the reference's own
names (``patch_embed.0.c``, ``blocks.k.m1.m.qkv.c``, ``blocks.k.poss``, ``head_cls_dist.l``, …),
with the reference's module-level state (global attention, original indices), its length test for
"nothing parked", per-sample Python loops for sorting, and its stage-wise (``stage_blocks``) and
layer-wise (``blocks``) paths. Deliberately unlike the code under test."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def evo_levit_reference(sd, images, embed_dim, key_dim, num_heads, depth, layer_ratios, stage_ratios,
                        training=False, stage_wise=True, learn_tradeoff=True, record=None):
    """The reference's output: eval → (head + head_dist) / 2; training → the 4 heads. ``record``
    (a list) receives the sorted global attention at every selection."""

    def bn(x, p):  # BatchNorm with the stored statistics (eval) or the batch's (training)
        return F.batch_norm(x, sd[p + ".running_mean"].clone(), sd[p + ".running_var"].clone(), sd[p + ".weight"],
                            sd[p + ".bias"], training, 0.1, 1e-5)

    def linear_bn(x, p):
        y = F.linear(x, sd[p + ".c.weight"])
        return bn(y.flatten(0, 1), p + ".bn").reshape(y.shape)

    def bn_linear(x, p):
        return F.linear(bn(x, p + ".bn"), sd[p + ".l.weight"], sd[p + ".l.bias"])

    def mlp(x, p):
        return linear_bn(F.hardswish(linear_bn(x, p + ".m.0")), p + ".m.2")

    def tradeoff(p):
        return torch.sigmoid(sd[p + "learn_tradeoff"]) if learn_tradeoff else 0.5

    def rows(t, order):  # t[b][order[b]] for every sample
        return torch.stack([t[b][order[b]] for b in range(t.shape[0])])

    def grid_sub(t, res):  # [B, res*res, C] → every other row and column
        B, _, C = t.shape
        return t.reshape(B, res, res, C)[:, ::2, ::2].reshape(B, -1, C)

    g = {"ga": 0, "oi": None}  # the reference's module globals global_attn / ori_indices

    def attention(x, p, heads):
        B, N, _ = x.shape
        qkv = linear_bn(x, p + ".qkv").reshape(B, N, heads, -1)
        q, k, v = qkv[..., :key_dim], qkv[..., key_dim:2 * key_dim], qkv[..., 2 * key_dim:]
        q, k, v = q.permute(0, 2, 1, 3), k.permute(0, 2, 1, 3), v.permute(0, 2, 1, 3)
        attn = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * key_dim ** -0.5, dim=-1)
        t = tradeoff(p + ".")
        ga = g["ga"]
        if isinstance(ga, int):
            g["ga"] = attn[:, :, 0, 1:].mean(dim=1)
        elif ga.shape[1] - N + 2 == 1:
            g["ga"] = (1 - t) * ga + t * attn[:, :, 0, 1:].mean(dim=1)
        else:
            c = attn[:, :, 0, 1:-1].mean(dim=1)
            g["ga"] = torch.cat([(1 - t) * ga[:, :N - 2] + t * c, ga[:, N - 2:]], dim=1)
        out = torch.matmul(attn, v).permute(0, 2, 1, 3).reshape(B, N, -1)
        return linear_bn(F.hardswish(out), p + ".proj.1")

    def sort_parked(x, n_keep):
        """Sort patches by global attention; [CLS]+kept+representative, and the parked tokens."""
        order = torch.argsort(g["ga"], dim=1, descending=True)
        x = torch.cat([x[:, :1], rows(x[:, 1:], order)], dim=1)
        g["ga"], g["oi"] = rows(g["ga"], order), rows(g["oi"], order)
        if record is not None:
            record.append(g["ga"].clone())
        parked = x[:, n_keep + 1:]
        w = g["ga"][:, n_keep:]
        w = w / w.sum(dim=1, keepdim=True)
        rep = torch.stack([sum(w[b, j] * parked[b, j] for j in range(parked.shape[1]))
                           for b in range(x.shape[0])]).unsqueeze(1)
        return torch.cat([x[:, :n_keep + 1], rep], dim=1), parked

    def subsample(x, p, heads, res):
        scale = g["ga"].sum(dim=1, keepdim=True)
        order = torch.argsort(g["oi"], dim=1)
        x = torch.cat([x[:, :1], rows(x[:, 1:], order)], dim=1)
        g["ga"] = grid_sub(rows(g["ga"], order).unsqueeze(-1), res).squeeze(-1)
        g["oi"] = grid_sub(rows(g["oi"], order).unsqueeze(-1), res).squeeze(-1)
        x = x + sd[p + ".poss"]
        B, N, _ = x.shape
        kv = linear_bn(x, p + ".kv").reshape(B, N, heads, -1)
        k, v = kv[..., :key_dim].permute(0, 2, 1, 3), kv[..., key_dim:].permute(0, 2, 1, 3)
        q = linear_bn(torch.cat([x[:, :1], grid_sub(x[:, 1:], res)], dim=1), p + ".q.1")
        q = q.reshape(B, -1, heads, key_dim).permute(0, 2, 1, 3)
        attn = torch.softmax(torch.matmul(q, k.transpose(2, 3)) * key_dim ** -0.5, dim=-1)
        c = grid_sub(attn[:, :, 0, 1:].mean(dim=1).unsqueeze(-1), res).squeeze(-1)
        t = tradeoff(p + ".")
        ga = (1 - t) * g["ga"] + t * c
        g["ga"] = ga * (scale / ga.sum(dim=1, keepdim=True))
        out = torch.matmul(attn, v).permute(0, 2, 1, 3).reshape(B, q.shape[2], -1)
        return linear_bn(F.hardswish(out), p + ".proj.1")

    # stem, [CLS], position embedding
    x = images
    for i in range(4):
        x = F.conv2d(x, sd[f"patch_embed.{2 * i}.c.weight"], stride=2, padding=1)
        x = bn(x, f"patch_embed.{2 * i}.bn")
        if i < 3:
            x = F.hardswish(x)
    x = x.flatten(2).transpose(1, 2)
    B, P, _ = x.shape
    g["oi"] = torch.arange(P).unsqueeze(0).repeat(B, 1).float()  # float, as after the reference's concatenation
    x = torch.cat([sd["cls_token"].expand(B, -1, -1), x], dim=1) + sd["poss"]

    res = int(P ** 0.5)
    k = 0
    layer = 0
    for s in range(3):
        stage_layers = list(range(k, k + depth[s]))
        ratios = layer_ratios[layer:layer + depth[s]]
        if stage_wise:
            full = [b for b, r in zip(stage_layers, ratios) if r == 1]
            pruned = [b for b, r in zip(stage_layers, ratios) if r < 1]
            for b in full:
                x = x + attention(x, f"blocks.{b}.m1.m", num_heads[s])
                x = x + mlp(x, f"blocks.{b}.m2")
            if pruned:
                n_keep = int((x.shape[1] - 1) * stage_ratios[s])
                h, parked = sort_parked(x, n_keep)
                total = 0
                for b in pruned:
                    a = attention(h, f"blocks.{b}.m1.m", num_heads[s])
                    h = h + a
                    f = mlp(h, f"blocks.{b}.m2")
                    h = h + f
                    total = total + a[:, -1:] + f[:, -1:]
                x = torch.cat([h[:, :-1], parked + total], dim=1)
        else:
            for b, r in zip(stage_layers, ratios):
                if r == 1:
                    x = x + attention(x, f"blocks.{b}.m1.m", num_heads[s])
                    x = x + mlp(x, f"blocks.{b}.m2")
                    continue
                n_keep = int((x.shape[1] - 1) * r)
                h, parked = sort_parked(x, n_keep)
                a = attention(h, f"blocks.{b}.m1.m", num_heads[s])
                h = h + a
                f = mlp(h, f"blocks.{b}.m2")
                h = h + f
                x = torch.cat([h[:, :-1], parked + a[:, -1:] + f[:, -1:]], dim=1)
        k += depth[s]
        layer += depth[s]
        if s < 2:
            x = subsample(x, f"blocks.{k}", embed_dim[s] // key_dim, res)
            x = x + mlp(x, f"blocks.{k + 1}")
            res = (res - 1) // 2 + 1
            k += 2

    cls, feat = x[:, 0], x[:, 1:].mean(dim=1)
    main, dist = bn_linear(feat, "head"), bn_linear(feat, "head_dist")
    if training:
        return main, dist, bn_linear(cls, "head_cls"), bn_linear(cls, "head_cls_dist")
    return (main + dist) / 2
