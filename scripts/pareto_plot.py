"""Names and the speed/cost (and accuracy) plot of scripts/benchmark.py's rows.

A row's name is the method and the backbone as papers write them, then what was changed, then the
method's knob: "DeiT-S", "Slide-Swin-T re-param", "EViT-DeiT-S kr 0.7", "ToMe-DeiT-S r 13". The
method is the reducer class's ``label`` (``accel.reducers.TokenReducer.label``, the class name when
unset), so new reducers are named without an edit here; the backbone comes from the model config's
timm name. A curve is one method on one backbone over its knob (keep rate, ToMe's r, DiffRate's schedule).

    python scripts/pareto_plot.py benchmarks/benchmark.csv     # redraw benchmark.png from the CSV
"""
from __future__ import annotations

import argparse
import csv
import os
import re
from typing import Dict, List, Optional, Sequence

SIZES = {"tiny": "Ti", "small": "S", "base": "B", "large": "L"}    # DeiT's; Swin writes T, S, B, L
# (pattern of the timm / config name, its name in papers); first match wins.
BACKBONES = [
    (r"deit_(tiny|small|base)(_distilled)?_patch16_(\d+)",
     lambda m: f"DeiT-{SIZES[m[1]]}" + (" distilled" if m[2] else "") + (f" {m[3]}px" if m[3] != "224" else "")),
    (r"(slide_)?swin_(tiny|small|base|t|s|b)(_.*)?",
     lambda m: ("Slide-" if m[1] else "") + f"Swin-{m[2][0].upper()}"),
    (r"(evo_)?levit_(\d+)(s?)", lambda m: ("Evo-" if m[1] else "") + f"LeViT-{m[2]}{m[3].upper()}"),
    (r"(slide_)?pvt_v2_b(\d)", lambda m: ("Slide-" if m[1] else "") + f"PVTv2-B{m[2]}"),
]
#: Model settings that change a named architecture; shown after its name when a config sets them.
ARCHITECTURE_KEYS = ("patch_size", "embed_dim", "depth", "num_heads")
#: The benchmark's inference transforms, as the label shows them.
FLAG_NAMES = {"packed": "packed", "fused": "fused", "reparam": "re-param", "sdpa": "SDPA"}
#: Overrides with a short name in labels; others that are not the model, reducer or knob are shown as written.
OVERRIDE_NAMES = {"reducer.explicit_attention=true": "reference attention", "reducer.static_width=true": "static width"}
KNOB_NAMES = {"keep_rate": "kr", "r": "r"}
#: Up to this many curves, each point is labelled with its knob value.
MAX_LABELLED_CURVES = 4


def backbone_name(name: str, model_cfg: Optional[Dict] = None) -> str:
    """The backbone as papers name it ("deit_small_patch16_224" → "DeiT-S"), the name itself when
    unknown; architecture settings the config changes follow it."""
    shown = name
    for pattern, fmt in BACKBONES:
        m = re.fullmatch(pattern, name)
        if m:
            shown = fmt(m)
            break
    changed = [f"{k}={model_cfg[k]}" for k in ARCHITECTURE_KEYS if model_cfg and model_cfg.get(k) is not None]
    return " ".join([shown, *changed])


def method_label(reducer_class: Optional[type]) -> str:
    """A reducer class's ``label`` (its class name when it has none); "" for no reducer."""
    if reducer_class is None:
        return ""
    return getattr(reducer_class, "label", None) or reducer_class.__name__


def extra_words(overrides: Sequence[str], flags: Sequence[str]) -> List[str]:
    """What a row changed beyond the model, the reducer and the knob, as the label shows it."""
    # In the backbone's or the method's name already, or not the model's design (weights, data).
    skip = ("model=", "model.name=", "model.model_name=", "reducer=", "keep_rate=", "reducer.r=", "reducer.schedule=",
            "data.", "model.pretrained_path=", *(f"model.{k}=" for k in ARCHITECTURE_KEYS))
    words = [OVERRIDE_NAMES.get(o, o) for o in overrides if not o.lstrip("+~").startswith(skip)]
    return words + [FLAG_NAMES.get(f, f) for f in flags]


def format_value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def curve_name(backbone: str, method: str = "", extras: Sequence[str] = ()) -> str:
    """"EViT-DeiT-S", "Slide-Swin-T re-param": one curve's name (everything but the knob's value)."""
    return " ".join([f"{method}-{backbone}" if method else backbone, *extras])


