"""Write beside, then rename: a file or folder appears under its final name whole or not at all.

The temporary lives in the target's own directory, because ``os.replace`` is atomic only within one
file system; a temporary in ``/tmp`` would be copied into place when the target sits on another
(NFS, Lustre), and a kill during the copy would leave a truncated file under the final name.
"""
from __future__ import annotations

import glob
import os
import secrets
import shutil
from contextlib import contextmanager
from typing import Iterator, List, Union

PathLike = Union[str, "os.PathLike[str]"]


def _create(folder: str, prefix: str, directory: bool) -> str:
    """A new empty file or folder named ``prefix`` + random characters, with the permissions the
    umask gives any new file (``tempfile``'s are private, and a checkpoint or data set should be
    as readable as one written directly)."""
    while True:
        path = os.path.join(folder, prefix + f"{os.getpid()}-{secrets.token_hex(4)}")
        try:
            if directory:
                os.mkdir(path, 0o777)
            else:
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return path
        except FileExistsError:
            continue


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(target: PathLike, directory: bool = False) -> Iterator[str]:
    """Yield a hidden temporary path beside ``target`` (``.<name>.tmp-<pid>-<random>``), already
    created as an empty file (or, with ``directory``, an empty folder) so no other writer takes it.

    When the block ends normally, a file is ``fsync``-ed (its bytes reach the disk before its name
    does) and moved onto ``target`` with ``os.replace``: readers see the old content or the new,
    never a mixture. A folder replaces an existing ``target`` folder, which is removed first, so a
    reader of a folder should check a completion marker written last inside it. On any exception,
    KeyboardInterrupt included, the temporary is removed and ``target`` is left as it was."""
    folder, name = os.path.split(os.path.abspath(os.fspath(target)))
    os.makedirs(folder, exist_ok=True)
    tmp = _create(folder, f".{name}.tmp-", directory)
    try:
        yield tmp
        if directory:
            if os.path.isdir(target):
                shutil.rmtree(target)
        else:
            _fsync(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


def leftovers(target: PathLike) -> List[str]:
    """The temporaries of :func:`atomic_path` for ``target`` now on disk: those of writers still at
    work, and those of processes killed by SIGKILL, which cannot remove their own. Only a caller
    that knows it is the sole writer of ``target`` may delete them."""
    folder, name = os.path.split(os.path.abspath(os.fspath(target)))
    return glob.glob(os.path.join(folder, f".{glob.escape(name)}.tmp-*"))
