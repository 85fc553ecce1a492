"""Pictures of what a token reducer did, for logging and for scripts/visualize_tokens.py.

One row per image: the input (titled with its label and the prediction), then one panel per reducing
block, titled with the block and how many tokens it kept or left — EViT / Top-K: dropped patches
dimmed; Evo-ViT: global class attention as a heat map with the fast tokens dimmed; ToMe, K-Medoids,
DPC-KNN, PatchMerger: patches coloured by the merged or cluster token that holds them. A legend under
the panels says what the dimming, the heat map and the colours mean.

Drawing dispatches on the type of each selection (``accel.reducers.selection``) through ``STYLES``:
a new kind of selection adds one function decorated with ``@draws(Kind, legend entries)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Type

import numpy as np
import torch

from accel.heads import Heads
from accel.reducers.protocol import TokenReducingNet
from accel.reducers.selection import (ClusteredTokens, KeptTokens, MergedTokens, PrunedMergedTokens, Selection,
                                      SlowFastTokens)

HOT, COLD = np.array([1.0, 0.3, 0.0]), np.array([0.0, 0.2, 0.6])   # heat-map ends (high, low)
DIM = 0.2      # brightness of a dropped patch (EViT, Top-K)
FAST = 0.45    # brightness of a fast-path token (Evo-ViT)


@dataclass(frozen=True)
class Panel:
    """One picture of a row (H, W, 3 in [0, 1]) and its title."""

    image: np.ndarray
    title: str


#: (colours, text) of one legend entry: swatches of matplotlib colours side by side, and what they mean.
LegendEntry = Tuple[Tuple[object, ...], str]
#: draw(image, selection, b, memo) → Panel for image ``b``; ``memo`` is a per-image dict that lives
#: across the blocks of one row (EViT's patches dropped so far).
DrawFn = Callable[[np.ndarray, Selection, int, dict], Panel]


@dataclass(frozen=True)
class Style:
    draw: DrawFn
    legend: Tuple[LegendEntry, ...]


STYLES: Dict[Type[Selection], Style] = {}


def draws(kind: Type[Selection], *legend: LegendEntry) -> Callable[[DrawFn], DrawFn]:
    """Register ``fn`` as the panel of selections of type ``kind`` (and its subclasses), with the
    legend entries that explain it."""
    def register(fn: DrawFn) -> DrawFn:
        STYLES[kind] = Style(fn, tuple(legend))
        return fn
    return register


def style_of(kind: Type[Selection]) -> Style:
    """The registered style of ``kind`` or of its nearest registered base class."""
    for k in kind.__mro__:
        if k in STYLES:
            return STYLES[k]
    raise TypeError(f"No picture for a {kind.__name__}; expected one of "
                    f"{', '.join(k.__name__ for k in STYLES)} (register one with accel.visualize.draws).")


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


@draws(KeptTokens, (((DIM,) * 3,), "dimmed: patches dropped at this block or before (EViT fuses them into one token)"))
def _kept_panel(img: np.ndarray, entry: KeptTokens, b: int, memo: dict) -> Panel:
    """The patches still present bright, those dropped here or at an earlier block dimmed."""
    n = entry.grid[0] * entry.grid[1]
    alive = memo.setdefault(("alive", entry.grid), np.ones(n, dtype=bool))
    alive &= _kept_mask(entry.kept[b], n)
    bright = patch_mask_to_image(alive.astype(float), entry.grid, img.shape[:2])[..., None]
    return Panel(img * (DIM + (1 - DIM) * bright), f"block {entry.block}: {int(alive.sum())}/{n} kept")


@draws(SlowFastTokens, ((tuple(HOT), tuple(COLD)), "heat map: global class attention, high … low"),
       (((FAST,) * 3,), "dimmed: fast tokens (only the slow ones run the block)"))
def _slow_fast_panel(img: np.ndarray, entry: SlowFastTokens, b: int, memo: dict) -> Panel:
    """Global class attention as a heat map, the fast tokens dimmed."""
    n, size = entry.grid[0] * entry.grid[1], img.shape[:2]
    heat = np.zeros(n)
    heat[entry.source_index[b].cpu().numpy()] = entry.global_attention[b].float().cpu().numpy()
    heat = (heat - heat.min()) / (np.ptp(heat) + 1e-12)
    hm = patch_mask_to_image(heat, entry.grid, size)[..., None]
    slow = _kept_mask(entry.kept[b], n)
    bright = patch_mask_to_image(slow.astype(float), entry.grid, size)[..., None]
    panel = 0.5 * img + 0.5 * hm * HOT + 0.5 * (1 - hm) * COLD
    return Panel(np.clip(panel * (FAST + (1 - FAST) * bright), 0, 1),
                 f"block {entry.block}: {int(slow.sum())}/{n} slow")


@draws(MergedTokens, (("tab:purple", "tab:olive", "tab:cyan"), "colours: patches merged into one token share a colour"))
def _merged_panel(img: np.ndarray, entry: MergedTokens, b: int, memo: dict) -> Panel:
    """Each patch coloured by the merged token that holds it (needs the traced ``source``)."""
    if entry.source is None:
        raise ValueError(f"MergedTokens of block {entry.block} has no source; trace the forward "
                         "(net.set_tracing(True)) to draw merge groups.")
    source = entry.source[b].float().cpu().numpy()[:, entry.num_prefix:]   # [tokens, patches]
    left = source.shape[0] - entry.num_prefix    # image tokens after this block's merges
    return Panel(_group_colours(img, source.argmax(axis=0), source.shape[0], entry.grid),
                 f"block {entry.block}: {left}/{source.shape[1]} left")


@draws(PrunedMergedTokens, (("tab:purple", "tab:olive", "tab:cyan"), "colours: patches merged into one token share a colour"),
       (((DIM,) * 3,), "dimmed: patches pruned at this block or before"))
def _pruned_merged_panel(img: np.ndarray, entry: PrunedMergedTokens, b: int, memo: dict) -> Panel:
    """DiffRate: the merge groups as ``_merged_panel`` draws them, the patches no token holds (pruned) dimmed."""
    panel = _merged_panel(img, entry, b, memo)
    held = (entry.source[b, :, entry.num_prefix:] > 0).any(dim=0).float().cpu().numpy()
    return Panel(panel.image * (DIM + (1 - DIM) * patch_mask_to_image(held, entry.grid, img.shape[:2])[..., None]),
                 panel.title)


@draws(ClusteredTokens, (("tab:purple", "tab:olive", "tab:cyan"), "colours: patches in one cluster (one token) share a colour"))
def _clustered_panel(img: np.ndarray, entry: ClusteredTokens, b: int, memo: dict) -> Panel:
    """Each patch coloured by the cluster token that holds it (K-Medoids, DPC-KNN, PatchMerger)."""
    owner = entry.assignment[b].cpu().numpy()
    clusters = len(np.unique(owner))             # non-empty ones: a medoid or query may hold no patch
    return Panel(_group_colours(img, owner, int(owner.max()) + 1, entry.grid),
                 f"block {entry.block}: {clusters}/{owner.size} clusters")


def _group_colours(img: np.ndarray, owner: np.ndarray, groups: int, grid: Sequence[int]) -> np.ndarray:
    """``img`` tinted by a random colour per group, ``owner`` [patches] the group of each patch."""
    colours = np.random.default_rng(0).uniform(0.15, 1.0, size=(groups, 3))
    return np.clip(0.5 * img + 0.5 * patch_mask_to_image(colours[owner], grid, img.shape[:2]), 0, 1)


def panels(images: np.ndarray, selections: Sequence[Selection],
           captions: Optional[Sequence[str]] = None) -> List[List[Panel]]:
    """Panels per image: the image (titled ``captions[b]``, or "input"), then one per selection,
    drawn by the style registered for its type."""
    rows = []
    for b, img in enumerate(images):
        memo: dict = {}
        row = [Panel(img, captions[b] if captions else "input")]
        row += [style_of(type(entry)).draw(img, entry, b, memo) for entry in selections]
        rows.append(row)
    return rows


def legend_entries(selections: Sequence[Selection]) -> List[LegendEntry]:
    """What the panels of these selections mean, once per kind, in the order they appear."""
    kinds = dict.fromkeys(type(s) for s in selections)
    return [e for kind in kinds for e in dict.fromkeys(style_of(kind).legend)]


def figure(rows: List[List[Panel]], legend: Sequence[LegendEntry] = (), title: str = "", panel_inches: float = 1.6):
    """The panels as a matplotlib Figure: rows = images, columns = the input and each reducing block,
    every panel titled, the legend under them."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.legend_handler import HandlerTuple
    from matplotlib.patches import Patch

    cols = max(len(r) for r in rows)
    legend_rows = len(legend) if cols < 5 else (len(legend) + 1) // 2
    fig = Figure(figsize=(max(cols, 3) * panel_inches, len(rows) * (panel_inches + 0.3) + 0.3 * legend_rows + 0.4))
    axes = fig.subplots(len(rows), cols, squeeze=False)
    for i, row in enumerate(rows):
        for j in range(cols):
            ax = axes[i][j]
            ax.set_axis_off()
            if j < len(row):
                ax.imshow(row[j].image, interpolation="nearest")
                ax.set_title(row[j].title, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    if legend:
        swatches = [tuple(Patch(facecolor=c, edgecolor="black", linewidth=0.5) for c in colours) for colours, _ in legend]
        fig.legend(swatches, [text for _, text in legend], handler_map={tuple: HandlerTuple(ndivide=None, pad=0)},
                   loc="lower center", ncol=1 if cols < 5 else 2, fontsize=6.5, frameon=False)
    fig.tight_layout(rect=(0, (0.3 * legend_rows + 0.15) / fig.get_figheight(), 1, 1))
    return fig


def to_array(fig) -> np.ndarray:
    """A Figure drawn as an RGB uint8 array (for loggers that take images)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def denormalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised [B, 3, H, W] → [B, H, W, 3] in [0, 1]."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x * s + m).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def caption(name: object, prediction: object, label: object = None) -> str:
    """A row's first title: the image's name or label and the network's prediction."""
    if label is None:
        return f"{name}\npred {prediction}"
    mark = "✓" if str(label) == str(prediction) else "✗"
    return f"label {label}, pred {prediction} {mark}"


def selection_figure(images: np.ndarray, selections: Sequence[Selection], captions: Optional[Sequence[str]] = None,
                     title: str = ""):
    """Denormalised ``images`` and the selections of one forward on them, as a titled Figure."""
    return figure(panels(images, selections, captions), legend_entries(selections), title)


@torch.no_grad()
def render(net: TokenReducingNet, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
           names: Optional[Sequence[str]] = None, class_names: Optional[Sequence[str]] = None, title: str = ""):
    """Run ``net`` (a token-reducing network) in eval mode on normalised ``images`` and draw its
    selections as a titled Figure (``names``: a name per image for its row; the prediction is the
    class index, or ``class_names[index]``), tracing that forward so that every selection can be drawn."""
    was_training, was_tracing = net.training, net.tracing
    net.set_tracing(True)
    net.eval()
    try:
        pred = Heads.of(net(images)).eval_logits().argmax(-1).tolist()
        selections = net.selections
    finally:
        net.train(was_training)
        net.set_tracing(was_tracing)
    pred = [class_names[p] if class_names else p for p in pred]
    names = names or [f"image {b}" for b in range(len(pred))]
    return selection_figure(denormalize(images, mean, std), selections,
                            [caption(n, p) for n, p in zip(names, pred)], title)
