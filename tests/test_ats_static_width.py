"""ATS with ``static_width=True`` (every image padded to the K samples, the width the authors' code keeps with
DROP_TOKENS=False) gives the authors' logits, kept tokens and scores, as the default (padded to the batch's
widest image) does; only the padding columns differ. Fixtures: tests/fixtures/reference/ats_*.pt (make_ats.py)."""
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from accel.backbones import with_reducer
from accel.reducers import ATS

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
SAVED = torch.load(FIXTURES / "ats_model.pt")
CASES = torch.load(FIXTURES / "ats_outputs.pt")


@pytest.mark.parametrize("name", sorted(CASES))
def test_static_width_equals_authors_code(name):
    case, theirs = CASES[name], CASES[name]["batched_no_drop"]
    model = with_reducer(VisionTransformer(**SAVED["config"]), ATS(1.0, case["ats_blocks"], static_width=True))
    model.load_state_dict(SAVED["state_dict"], strict=True)
    with torch.no_grad():
        logits = model.eval()(SAVED["images"])
    torch.testing.assert_close(logits, theirs["logits"], atol=1e-4, rtol=0)
    n = SAVED["images"].shape[-1] // SAVED["config"]["patch_size"]
    for sel, kept in zip(model.selections, theirs["kept"]):
        assert sel.kept.shape == (len(logits), n * n)   # keep rate 1: K = 64 samples of 64 patches, every block
        assert torch.equal(sel.kept[:, :kept.shape[1]], kept) and (sel.kept[:, kept.shape[1]:] == -1).all()
        assert torch.equal(sel.valid, sel.kept >= 0)