def point_label(curve: str, knob: str = "", value: str = "") -> str:
    """"EViT-DeiT-S kr 0.7": a curve's name with the knob's value (the name alone without a knob)."""
    return f"{curve} {KNOB_NAMES.get(knob, knob)} {value}" if knob else curve


def _num(row: Dict, key: str) -> Optional[float]:
    value = row.get(key)
    return None if value in (None, "") else float(value)


def figure(rows: Sequence[Dict], baseline: int = 0, title: str = ""):
    """Inference images/s against GMACs, one curve per ``curve`` over its knob, and (rows with
    ``top1``) a second panel of top-1 against images/s. ``rows``: dicts with ``label``, ``curve``,
    ``knob``, ``knob_value``, ``gmacs``, ``infer_img_s`` and optionally ``top1`` (as benchmark.csv
    holds them). The baseline row is drawn as dotted reference lines through its point; the legend
stands to the right of the panels (``fig.legends[0]``)."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    accuracy = all(_num(r, "top1") is not None for r in rows)
    fig = Figure(figsize=(15 if accuracy else 10, 5.5), layout="constrained")
    axes = fig.subplots(1, 2 if accuracy else 1, squeeze=False)[0]
    panels = [(axes[0], "gmacs", "infer_img_s")] + ([(axes[1], "infer_img_s", "top1")] if accuracy else [])
    base = rows[baseline]
    curves: Dict[tuple, List[Dict]] = {}   # one method and backbone over one knob
    for r in rows:
        curves.setdefault((r["curve"], r["knob"]), []).append(r)
    markers = "osD^vPX*<>hp"
    # More curves than the default cycle's 10 colours would repeat colours: tab20 then.
    colours = matplotlib.colormaps["tab20" if len(curves) > 10 else "tab10"].colors
    # Each curve point carries its knob value while that stays readable; beyond a few curves the
    # labels overlap, and the legend lists each curve's values instead.
    label_points = sum(len(m) > 1 for m in curves.values()) <= MAX_LABELLED_CURVES
    for ax, x, y in panels:
        bx, by = _num(base, x), _num(base, y)
        ax.axhline(by, color="0.4", linestyle=":", linewidth=1)
        ax.axvline(bx, color="0.4", linestyle=":", linewidth=1)
        ax.plot([bx], [by], marker="o", markersize=14, markerfacecolor="none", markeredgecolor="0.4",
                linestyle="none", label=f"baseline: {base['label']}")
        for k, ((curve, _), members) in enumerate(curves.items()):
            pts = sorted(members, key=lambda r: _num(r, x))
            single = len(pts) == 1
            knob = KNOB_NAMES.get(pts[0]["knob"], pts[0]["knob"])
            label = pts[0]["label"] if single else f"{curve}, {knob} " + ", ".join(p["knob_value"] for p in members)
            drawn, = ax.plot([_num(p, x) for p in pts], [_num(p, y) for p in pts], marker=markers[k % len(markers)],
                             color=colours[k % len(colours)], linestyle="none" if single else "-", label=label)
            for p in pts if single or label_points else ():   # names of single points, knob values of curves'
                text = p["label"] if single else f"{knob} {p['knob_value']}"
                ax.annotate(text, (_num(p, x), _num(p, y)), textcoords="offset points", xytext=(5, 4), fontsize=6.5,
                            color=drawn.get_color())
        ax.set_xlabel({"gmacs": "GMACs per image (multiply-accumulates)", "infer_img_s": "inference images / s"}[x])
        ax.set_ylabel({"infer_img_s": "inference images / s", "top1": "val top-1"}[y])
        ax.grid(alpha=0.3)
        if y == "infer_img_s":
            ratio = ax.secondary_yaxis("right", functions=(lambda v: v / by, lambda v: v * by))
            ratio.set_ylabel("× baseline")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=7)
    return fig


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", help="a benchmark.csv written by scripts/benchmark.py")
    p.add_argument("--out", default=None, help="PNG to write (default: benchmark.png next to the CSV)")
    p.add_argument("--dpi", type=int, default=110)
    args = p.parse_args(argv)
    with open(args.csv, newline="") as f:
        rows = list(csv.DictReader(f))
    out = args.out or os.path.join(os.path.dirname(args.csv), "benchmark.png")
    figure(rows, title=rows[0].get("setting", "")).savefig(out, dpi=args.dpi)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
