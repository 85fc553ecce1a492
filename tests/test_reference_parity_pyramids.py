"""LeViT and Slide-Transformer equal the authors' code (facebookresearch/LeViT, LeapLabTHU/Slide-Transformer).

The fixtures in tests/fixtures/reference/ hold outputs of the authors' code on random weights, in their naming
(written by make_levit_slide.py; commits in PROVENANCE.md). Our models are built as the configs build them, load
those weights through this project's loaders (official LeViT names, the reference's Slide-Swin checkpoint layout)
and must give the same outputs: eval logits, training outputs and gradients, and the inference forms (LeViT's
fused BatchNorm, slide attention re-parameterised, on the fused CPU kernel and on the torch path)."""
import copy
import tempfile
from pathlib import Path

import hydra
import pytest
import torch
import torch.nn.functional as F
from omegaconf import open_dict

from accel.backbones import fuse_levit, slide_kernel
from accel.backbones.levit_names import official_to_timm
from accel.backbones.slide_attention import SlideAttention
from accel.backbones.slide_swin import create_slide_swin, reparameterize_slide
from accel.errors import UserInputError
from conftest import make_cfg
from seeded_weights import draw_state_dict, fingerprint

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "reference"


def load_fixture(name: str) -> dict:
    return torch.load(FIXTURES / name, weights_only=False)


def drawn_checkpoint(fx: dict, path: Path) -> Path:
    """The authors' state dict the fixture was made with, saved as their releases are ({'model': …})."""
    sd = draw_state_dict(fx["spec"], fx["kept"], fx["seed"])
    torch.testing.assert_close(fingerprint(sd, [n for n, _ in fx["spec"]]), fx["fingerprint"], rtol=1e-12, atol=0,
                               msg="the seeded weights differ from the fixture's: torch draws differently here")
    torch.save({"model": sd}, path)
    return path


def build(config: str, **overrides):
    """The model as conf/model/<config>.yaml builds it (composed: the sizes build on a parameterised file)."""
    cfg = make_cfg(tempfile.gettempdir(), [f"model={config}"]).model
    with open_dict(cfg):
        for k, v in overrides.items():
            cfg[k] = v
    return hydra.utils.instantiate(cfg)


# ----------------------------------------------------------------------------------------------- LeViT

@pytest.fixture(scope="module")
def levit(tmp_path_factory):
    fx = load_fixture("levit_128s_reference.pt")
    path = drawn_checkpoint(fx, tmp_path_factory.mktemp("levit") / "LeViT-128S.pth")
    cfg = fx["config"]
    model = build("levit_128s", num_classes=cfg["num_classes"], img_size=cfg["img_size"], pretrained_path=str(path))
    return fx, model


