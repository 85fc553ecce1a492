"""EViT and ToMe give the authors' eval logits, kept tokens and merged sizes on the same weights and images.

The fixtures under tests/fixtures/reference/ were written by make_evit_tome.py from youweiliang/evit and
facebookresearch/ToMe (commits in PROVENANCE.md) on small random DeiT-shaped models, plain and distilled."""
from pathlib import Path

import pytest
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from accel.backbones import with_reducer
from accel.reducers import EViT, ToMe

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
EVIT_CASES = torch.load(FIXTURES / "evit_outputs.pt")
TOME_CASES = torch.load(FIXTURES / "tome_outputs.pt")


def load_model(arch: str, reducer):
    saved = torch.load(FIXTURES / f"evit_tome_{arch}_model.pt")
    vit = (VisionTransformerDistilled if arch == "distilled" else VisionTransformer)(**saved["config"])
    model = with_reducer(vit, reducer)
    model.load_state_dict(saved["state_dict"], strict=True)
    return model.eval(), saved["images"]


@pytest.mark.parametrize("name", sorted(EVIT_CASES))
def test_evit_equals_authors_code(name):
    case = EVIT_CASES[name]
    model, images = load_model(case["arch"], EViT(case["keep_rate"], case["locations"], case["fuse_token"]))
    with torch.no_grad():
        logits = model(images)
    torch.testing.assert_close(logits, case["logits"], atol=1e-4, rtol=0)
    kept = [s.kept for s in model.selections]
    assert len(kept) == len(case["kept"])
    for ours, theirs in zip(kept, case["kept"]):
        assert torch.equal(ours, theirs)      # same patches, same (descending-score) order, -1 = the fused token


@pytest.mark.parametrize("name", sorted(TOME_CASES))
def test_tome_equals_authors_code(name):
    case = TOME_CASES[name]
    model, images = load_model(case["arch"], ToMe(r=case["r"], prop_attn=case["prop_attn"]))
    with torch.no_grad():
        logits = model(images)
    torch.testing.assert_close(logits, case["logits"], atol=1e-4, rtol=0)
    merged = {s.block: s.size[..., 0] for s in model.selections}
    size = None
    for i, theirs in enumerate(case["size_after_block"]):
        size = merged.get(i, size)             # a block that merges nothing keeps the sizes
        if theirs is None:
            assert size is None, f"block {i} merged tokens, the authors' did not"
        else:                                  # token order too: [CLS] (, DIST) first, then as merge() orders them
            assert size is not None and torch.equal(size, theirs), f"token sizes differ after block {i}"
            assert size.shape[1] == case["tokens_after_block"][i]
