"""Evo-ViT (DeiT) and Evo-LeViT give the authors' outputs and gradients on the same weights and images.

The fixtures under tests/fixtures/reference/ were written by make_evo.py from YifanXu74/Evo-ViT (commit in
PROVENANCE.md) on small random models; the weights are in the authors' naming and load through this project's
converters (evo_to_timm, reference_to_ours). Cases: keep rate 0.5 (theirs) and 0.7; eval (stage-wise selection)
and training with layer-wise and with stage-wise selection."""
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from accel.backbones import create_vit, with_reducer
from accel.backbones.evo_levit import EvoLevit
from accel.backbones.evo_levit_names import ours_to_reference, reference_to_ours
from accel.reducers import EvoViT
from accel.reducers.evo_checkpoint import evo_to_timm, timm_to_evo

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
DEIT = torch.load(FIXTURES / "evo_deit_model.pt")
DEIT_CASES = torch.load(FIXTURES / "evo_deit_outputs.pt")
LEVIT = torch.load(FIXTURES / "evo_levit_model.pt")
LEVIT_CASES = torch.load(FIXTURES / "evo_levit_outputs.pt")
MODES = ["train_layerwise", "train_stagewise"]


def assert_grads_equal(ours: dict, theirs: dict) -> None:
    """``theirs`` (their names) against ``ours`` (mapped to their names); None = the loss does not reach it.
    Within 1e-4 of each tensor's largest entry: training-mode BatchNorm (Evo-LeViT) makes some gradients large
    (tens), and their float32 rounding then exceeds an absolute 1e-4."""
    for name, expected in theirs.items():
        got = ours.get(name)
        if expected is None:
            assert got is None or not got.any(), f"{name}: a gradient where the authors' code has none"
        else:
            assert got is not None, f"{name}: no gradient"
            scale = max(1.0, expected.abs().max().item())
            torch.testing.assert_close(got, expected, atol=1e-4 * scale, rtol=1e-4, msg=name)


# --- Evo-ViT on DeiT -----------------------------------------------------------------------------------------
def evo_deit(keep_rate: float):
    model = with_reducer(VisionTransformer(**DEIT["config"]), EvoViT(keep_rate=keep_rate))
    model.load_state_dict(evo_to_timm(DEIT["state_dict"]), strict=True)
    return model


@pytest.mark.parametrize("name", sorted(DEIT_CASES))
def test_evo_deit_eval_logits_equal_authors_code(name):
    case = DEIT_CASES[name]
    model = evo_deit(case["keep_rate"]).eval()
    with torch.no_grad():
        logits = model(DEIT["images"])
    torch.testing.assert_close(logits, case["eval_logits"], atol=1e-4, rtol=0)
    n_keep = int(model.vit.patch_embed.num_patches * case["keep_rate"])
    assert [s.kept.shape[1] for s in model.selections] == [n_keep, n_keep]  # blocks 4 and 8


