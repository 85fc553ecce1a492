"""Pictures of what a token reducer did, for logging and for scripts/visualize_tokens.py.

One row per image: the input, then one panel per reducing block — EViT: dropped patches dimmed;
Evo-ViT: global class attention as a heat map with the kept patches outlined; ToMe: patches coloured
by the merged token that holds them. Dispatches on the type of each selection
(``accel.reducers.selection``), so any ``TokenReducingNet`` can be drawn, Evo-LeViT included."""
from __future__ import annotations

from typing import List, Sequence

import numpy as np
import torch

from accel.reducers.protocol import TokenReducingNet
from accel.reducers.selection import KeptTokens, MergedTokens, Selection, SlowFastTokens


def patch_mask_to_image(mask: np.ndarray, grid: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Per-patch values [gh*gw] (or [gh*gw, k]) → a per-pixel map of ``size`` (nearest patch)."""
    m = mask.reshape(*grid, *mask.shape[1:])
    rows = np.arange(size[0]) * grid[0] // size[0]
    cols = np.arange(size[1]) * grid[1] // size[1]
    return m[rows][:, cols]


def _kept_mask(kept: torch.Tensor, n: int) -> np.ndarray:
    kept = kept.cpu().numpy()
    mask = np.zeros(n, dtype=bool)
    mask[kept[kept >= 0]] = True
    return mask


def _slow_fast_panel(img: np.ndarray, entry: SlowFastTokens, b: int) -> np.ndarray:
    """Global class attention as a heat map, the slow tokens outlined by brightness."""
    n, size = entry.grid[0] * entry.grid[1], img.shape[:2]
    heat = np.zeros(n)
    heat[entry.source_index[b].cpu().numpy()] = entry.global_attention[b].float().cpu().numpy()
    heat = (heat - heat.min()) / (np.ptp(heat) + 1e-12)
    hm = patch_mask_to_image(heat, entry.grid, size)[..., None]
    kept = patch_mask_to_image(_kept_mask(entry.kept[b], n).astype(float), entry.grid, size)[..., None]
    panel = 0.5 * img + 0.5 * hm * np.array([1.0, 0.3, 0.0]) + 0.5 * (1 - hm) * np.array([0.0, 0.2, 0.6])
    return np.clip(panel * (0.45 + 0.55 * kept), 0, 1)


def _merged_panel(img: np.ndarray, entry: MergedTokens, b: int) -> np.ndarray:
    """Each patch coloured by the merged token that holds it (needs the traced ``source``)."""
    source = entry.source[b].float().cpu().numpy()[:, entry.num_prefix:]   # [tokens, patches]
    owner = source.argmax(axis=0)
    colours = np.random.default_rng(0).uniform(0.15, 1.0, size=(source.shape[0], 3))
    big = patch_mask_to_image(colours[owner], entry.grid, img.shape[:2])
    return np.clip(0.5 * img + 0.5 * big, 0, 1)


def panels(images: np.ndarray, selections: Sequence[Selection]) -> List[List[np.ndarray]]:
    """RGB panels (H, W, 3 in [0, 1]) per image: the image, then one per selection — kept tokens
    (EViT, Top-K): the patches still present dimmed in; slow-fast (Evo-ViT): global class attention
    with the slow tokens bright; merged (ToMe): merge groups in colours."""
    rows = []
    for b, img in enumerate(images):
        row = [img]
        alive = {}  # per grid: the patches no kept-token selection has dropped so far
        for entry in selections:
            if isinstance(entry, SlowFastTokens):
                row.append(_slow_fast_panel(img, entry, b))
            elif isinstance(entry, MergedTokens):
                if entry.source is None:
                    raise ValueError(f"MergedTokens of block {entry.block} has no source; trace the forward "
                                     "(net.set_tracing(True)) to draw merge groups.")
                row.append(_merged_panel(img, entry, b))
            elif isinstance(entry, KeptTokens):
                n = entry.grid[0] * entry.grid[1]
                mask = alive.setdefault(entry.grid, np.ones(n, dtype=bool))
                mask &= _kept_mask(entry.kept[b], n)
                dim = patch_mask_to_image(mask.astype(float), entry.grid, img.shape[:2])[..., None]
                row.append(img * (0.2 + 0.8 * dim))
            else:
                raise TypeError(f"No picture for a {type(entry).__name__}; expected KeptTokens, SlowFastTokens "
                                "or MergedTokens.")
        rows.append(row)
    return rows


def grid_image(rows: List[List[np.ndarray]], pad: int = 2) -> np.ndarray:
    """Panels laid out as one uint8 image (rows = images, columns = stages)."""
    h, w = rows[0][0].shape[:2]
    cols = max(len(r) for r in rows)
    out = np.ones((len(rows) * (h + pad) + pad, cols * (w + pad) + pad, 3))
    for i, row in enumerate(rows):
        for j, p in enumerate(row):
            out[pad + i * (h + pad): pad + i * (h + pad) + h, pad + j * (w + pad): pad + j * (w + pad) + w] = p
    return (out * 255).round().astype(np.uint8)


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised [B, 3, H, W] → [B, H, W, 3] in [0, 1]."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x * s + m).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def render(net: TokenReducingNet, images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Run ``net`` (a token-reducing network) in eval mode on normalised ``images`` and draw its
    selections as a grid, tracing that forward so that every selection can be drawn."""
    was_training, was_tracing = net.training, net.tracing
    net.set_tracing(True)
    net.eval()
    try:
        net(images)
        selections = net.selections
    finally:
        net.train(was_training)
        net.set_tracing(was_tracing)
    return grid_image(panels(denormalize(images, mean, std), selections))
