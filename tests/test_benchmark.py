"""scripts/benchmark.py as a user runs it: ratios to the baseline measured in the same run, the
inference transforms (fused, reparam) applied, accuracy of the deployed model, files written."""
import csv
import subprocess
import sys

import torch

from accel.backbones import create_levit
from conftest import ROOT


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
    assert float(rows[0]["infer_x"]) == 1.0 and all(float(r["infer_img_s"]) > 0 for r in rows)
    assert all(0.0 <= float(r["top1"]) <= 1.0 for r in rows)
    # Accuracy is taken from the deployed model before the timed training steps touch the weights.
    assert rows[0]["top1"] == rows[1]["top1"], "folding BatchNorm must not change predictions"
    assert (tmp_path / "benchmark.png").stat().st_size > 0
