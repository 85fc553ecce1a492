"""scripts/benchmark.py as a user runs it: ratios to the baseline measured in the same run, the
inference transforms (fused, reparam) applied, accuracy of the deployed model, the reducers' cost
against DeiT-S as the README's table gives it, files written."""
import csv
import importlib.util
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
    assert len(rows) == 3 and "fused" in rows[1]["model"] and "reparam" in rows[2]["model"]
    # Every ratio is to the first model, measured in the same run.
    for r in rows:
        for ratio, value in (("infer_x", "infer_img_s"), ("train_x", "train_img_s"), ("mem_x", "train_mem_MB")):
            assert float(r[ratio]) == pytest.approx(float(r[value]) / float(rows[0][value]), abs=2e-4)
    # top-1 of the weights given, on the 2 × 16 validation images of data=synthetic (seed 1).
    val = [RandomImages(32, 64, 5, seed=1)[i] for i in range(32)]
    with torch.no_grad():
        pred = levit.eval()(torch.stack([x for x, _ in val])).argmax(-1)
    expected = float((pred == torch.tensor([y for _, y in val])).float().mean())
    assert float(rows[0]["top1"]) == pytest.approx(expected, abs=1e-4)
    # Accuracy is taken from the deployed model before the timed training steps touch the weights.
    assert rows[0]["top1"] == rows[1]["top1"], "folding BatchNorm must not change predictions"
    assert (tmp_path / "benchmark.png").stat().st_size > 0


def load_benchmark():
    spec = importlib.util.spec_from_file_location("benchmark_script", os.path.join(ROOT, "scripts", "benchmark.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module    # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_reducers_cost_what_the_readme_table_says_against_deit_s(tmp_path):
    """GMACs at 224 px are counted, not timed: DeiT-S 4.60, EViT kr 0.7 3.03, Evo-ViT 3.03, ToMe r 13
    2.71 (README "Benchmark"); EViT and ToMe keep DeiT-S's weights, Evo-ViT adds its auxiliary [CLS]
    head."""
    bench = load_benchmark()
    args = bench.parse(["deit_s", "evit_deit_s keep_rate=0.7", "evo_deit_s", "tome_deit_s", "--no-train",
                        "--batch", "1", "--warmup", "0", "--runs", "1", "--out-dir", str(tmp_path)])
    bench.report(bench.run(args), args)
    with open(tmp_path / "benchmark.csv") as f:
        header, *lines = list(csv.reader(f))
    assert header == ["model", "method", "keep_rate", "infer_img_s", "infer_x", "gmacs", "params_M", "setting"]
    rows = {line[1]: dict(zip(header, line)) for line in lines}
    assert list(rows) == ["timm", "EViT", "EvoViT", "ToMe"]
    gmacs = {method: float(r["gmacs"]) for method, r in rows.items()}
    assert gmacs["timm"] == pytest.approx(4.60, abs=0.005)
    for method, known in (("EViT", 3.03), ("EvoViT", 3.03), ("ToMe", 2.71)):
        assert gmacs[method] / gmacs["timm"] == pytest.approx(known / 4.60, rel=0.01)
    assert rows["EViT"]["keep_rate"] == "0.7" and rows["EvoViT"]["keep_rate"] == "0.5"
    params = {method: float(r["params_M"]) for method, r in rows.items()}
    assert params["timm"] == params["EViT"] == params["ToMe"] == 22.0507      # 22,050,664
    aux_cls_head = 2 * 384 + 384 * 1000 + 1000                                 # its LayerNorm and Linear
    assert params["EvoViT"] == round((22_050_664 + aux_cls_head) / 1e6, 4)