def test_evo_deit_release_file_loads_through_create_vit(tmp_path):
    """model.pretrained_path=<a file in the authors' naming> gives the authors' logits (their [CLS] head is
    training-only and left out)."""
    torch.save({"model": DEIT["state_dict"]}, tmp_path / "evo_vit.pth")
    cfg = {k: v for k, v in DEIT["config"].items() if k not in ("num_classes", "img_size")}
    vit = create_vit("deit_tiny_patch16_224", num_classes=DEIT["config"]["num_classes"],
                     img_size=DEIT["config"]["img_size"], pretrained_path=str(tmp_path / "evo_vit.pth"), **cfg)
    model = with_reducer(vit, EvoViT(0.5, aux_cls_head=False)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(DEIT["images"]), DEIT_CASES["kr0.5"]["eval_logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(DEIT_CASES))
def test_evo_deit_training_heads_and_gradients_equal_authors_code(name, mode):
    case, expected = DEIT_CASES[name], DEIT_CASES[name][mode]
    model = evo_deit(case["keep_rate"]).train()
    model.reducer.set_layerwise(mode == "train_layerwise")
    out = model(DEIT["images"])
    heads = [out.main, out.aux_cls]                            # mean-pool head, auxiliary [CLS] head
    assert out.dist is None and out.aux_dist is None and len(expected["heads"]) == 2
    for ours, theirs in zip(heads, expected["heads"]):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    labels = DEIT["labels"]
    (0.5 * F.cross_entropy(heads[0], labels) + 0.5 * F.cross_entropy(heads[1], labels)).backward()
    grads = timm_to_evo({n.removeprefix("vit."): p.grad for n, p in model.named_parameters()})
    assert_grads_equal(grads, expected["grads"])
    # Layer-wise: a selection at each of blocks 4…11; stage-wise: at 4 and 8, as at inference.
    assert len(model.selections) == (8 if mode == "train_layerwise" else 2)


# --- Evo-LeViT -----------------------------------------------------------------------------------------------
def evo_levit(case) -> EvoLevit:
    cfg = LEVIT["config"]
    ints = lambda s: [int(v) for v in s.split("_")]  # noqa: E731 - the reference's "C"/"N"/"X" strings
    model = EvoLevit(ints(cfg["C"]), cfg["D"], ints(cfg["N"]), ints(cfg["X"]), case["ratios"], case["stage_ratios"],
                     num_classes=cfg["num_classes"], img_size=cfg["img_size"], distilled=True)
    sd = LEVIT["state_dict"]
    if model.pruned_layers != [r < 1 for r in cfg["layer_ratios"]]:
        # The file's 'stage_blocks' names follow another layout; its 'blocks' copies hold every tensor.
        sd = {k: v for k, v in sd.items() if not k.startswith("stage_blocks.")}
    model.load_state_dict(reference_to_ours(sd, model.depth, model.pruned_layers), strict=True)
    return model


def assert_same_selection(model: EvoLevit, their_order: torch.Tensor, their_scores) -> None:
    """Each selection ranks by the same global class attention (carried through the shrinking attentions and
    rescaled there), and the last one keeps the same tokens in the same order. The authors number tokens by
    their position in the first grid (subsampled along), this project by the current grid: compare ranks."""
    assert len(model.selections) == len(their_scores)
    for selection, scores in zip(model.selections, their_scores):
        torch.testing.assert_close(selection.global_attention, scores, atol=1e-6, rtol=1e-4)
    kept = model.selections[-1].kept
    ranks = torch.searchsorted(their_order.sort(dim=1).values, their_order)
    assert torch.equal(kept, ranks[:, :kept.shape[1]])


@pytest.mark.parametrize("name", sorted(LEVIT_CASES))
def test_evo_levit_eval_logits_equal_authors_code(name):
    case = LEVIT_CASES[name]
    model = evo_levit(case).eval()
    with torch.no_grad():
        logits = model(LEVIT["images"])
    torch.testing.assert_close(logits, case["eval_logits"], atol=1e-4, rtol=0)
    assert_same_selection(model, case["eval_order"], case["eval_scores"])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(n for n, c in LEVIT_CASES.items() if MODES[0] in c))
def test_evo_levit_training_heads_and_gradients_equal_authors_code(name, mode):
    """Batch-statistics BatchNorm; layer-wise selection with the fixed trade-off 0.5, stage-wise with the learnt
    one. The global attention weights the representative token, so gradients reach the trade-offs and early layers."""
    case, expected = LEVIT_CASES[name], LEVIT_CASES[name][mode]
    model = evo_levit(case).train()
    model.set_distilled_training(True)
    model.set_layerwise(mode == "train_layerwise")
    out = model(LEVIT["images"])
    heads = [out.main, out.dist, out.aux_cls, out.aux_dist]    # class, distillation, and their [CLS] versions
    assert len(expected["heads"]) == 4
    for ours, theirs in zip(heads, expected["heads"]):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    sum(F.cross_entropy(h, LEVIT["labels"]) for h in heads).backward()
    grads = ours_to_reference({n: p.grad for n, p in model.named_parameters()}, model.depth, model.pruned_layers)
    assert_grads_equal(grads, expected["grads"])
    assert_same_selection(model, expected["order"], expected["scores"])
