"""DeiT distillation: hard and soft losses by hand, the teacher registered with the module (outside
its parameters and checkpoint), training a distilled DeiT with EViT, bad input."""
import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from accel.errors import UserInputError
from accel.heads import Heads
from callbacks.distillation import DeiTDistillationLoss, build_teacher, distillation_loss
from conftest import FAST, make_cfg
from pipeline import run

S_CLS = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
S_DIST = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, -1.0]])
TEACHER = torch.tensor([[0.0, 3.0, 0.0], [1.0, 0.0, 0.0]])
Y = torch.tensor([0, 1])


def test_hard_distillation_by_hand():
    base = F.cross_entropy(S_CLS, Y)
    total, part = distillation_loss(S_CLS, S_DIST, TEACHER, base, "hard", alpha=0.5, tau=1.0)
    # teacher argmax = [1, 0]
    expected_part = (-(F.log_softmax(S_DIST, 1)[0, 1]) - F.log_softmax(S_DIST, 1)[1, 0]) / 2
    assert part == pytest.approx(float(expected_part))
    assert total == pytest.approx(0.5 * float(base) + 0.5 * float(expected_part))


def test_soft_distillation_by_hand():
    tau = 2.0
    base = torch.tensor(1.3)
    total, part = distillation_loss(S_CLS, S_DIST, TEACHER, base, "soft", alpha=0.25, tau=tau)
    p_t = F.softmax(TEACHER / tau, 1)
    kl = (p_t * (p_t.log() - F.log_softmax(S_DIST / tau, 1))).sum()
    expected_part = kl * tau * tau / S_DIST.numel()   # DeiT divides by batch × classes
    assert part == pytest.approx(float(expected_part), rel=1e-5)
    assert total == pytest.approx(0.75 * 1.3 + 0.25 * float(expected_part), rel=1e-5)


def tiny_student(**kw):
    from module import ImageClassifier
    torch.manual_seed(0)
    backbone = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, patch_size=8, depth=1,
                                 embed_dim=32, num_heads=2, num_classes=3)
    return ImageClassifier(backbone, num_classes=3, smoothing=0.0, **kw)


def test_registered_teacher_drives_the_loss_and_stays_out_of_parameters_and_checkpoint():
    module = tiny_student(ema_decay=0.9)
    keys, params = set(module.state_dict()), [id(p) for p in module.parameters()]
    teacher = nn.Linear(3 * 32 * 32, 3)
    teacher_net = nn.Sequential(nn.Flatten(), teacher)
    module.set_distillation(teacher_net, DeiTDistillationLoss("soft", alpha=0.5, tau=2.0))
    assert set(module.state_dict()) == keys and [id(p) for p in module.parameters()] == params
    assert not teacher.weight.requires_grad and not teacher_net.training
    module.train()
    assert not teacher_net.training, "the student's train() does not reach the teacher"
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    loss = module.training_step((images, targets), 0)
    heads = module.net(images)                       # distilled training: class and distillation heads apart
    assert isinstance(heads, tuple) and len(heads) == 2
    expected, _ = DeiTDistillationLoss("soft", alpha=0.5, tau=2.0)(Heads.of(heads), teacher_net(images), targets,
                                                                   module.criterion)
    torch.testing.assert_close(loss, expected)
    # Unregistered: the network trains on its averaged heads again, with the usual loss.
    module.set_distillation(None)
    assert module.distillation is None
    torch.testing.assert_close(module.training_step((images, targets), 0),
                               F.cross_entropy(module.net(images), targets))


def test_a_student_without_distillation_head_is_refused_by_the_module():
    from module import ImageClassifier
    module = ImageClassifier(timm.create_model("deit_tiny_patch16_224", img_size=32, patch_size=8, depth=1,
                                               embed_dim=32, num_heads=2, num_classes=3), num_classes=3)
    with pytest.raises(UserInputError, match="needs a student with a distillation head, but VisionTransformer"):
        module.set_distillation(nn.Identity(), DeiTDistillationLoss())


def test_distillation_loss_needs_a_distillation_head():
    with pytest.raises(UserInputError, match="returned no distillation head"):
        DeiTDistillationLoss()(Heads(S_CLS), TEACHER, Y, nn.CrossEntropyLoss())


@pytest.fixture
def teacher_file(tmp_path):
    torch.manual_seed(0)
    teacher = timm.create_model("resnet10t", num_classes=10)
    path = tmp_path / "teacher.pth"
    torch.save({"model": teacher.state_dict()}, path)
    return str(path)


DISTILLED = [*FAST, "model=deit_t_distilled", "++model.patch_size=8", "data.image_size=32", "reducer=evit",
             "reducer.locations=[0,1]", "keep_rate=0.6", "callbacks=distill", "callbacks.rich_progress_bar=null",
             "callbacks.model_summary=null", "callbacks.distillation.teacher=resnet10t", "trainer.max_epochs=1",
             "trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1",
             "test=false"]


def test_distilled_deit_with_evit_trains_with_a_small_teacher(tmp_path, teacher_file):
    metrics = run(make_cfg(tmp_path, [*DISTILLED, f"callbacks.distillation.teacher_path={teacher_file}"]))
    assert metrics["train/loss_distill_epoch"] > 0 and metrics["train/loss_base_epoch"] > 0
    assert "val/acc1" in metrics
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert {k.split(".")[0] for k in saved["state_dict"]} == {"net"}, "the teacher is not saved with the student"


def test_teacher_errors(tmp_path, teacher_file):
    with pytest.raises(UserInputError, match="Teacher model 'regnety_16' is not a timm model name"):
        build_teacher("regnety_16", 10, teacher_file)
    with pytest.raises(UserInputError, match="Checkpoint file '/no/teacher.pth' does not exist"):
        build_teacher("resnet10t", 10, "/no/teacher.pth")
    with pytest.raises(UserInputError, match="does not fit the model"):
        build_teacher("resnet10t", 7, teacher_file)
    with pytest.raises(UserInputError, match="needs the teacher's weights"):
        build_teacher("resnet10t", 10, None)


def test_student_without_distillation_head(tmp_path, teacher_file):
    cfg = make_cfg(tmp_path, [*[a for a in DISTILLED if not a.startswith("model=")],
                              f"callbacks.distillation.teacher_path={teacher_file}"])
    with pytest.raises(UserInputError, match="needs a student with a distillation head"):
        run(cfg)


def test_distillation_under_ddp_sim(tmp_path, teacher_file):
    from conftest import run_train
    proc = run_train([*DISTILLED, "trainer=ddp_sim", f"callbacks.distillation.teacher_path={teacher_file}",
                      f"paths.log_dir={tmp_path}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    import csv
    import glob
    rows = list(csv.DictReader(open(glob.glob(str(tmp_path / "train" / "runs" / "*" / "csv" / "metrics.csv"))[0])))
    assert any(r.get("train/loss_distill_step") for r in rows)
