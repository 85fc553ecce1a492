"""Pictures of what a token reducer did, for logging and for scripts/visualize_tokens.py.

One row per image: the input, then one panel per reducing block — EViT: dropped patches dimmed;
Evo-ViT: global class attention as a heat map with the kept patches outlined; ToMe: patches coloured
by the merged token that holds them (needs ``trace_source``)."""
from __future__ import annotations

from typing import Dict, List, Sequence

import numpy as np
import torch


def patch_mask_to_image(mask: np.ndarray, grid: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Per-patch values [gh*gw] → a per-pixel map of ``size`` (nearest)."""
    m = mask.reshape(grid)
    return np.kron(m, np.ones((size[0] // grid[0], size[1] // grid[1])))


def _kept_mask(entry: Dict[str, torch.Tensor], b: int, n: int) -> np.ndarray:
    kept = entry["kept"][b].cpu().numpy()
    mask = np.zeros(n, dtype=bool)
    mask[kept[kept >= 0]] = True
    return mask


def panels(images: np.ndarray, selection: List[Dict[str, torch.Tensor]], grid: Sequence[int],
           num_prefix: int = 1) -> List[List[np.ndarray]]:
    """RGB panels (H, W, 3 in [0, 1]) per image: the image, then one per selection entry."""
    n = grid[0] * grid[1]
    rows = []
    for b, img in enumerate(images):
        size = img.shape[:2]
        row = [img]
        alive = np.ones(n, dtype=bool)
        for entry in selection:
            if "global_attention" in entry:  # Evo-ViT
                order = entry["source_index"][b].cpu().numpy()
                heat = np.zeros(n)
                heat[order] = entry["global_attention"][b].float().cpu().numpy()
                heat = (heat - heat.min()) / (np.ptp(heat) + 1e-12)
                hm = patch_mask_to_image(heat, grid, size)[..., None]
                kept = patch_mask_to_image(_kept_mask(entry, b, n).astype(float), grid, size)[..., None]
                panel = 0.5 * img + 0.5 * hm * np.array([1.0, 0.3, 0.0]) + 0.5 * (1 - hm) * np.array([0.0, 0.2, 0.6])
                row.append(np.clip(panel * (0.45 + 0.55 * kept), 0, 1))
            elif "source" in entry:  # ToMe
                source = entry["source"][b].float().cpu().numpy()[:, num_prefix:]   # [tokens, prefix+patches]
                owner = source.argmax(axis=0)
                rng = np.random.default_rng(0)
                colours = rng.uniform(0.15, 1.0, size=(source.shape[0], 3))
                colour_map = colours[owner].reshape(*grid, 3)
                big = np.kron(colour_map, np.ones((size[0] // grid[0], size[1] // grid[1], 1)))
                row.append(np.clip(0.5 * img + 0.5 * big, 0, 1))
            elif "kept" in entry:  # EViT: patches still present after this block
                alive &= _kept_mask(entry, b, n)
                dim = patch_mask_to_image(alive.astype(float), grid, size)[..., None]
                row.append(img * (0.2 + 0.8 * dim))
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
def render(net: torch.nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Run ``net`` (a ReducedViT) on normalised ``images`` and draw its last selection as a grid."""
    reducer = net.reducer
    tracing = getattr(reducer, "trace_source", None)
    was_training = net.training
    if tracing is False:
        reducer.trace_source = True
    net.eval()
    try:
        net(images)
        selection = list(net.last_selection)
    finally:
        net.train(was_training)
        if tracing is False:
            reducer.trace_source = False
    grid = net.vit.patch_embed.grid_size
    return grid_image(panels(denormalize(images, mean, std), selection, grid, net.vit.num_prefix_tokens))
