"""DeiT distillation: hard and soft losses by hand, training a distilled DeiT with EViT, bad input."""
import pytest
import timm
import torch
import torch.nn.functional as F

from accel.errors import UserInputError
from callbacks.distillation import build_teacher, distillation_loss
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
