"""Mistakes a user makes on the command line get one sentence that says what to type instead (README
"Using it"): a mistyped key or config, an added key nothing takes, a negative batch size, a keep rate
nothing reads, an unwritable run directory, SLURM or a GPU where there is none, a diverged loss."""
import logging
import os
import re

import pytest
import torch

from accel.errors import UserInputError
from conftest import CONF, FAST, make_cfg, run_train
from launch_checks import check_command_line
from pipeline import check_config, instantiate, run


@pytest.mark.parametrize("argv, sentence", [
    (["trainer.max_epoch=1"], "trainer.max_epoch is not in the config; did you mean trainer.max_epochs=1?"),
    (["-m", "keep_rate=0.5,0.7", "modul.lr=1e-3"], "modul.lr is not in the config; did you mean module.lr=1e-3?"),
    (["model=evit_deit_s", "reducer.lokations=[1]"],
     "reducer.lokations is not in the config; did you mean reducer.locations=[1]?"),
    (["hparam_search=keep_rate_lr"], "hparam_search is not in the config; did you mean hparams_search=keep_rate_lr?"),
    (["model=evit_deit_ss"], "model=evit_deit_ss is not a config of the model group (conf/model/); did you mean "
                             "model=evit_deit_s?"),
])
def test_a_mistyped_name_gets_the_closest_one(argv, sentence):
    with pytest.raises(UserInputError) as error:
        check_command_line(argv, CONF)
    assert str(error.value) == sentence


def test_a_correct_command_line_passes_the_checks():
    check_command_line(["-m", "model=evit_deit_t,tome_deit_t", "keep_rate=0.5,0.7", "trainer.max_epochs=2"], CONF)


def test_an_added_key_that_its_target_does_not_take_names_the_closest_parameter(tmp_path):
    cfg = make_cfg(tmp_path, ["+trainer.max_epoch=1"])
    with pytest.raises(UserInputError) as error:
        instantiate(cfg.trainer)
    assert str(error.value) == ("trainer.max_epoch is not a parameter of pytorch_lightning.Trainer; did you mean "
                                "trainer.max_epochs?")


def test_a_negative_batch_size_is_named(tmp_path):
    with pytest.raises(UserInputError, match=r"^data.batch_size=-4 is not a number of images; expected a positive"):
        check_config(make_cfg(tmp_path, ["data.batch_size=-4"]))


def test_a_keep_rate_without_a_reducer_warns_once_naming_the_models_with_one(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        check_config(make_cfg(tmp_path, ["keep_rate=0.5"]))
    warnings = [r.getMessage() for r in caplog.records if "keep_rate" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("keep_rate=0.5 has no effect: model=vit_digits reduces no tokens")
    for name in ("evit_deit_s", "evo_deit_s", "tome_deit_s", "evo_levit_256", "reducer=", "evit|evo"):
        assert name in warnings[0]
    assert "evo_levit," not in warnings[0], "the parameterised base file is no model to choose"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        check_config(make_cfg(tmp_path, ["model=evit_deit_t", "keep_rate=0.5"]))
        check_config(make_cfg(tmp_path, ["model=evo_levit_128s", "keep_rate=0.5"]))
    assert not [r for r in caplog.records if "keep_rate" in r.getMessage()], "a model that reads it is not warned about"


def test_a_run_directory_on_the_command_line_that_cannot_be_written_is_named(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(UserInputError) as error:
        check_command_line([f"hydra.run.dir={blocker}/run"], CONF)
    assert str(error.value) == (f"the run directory (hydra.run.dir) {blocker}/run is not writable (Not a directory); "
                                "expected a directory this job can create and write to.")


def test_a_slurm_sweep_without_slurm_suggests_the_local_launcher(tmp_path, monkeypatch):
    argv = ["-m", "hydra/launcher=submitit_slurm", "keep_rate=0.5,0.7"]
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(UserInputError) as error:
        check_command_line(argv, CONF)
    assert str(error.value) == ("hydra/launcher=submitit_slurm submits the sweep to SLURM, but this machine has no "
                                "SLURM (no srun on PATH); launch it from a SLURM login node, or run it on this machine "
                                "with hydra/launcher=submitit_local.")
    (tmp_path / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "srun").chmod(0o755)
    check_command_line(argv, CONF)  # where SLURM is, the sweep goes on


def test_a_gpu_trainer_without_a_gpu_suggests_the_cpu_trainer(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(UserInputError) as error:
        check_config(make_cfg(tmp_path, ["trainer=gpu"]))
    assert str(error.value).startswith("trainer=gpu trains on GPUs, but this machine has no GPU that PyTorch can use; "
                                       "use trainer=cpu")


def test_mistakes_on_the_command_line_stop_in_one_sentence_before_anything_is_built(tmp_path):
    proc = run_train(["trainer.max_epoch=1", f"paths.log_dir={tmp_path}"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip() == "error: trainer.max_epoch is not in the config; did you mean trainer.max_epochs=1?"
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = run_train([f"paths.log_dir={blocker}/logs", "trainer.max_steps=1"])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.strip() == (f"error: the log directory (paths.log_dir) {blocker}/logs is not writable (Not a "
                                   "directory); expected a directory this job can create and write to.")
    assert os.listdir(tmp_path) == ["a_file"], "nothing was written"


def test_a_diverged_loss_stops_in_one_sentence_and_keeps_the_last_checkpoint_from_before(tmp_path):
    # An absurd learning rate: the weights are finite after the first steps and not after a later one, whose
    # loss the module does not read back (it reads every third): the save after that step must not write them.
    cfg = make_cfg(tmp_path, [*FAST, "module.lr=1e30", "trainer.log_every_n_steps=3", "trainer.max_steps=6",
                              "callbacks.last_checkpoint.every_n_train_steps=1", "trainer.limit_val_batches=1"])
    with pytest.raises(UserInputError) as error:  # train.py prints it as `error: <sentence>`, exit code 2
        run(cfg)
    stopped = re.match(r"The weights are not finite at step (\d+) \(training diverged\), so no checkpoint was "
                       r"written over the last good one; lower the learning rate", str(error.value))
    assert stopped, str(error.value)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == int(stopped.group(1)) - 1, "the checkpoint of the step before"
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values() if t.is_floating_point())
