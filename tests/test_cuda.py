"""The GPU path, checked on a machine with an NVIDIA GPU (``pytest -m cuda``; ``scripts/gpu_check.sh``
runs it). Every test here is marked ``cuda`` and skips where CUDA is not available, as
lightning-hydra-template's ``RunIf(min_gpus=1)``.

Covered: each reducer's logits on CUDA against the CPU; no host synchronisation in a training step
(``torch.cuda.set_sync_debug_mode("error")``); a bf16-mixed training step of every model config; a
2-step ``train.py trainer=gpu data=synthetic`` run; SDPA's flash and memory-efficient kernels chosen
where the shapes allow; the FFCV loader's GPU branch (ToDevice, normalisation on the device).
"""
from __future__ import annotations

import os
import types

import pytest
import torch

from conftest import CONF, QUIET, make_cfg, run_train
from small_nets import NAMES, build, images, loss_of

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

# Every model config of conf/model except the parameterised files (they need model.name) and the
# digits toy (its own data set).
MODEL_CONFIGS = sorted(f[:-5] for f in os.listdir(os.path.join(CONF, "model"))
                       if f.endswith(".yaml") and f[:-5] not in ("deit", "levit", "evo_levit", "vit_digits"))


@pytest.fixture(autouse=True)
def full_fp32():
    """fp32 comparisons against the CPU: no TF32 in matmuls or convolutions."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("name", NAMES)
def test_logits_on_cuda_equal_cpu(name):
    from test_bf16 import sharpened  # peaked attention: selections without near-ties
    net = sharpened(name)
    x = images(4)
    with torch.no_grad():
        cpu = net(x)
        cuda = net.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(cuda, cpu, rtol=1e-3, atol=1e-4 * float(cpu.abs().max()))


@pytest.mark.parametrize("name", NAMES)
def test_training_step_has_no_host_sync_on_cuda(name):
    from test_host_sync import METHOD_SYNCS
    if name in METHOD_SYNCS:  # ATS padded to the batch's widest image ("ats_static" is checked)
        pytest.skip(f"{name} reads back its own {METHOD_SYNCS[name][2]} values per forward (test_host_sync.py)")
    net = build(name).cuda().train()
    x, y = images(4).cuda(), (torch.arange(4) % 10).cuda()
    loss_of(net(x), y).backward()  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss_of(net(x), y).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_train_py_two_steps_on_the_gpu(tmp_path):
    proc = run_train(["model=evit_deit_s", "trainer=gpu", "data=synthetic", "trainer.max_steps=2",
                      "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", f"paths.log_dir={tmp_path}",
                      *QUIET])
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("name, backend", [("evit", "FLASH_ATTENTION"), ("evo", "FLASH_ATTENTION"),
                                           ("tome", "EFFICIENT_ATTENTION")])
def test_sdpa_uses_a_fused_kernel(name, backend):
    """With only the fused kernel allowed, the bf16 forward still runs: SDPA chose it (ToMe's additive
    size mask rules out flash attention, which takes no mask; the memory-efficient kernel takes one)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    net = build(name).cuda().eval()
    x = images(4).cuda()
    with torch.no_grad(), torch.autocast("cuda", torch.bfloat16):
        expected = net(x)
        with sdpa_kernel([getattr(SDPBackend, backend)]):
            fused = net(x)
    torch.testing.assert_close(fused.float(), expected.float(), rtol=0.05, atol=0.05)


def test_ffcv_loader_moves_batches_to_the_gpu_and_normalises_there(tmp_path):
    pytest.importorskip("ffcv")
    from data.ffcv import FFCVDataModule
    from data.folder import IMAGENET_MEAN, IMAGENET_STD
    from test_ffcv import COLOURS, write_colour_folder, write_ffcv

    root = write_colour_folder(tmp_path / "colours")
    write_ffcv.main([root, str(tmp_path / "betons"), "--write-mode", "raw", "--num-workers", "2"])
    dm = FFCVDataModule(str(tmp_path / "betons" / "train.beton"), str(tmp_path / "betons" / "val.beton"),
                        num_classes=3, image_size=24, batch_size=5, num_workers=1, drop_last=False)
    device = torch.device("cuda", torch.cuda.current_device())
    dm.trainer = types.SimpleNamespace(world_size=1, strategy=types.SimpleNamespace(root_device=device),
                                       precision="bf16-mixed", training=False, current_epoch=0)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(3, 1, 1)
    batches = 0
    for images_u8, labels in dm.val_dataloader():
        assert images_u8.device.type == "cuda" and labels.device.type == "cuda"   # ToDevice in the pipeline
        x, y = dm.on_after_batch_transfer((images_u8, labels), 0)
        assert x.device.type == "cuda" and x.dtype == torch.bfloat16               # bf16-mixed → bfloat16
        colours = torch.tensor(COLOURS, dtype=torch.float32, device=device)[y]
        expected = ((colours[:, :, None, None] / 255 - mean) / std).expand_as(x)
        torch.testing.assert_close(x.float(), expected, atol=0.02, rtol=0.01)
        batches += 1
    assert batches == 4  # 18 images in batches of 5


# Last: the longest test (some 35 configs), so that a time limit cuts it rather than the others.
@pytest.mark.parametrize("model", MODEL_CONFIGS)
def test_bf16_mixed_training_steps_of_every_model_config(tmp_path, model):
    from pipeline import build as build_run
    cfg = make_cfg(tmp_path, [f"model={model}", "trainer=gpu", "data=synthetic", "data.batch_size=8",
                              "data.train_samples=16", "data.val_samples=8", "trainer.max_steps=2",
                              "trainer.limit_val_batches=1", "trainer.num_sanity_val_steps=0", *QUIET])
    datamodule, module, trainer = build_run(cfg)
    assert trainer.precision == "bf16-mixed"
    trainer.fit(module, datamodule)
    assert trainer.global_step == 2
    assert torch.isfinite(trainer.callback_metrics["train/loss"].float())
    assert next(module.net.parameters()).device.type == "cuda"
