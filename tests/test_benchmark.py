"""scripts/benchmark.py as a user runs it: ratios to the baseline measured in the same run, the
inference transforms (fused, reparam) applied, accuracy of the deployed model, the reducers' cost
against DeiT-S as the README's table gives it, files written."""
import csv
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from accel.backbones import create_levit
from conftest import ROOT
from data.synthetic import RandomImages


def test_benchmark_writes_ratios_and_deployed_accuracy(tmp_path):
    torch.manual_seed(0)
    levit = create_levit("levit_128s", num_classes=5, img_size=64)
    for p in levit.parameters():          # spread-out logits, so predictions are not near-ties
        p.data.normal_(0, 0.2)
    weights = tmp_path / "levit_128s.pth"
    torch.save(levit.state_dict(), weights)
    specs = [f"levit_128s model.pretrained_path={weights}", f"levit_128s fused model.pretrained_path={weights}",
             "slide_swin_t reparam"]
    cmd = [sys.executable, "scripts/benchmark.py", *specs, "--img-size", "64", "--num-classes", "5",
           "--batch", "2", "--train-batch", "2", "--warmup", "1", "--runs", "1",
           "--data", "data=synthetic data.image_size=64 data.num_classes=5 data.batch_size=16",
           "--eval-batches", "2", "--out-dir", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = list(csv.DictReader(open(tmp_path / "benchmark.csv")))
    assert [r["label"] for r in rows] == ["LeViT-128S", "LeViT-128S fused", "Slide-Swin-T re-param"]
    # Every ratio is to the first model, measured in the same run.
    for r in rows:
        for ratio, value in (("infer_x", "infer_img_s"), ("train_x", "train_img_s"), ("mem_x", "train_mem_MB")):
            assert float(r[ratio]) == pytest.approx(float(r[value]) / float(rows[0][value]), abs=2e-4)
        for ratio in ("infer_x", "train_x"):  # one round: its ratio is the median, lowest and highest
            assert float(r[f"{ratio}_lo"]) == pytest.approx(float(r[ratio]), abs=2e-4) == float(r[f"{ratio}_hi"])
    # top-1 of the weights given, on the 2 × 16 validation images of data=synthetic (seed 1).
    val = [RandomImages(32, 64, 5, seed=1)[i] for i in range(32)]
    with torch.no_grad():
        pred = levit.eval()(torch.stack([x for x, _ in val])).argmax(-1)
    expected = float((pred == torch.tensor([y for _, y in val])).float().mean())
    assert float(rows[0]["top1"]) == pytest.approx(expected, abs=1e-4)
    # Accuracy is taken from the deployed model before the timed training steps touch the weights.
    assert rows[0]["top1"] == rows[1]["top1"], "folding BatchNorm must not change predictions"
    assert (tmp_path / "benchmark.png").stat().st_size > 0


def test_the_spread_is_of_ratios_taken_within_each_round():
    """A round where the whole machine ran slower (the second) moves neither bound: the ratio of that
    round is its own two timings' ratio."""
    lo, hi = load_benchmark().round_spread([1.0, 3.0, 1.2], [0.5, 1.5, 0.8])
    assert (lo, hi) == (pytest.approx(1.5), pytest.approx(2.0))


def load_benchmark():
    """scripts/benchmark.py as a module (it finds its sibling pareto_plot.py itself)."""
    spec = importlib.util.spec_from_file_location("benchmark_script", os.path.join(ROOT, "scripts", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module    # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_reducers_cost_what_the_readme_table_says_and_the_plot_names_each_model(tmp_path, monkeypatch):
    """GMACs at 224 px are counted, not timed: DeiT-S 4.60, EViT kr 0.7 3.03, Evo-ViT 3.03, ToMe r 13
    2.71 (README "Benchmark"); EViT and ToMe keep DeiT-S's weights, Evo-ViT adds its auxiliary [CLS]
    head. Each row is named as papers name it with its method's own knob (ToMe: r, not a keep rate);
    the plot draws one curve per method over its knob (EViT's two keep rates), the other models as
    single named points, the baseline as reference lines; --wandb logs the rows as a table."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    bench = load_benchmark()
    EVO = "Evo-ViT-DeiT-S kr 0.5"
    args = bench.parse(["deit_s", "evit_deit_s keep_rate=0.5,0.7", "evo_deit_s", "tome_deit_s",
                        "diffrate_deit_s reducer.schedule=2.3", "swin_t", "--no-train", "--batch", "1", "--warmup", "0",
                        "--runs", "1", "--out-dir", str(tmp_path), "--wandb"])
    fig = bench.report(bench.run(args), args)
    with open(tmp_path / "benchmark.csv") as f:
        header, *lines = list(csv.reader(f))
    assert header == ["model", "label", "curve", "method", "backbone", "knob", "knob_value", "infer_img_s", "infer_x",
                      "infer_x_lo", "infer_x_hi", "gmacs", "params_M", "setting"]
    rows = {line[1]: dict(zip(header, line)) for line in lines}
    assert all(r["setting"].endswith(" malloc=kept") for r in rows.values())  # CPU timings with freed memory kept
    names = ["DeiT-S", "EViT-DeiT-S kr 0.5", "EViT-DeiT-S kr 0.7", EVO, "ToMe-DeiT-S r 13",
             "DiffRate-DeiT-S schedule 2.3", "Swin-T"]
    assert list(rows) == names
    assert [(r["knob"], r["knob_value"]) for r in rows.values()] == [
        ("", ""), ("keep_rate", "0.5"), ("keep_rate", "0.7"), ("keep_rate", "0.5"), ("r", "13"), ("schedule", "2.3"), ("", "")]
    gmacs = {name: float(r["gmacs"]) for name, r in rows.items()}
    assert gmacs["DeiT-S"] == pytest.approx(4.60, abs=0.005)
    for name, known in (("EViT-DeiT-S kr 0.7", 3.03), (EVO, 3.03), ("ToMe-DeiT-S r 13", 2.71)):
        assert gmacs[name] / gmacs["DeiT-S"] == pytest.approx(known / 4.60, rel=0.01)
    # DiffRate's authors name their searched schedules by what they cost (their FLOPs are MACs).
    assert gmacs["DiffRate-DeiT-S schedule 2.3"] == pytest.approx(2.3, rel=0.02)
    params = {name: float(r["params_M"]) for name, r in rows.items()}
    assert params["DeiT-S"] == params["EViT-DeiT-S kr 0.7"] == params["ToMe-DeiT-S r 13"] == 22.0507  # 22,050,664
    aux_cls_head = 2 * 384 + 384 * 1000 + 1000                                 # its LayerNorm and Linear
    assert params[EVO] == round((22_050_664 + aux_cls_head) / 1e6, 4)

    ax, = fig.axes[:1]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "baseline: DeiT-S", "DeiT-S", "EViT-DeiT-S, kr 0.5, 0.7", EVO, "ToMe-DeiT-S r 13",
        "DiffRate-DeiT-S schedule 2.3", "Swin-T"]
    lines = {line.get_label(): line for line in ax.get_lines()}
    evit = lines["EViT-DeiT-S, kr 0.5, 0.7"]
    assert evit.get_linestyle() == "-" and sorted(evit.get_xdata()) == sorted([gmacs["EViT-DeiT-S kr 0.5"],
                                                                                gmacs["EViT-DeiT-S kr 0.7"]])
    assert all(lines[n].get_linestyle() == "None" and len(lines[n].get_xdata()) == 1 for n in ("DeiT-S", "Swin-T"))
    # The curve's points carry their keep rate, the single points their name.
    assert sorted(t.get_text() for t in ax.texts) == sorted(["kr 0.5", "kr 0.7", *(n for n in names if "EViT" not in n)])
    reference = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert sorted(list(line.get_xdata()) + list(line.get_ydata()) for line in reference) == sorted(
        [[gmacs["DeiT-S"]] * 2 + [0, 1], [0, 1] + [float(rows["DeiT-S"]["infer_img_s"])] * 2])
    assert len(fig.axes) == 1, "no second panel without --data"

    table = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "table" / "benchmark_*.table.json"))
    assert len(table) == 1, "the offline W&B run holds the rows as a table"
    logged = json.load(open(table[0]))
    assert logged["columns"] == header and [row[1] for row in logged["data"]] == names
    assert [row[header.index("gmacs")] for row in logged["data"]] == [float(r["gmacs"]) for r in rows.values()]


@pytest.fixture
def pareto_plot(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "scripts"))
    import pareto_plot
    return pareto_plot


def test_pareto_plot_adds_accuracy_against_throughput_with_data(pareto_plot):
    """Rows with top-1 (--data) get a second panel, top-1 against images/s, with the same curves
    and the baseline's reference lines."""
    rows = [dict(label="DeiT-S", curve="DeiT-S", knob="", knob_value="", gmacs="4.6", infer_img_s="10", top1="0.79"),
            *(dict(label=f"EViT-DeiT-S kr {kr}", curve="EViT-DeiT-S", knob="keep_rate", knob_value=kr, gmacs=g,
                   infer_img_s=s, top1=a) for kr, g, s, a in (("0.7", "3.0", "15", "0.79"), ("0.5", "2.3", "20", "0.77")))]
    fig = pareto_plot.figure(rows)
    speed, accuracy = fig.axes
    assert (accuracy.get_xlabel(), accuracy.get_ylabel()) == ("inference images / s", "val top-1")
    evit = {line.get_label(): line for line in accuracy.get_lines()}["EViT-DeiT-S, kr 0.7, 0.5"]
    assert list(evit.get_xdata()) == [15.0, 20.0] and list(evit.get_ydata()) == [0.79, 0.77]
    assert sorted(t.get_text() for t in accuracy.texts) == ["DeiT-S", "kr 0.5", "kr 0.7"]
    assert {(line.get_xdata()[0], line.get_ydata()[0]) for line in accuracy.get_lines()
            if line.get_linestyle() == ":"} == {(0, 0.79), (10.0, 0)}


def test_a_plot_of_many_methods_keeps_them_apart(pareto_plot):
    """Twelve methods (as the README's plot draws them): each curve its own colour, and no per-point
    knob labels piled on each other; the legend lists each curve's values."""
    rows = [dict(label="DeiT-S", curve="DeiT-S", knob="", knob_value="", gmacs="4.6", infer_img_s="10")]
    for m in range(12):
        rows += [dict(label=f"M{m}-DeiT-S kr {kr}", curve=f"M{m}-DeiT-S", knob="keep_rate", knob_value=kr,
                      gmacs=str(2 + m / 10 + float(kr)), infer_img_s=str(20 - m)) for kr in ("0.5", "0.7")]
    ax, = pareto_plot.figure(rows).axes
    curves = [line for line in ax.get_lines() if line.get_label().startswith("M")]
    assert len(curves) == 12 and len({line.get_color() for line in curves}) == 12
    assert [t.get_text() for t in ax.texts] == ["DeiT-S"]
    assert curves[0].get_label() == "M0-DeiT-S, kr 0.5, 0.7"


def test_method_names_come_from_the_reducer_class(pareto_plot):
    """A reducer names itself with the ``label`` class attribute (accel.reducers.TokenReducer), or by
    its class name; a backbone by its timm name; what else a spec changes is shown."""
    from accel.reducers import TokenReducer

    class DiffRateLike(TokenReducer):
        label = "DiffRate"

    class KMedoidsLike(TokenReducer):
        pass

    assert pareto_plot.method_label(DiffRateLike) == "DiffRate" and pareto_plot.method_label(KMedoidsLike) == "KMedoidsLike"
    backbone = pareto_plot.backbone_name("deit_base_distilled_patch16_384")
    extras = pareto_plot.extra_words(["model=deit_b_distilled", "keep_rate=0.5", "reducer.explicit_attention=true",
                                      "reducer.locations=[2,5]"], ["packed"])
    curve = pareto_plot.curve_name(backbone, "DiffRate", extras)
    assert pareto_plot.point_label(curve, "keep_rate", "0.5") == (
        "DiffRate-DeiT-B distilled 384px reference attention reducer.locations=[2,5] packed kr 0.5")
    assert [pareto_plot.backbone_name(n) for n in ("swin_tiny_patch4_window7_224", "slide_swin_t", "levit_128s",
                                                   "evo_levit_256", "pvt_v2_b1", "resnet50")] == [
        "Swin-T", "Slide-Swin-T", "LeViT-128S", "Evo-LeViT-256", "PVTv2-B1", "resnet50"]
    assert pareto_plot.backbone_name("deit_tiny_patch16_224", {"patch_size": 8, "depth": 6}) == "DeiT-Ti patch_size=8 depth=6"