def test_levit_eval_and_fused_logits_equal_the_authors(levit):
    fx, model = levit
    with torch.no_grad():
        logits = model.eval()(fx["images"])
        fused = fuse_levit(model)(fx["images"])
    torch.testing.assert_close(logits, fx["eval_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(fused, fx["fused_logits"], atol=1e-5, rtol=0)


def test_levit_training_heads_and_gradients_equal_the_authors(levit):
    fx, model = levit
    model = copy.deepcopy(model)   # training mode updates the BatchNorm statistics the other tests use
    model.set_distilled_training(True)
    cls, dist = model.train()(fx["images"])
    (F.cross_entropy(cls, fx["labels"]) + F.cross_entropy(dist, fx["labels"])).backward()
    torch.testing.assert_close(cls, fx["train_cls"], atol=1e-4, rtol=0)
    torch.testing.assert_close(dist, fx["train_dist"], atol=1e-4, rtol=0)
    ours = official_to_timm({name: name for name in fx["grads"]}, model.state_dict().keys())   # ours → theirs
    params = dict(model.named_parameters())
    assert len(ours) == len(fx["grads"])
    # BatchNorm on the statistics of four images magnifies rounding (the summation order of the thread
    # count): within 1e-4 of each tensor's largest entry (bit-identical on one thread).
    for timm_name, official in ours.items():
        ref = fx["grads"][official]
        torch.testing.assert_close(params[timm_name].grad, ref, atol=1e-4 * ref.abs().max().item(), rtol=0,
                                   msg=lambda m: f"{official} ({timm_name}): {m}")


LEVIT_FAMILY = load_fixture("levit_family_reference.pt")


@pytest.mark.parametrize("name", sorted(LEVIT_FAMILY))
def test_levit_family_eval_and_fused_logits_equal_the_authors(name, levit, tmp_path):
    """LeViT-128, -192, -256, -384 (their specifications, official names) on LeViT-128S's images."""
    fx = LEVIT_FAMILY[name]
    images, cfg = levit[0]["images"], levit[0]["config"]
    path = drawn_checkpoint(fx, tmp_path / f"{name}.pth")
    model = build(name.lower(), num_classes=cfg["num_classes"], img_size=cfg["img_size"], pretrained_path=str(path))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), fx["eval_logits"], atol=1e-5, rtol=0)
        torch.testing.assert_close(fuse_levit(model)(images), fx["fused_logits"], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------ Slide attention

SLIDE = load_fixture("slide_attention_reference.pt")


def reference_module(case: dict) -> SlideAttention:
    kw = case["kwargs"]
    m = SlideAttention(kw["dim"], kw["num_heads"], ka=kw["ka"])
    m.load_state_dict(case["state_dict"], strict=True)
    return m


@pytest.mark.parametrize("name", sorted(SLIDE))
def test_slide_attention_training_outputs_and_gradients_equal_the_authors(name):
    case = SLIDE[name]
    m = reference_module(case).train()
    (H, W), (B, L, C) = case["kwargs"]["input_resolution"], case["x"].shape
    x = case["x"].view(B, H, W, C).requires_grad_()
    out = m(x)
    out.square().mean().backward()
    torch.testing.assert_close(out.reshape(B, L, C), case["out"], atol=1e-5, rtol=0)
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert grads.keys() == case["grads"].keys() - {"input"}
    for n, g in grads.items():
        torch.testing.assert_close(g, case["grads"][n], atol=1e-5, rtol=1e-4, msg=lambda msg: f"{n}: {msg}")
    torch.testing.assert_close(x.grad.reshape(B, L, C), case["grads"]["input"], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(SLIDE))
def test_reparameterised_slide_attention_equals_the_authors_on_kernel_and_torch_paths(name, monkeypatch):
    case = SLIDE[name]
    m = reference_module(case).eval()
    m.reparameterize()
    (H, W), (B, L, C) = case["kwargs"]["input_resolution"], case["x"].shape
    x = case["x"].view(B, H, W, C)
    kernel_applies = slide_kernel.supports(m.ka, m.head_dim) and slide_kernel.available()
    calls = []
    kernel = slide_kernel.slide_attention
    monkeypatch.setattr(slide_kernel, "slide_attention", lambda *a: calls.append(1) or kernel(*a))
    with torch.no_grad():
        default = m(x).reshape(B, L, C)
        monkeypatch.setattr(slide_kernel, "available", lambda: False)
        torch_path = m(x).reshape(B, L, C)
    assert bool(calls) == kernel_applies, "the kernel runs exactly where it applies"
    torch.testing.assert_close(default, case["out"], atol=1e-5, rtol=0)
    torch.testing.assert_close(torch_path, case["out"], atol=1e-5, rtol=0)


# --------------------------------------------------------------------------------------- Slide-Swin

@pytest.fixture(scope="module")
def slide_swin_checkpoint(tmp_path_factory):
    fx = load_fixture("slide_swin_t_reference.pt")
    return fx, drawn_checkpoint(fx, tmp_path_factory.mktemp("slide") / "slide_swin_t.pth")


@pytest.mark.parametrize("fused_attn", [True, False])
def test_slide_swin_t_logits_equal_the_authors(slide_swin_checkpoint, fused_attn, monkeypatch):
    """As trained (two paths) and re-parameterised (kernel on the CPU, and the torch path)."""
    fx, path = slide_swin_checkpoint
    cfg = fx["config"]
    model = build("slide_swin_t", num_classes=cfg["num_classes"], img_size=cfg["img_size"],
                  fused_attn=fused_attn, pretrained_path=str(path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(fx["images"]), fx["logits"], atol=1e-5, rtol=0)
        reparameterize_slide(model)
        torch.testing.assert_close(model(fx["images"]), fx["logits"], atol=1e-5, rtol=0)
        monkeypatch.setattr(slide_kernel, "available", lambda: False)
        torch.testing.assert_close(model(fx["images"]), fx["logits"], atol=1e-5, rtol=0)


def test_reference_slide_swin_t_checkpoint_is_refused_by_slide_swin_s(slide_swin_checkpoint):
    _, path = slide_swin_checkpoint
    with pytest.raises(UserInputError, match="does not fit the model: missing 'layers.2.blocks.6"):
        create_slide_swin("slide_swin_s", num_classes=10, img_size=64, pretrained_path=str(path))
