"""accel.atomic: a file or folder appears under its name whole or not at all."""
from __future__ import annotations

import os
import stat

import pytest

from accel.atomic import atomic_path, leftovers


def test_a_file_replaces_the_old_one_only_when_its_block_ends(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and os.path.basename(tmp).startswith(".out.bin.tmp-")
        with open(tmp, "wb") as f:
            f.write(b"new")
        assert target.read_bytes() == b"old"
        assert leftovers(target) == [tmp]
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["out.bin"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
def test_an_interrupted_or_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(error):
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"half")
            raise error()
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_a_folder_replaces_an_existing_folder_and_a_failed_one_leaves_nothing(tmp_path):
    target = tmp_path / "set"
    (target / "stale").mkdir(parents=True)
    with atomic_path(target, directory=True) as tmp:
        os.makedirs(os.path.join(tmp, "a"))
        open(os.path.join(tmp, "a", "x.txt"), "w").close()
    assert sorted(os.listdir(target)) == ["a"] and os.listdir(target / "a") == ["x.txt"]
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "other", directory=True) as tmp:
            os.makedirs(os.path.join(tmp, "a"))
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == ["set"]


def test_the_result_has_the_permissions_of_a_file_written_directly(tmp_path):
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    with atomic_path(tmp_path / "file"):
        pass
    with atomic_path(tmp_path / "folder", directory=True):
        pass
    os.mkdir(tmp_path / "plain_folder")
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(tmp_path / "file") == mode(plain)
    assert mode(tmp_path / "folder") == mode(tmp_path / "plain_folder")


def test_the_target_folder_is_created(tmp_path):
    with atomic_path(tmp_path / "a" / "b" / "c.txt") as tmp:
        with open(tmp, "w") as f:
            f.write("x")
    assert (tmp_path / "a" / "b" / "c.txt").read_text() == "x"


def test_a_checkpoint_save_removes_the_temporary_of_a_killed_writer(tmp_path):
    from callbacks.atomic_checkpoint_io import AtomicCheckpointIO
    import torch
    (tmp_path / ".last.ckpt.tmp-999-0000").write_bytes(b"half")   # as left by SIGKILL
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, tmp_path / "last.ckpt")
    assert os.listdir(tmp_path) == ["last.ckpt"]
    assert torch.load(tmp_path / "last.ckpt", weights_only=True)["global_step"] == 3
