"""Write an ImageFolder split into an FFCV .beton file (image: RGBImageField, label: IntField),
safely: into a temporary file next to the target that is renamed only when complete.

Two facts about ffcv's ``DatasetWriter`` shape this module. It runs the reading in worker
processes and waits for a sample count, so an exception inside a worker hangs the writer forever:
here a file that cannot be decoded never raises in a worker; it is recorded and replaced by a
placeholder, and the temporary file is then thrown away (``stop``) or written again without the
bad files (``skip``). And the writer has no interruption handling: on any exception or Ctrl-C the
workers are ended and the shared memory freed here, and :func:`accel.atomic.atomic_path` removes
the temporary file.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image
from torchvision.datasets import ImageFolder

from accel.atomic import atomic_path
from accel.errors import UserInputError
from data.checked_folder import load_rgb
from data.ffcv_install import require_ffcv

WRITE_MODES = ("jpg", "proportion", "raw")
ON_CORRUPT = ("stop", "skip")


@dataclass
class ImageFieldOptions:
    """The options of ffcv's ``RGBImageField``: how images are stored."""
    write_mode: str = "jpg"
    max_resolution: Optional[int] = 256     # longer side, px; None keeps full resolution
    jpeg_quality: int = 90
    compress_probability: float = 0.5      # only for write_mode="proportion"

    def check(self) -> None:
        if self.write_mode not in WRITE_MODES:
            raise UserInputError(f"--write-mode {self.write_mode!r} is not one of {', '.join(WRITE_MODES)}.")
        if self.max_resolution is not None and self.max_resolution < 8:
            raise UserInputError(f"--max-resolution {self.max_resolution} is too small; expected a side length "
                                 "in pixels such as 256, or 0 for full resolution.")
        if not 1 <= self.jpeg_quality <= 100:
            raise UserInputError(f"--jpeg-quality {self.jpeg_quality} is outside 1..100.")
        if not 0.0 <= self.compress_probability <= 1.0:
            raise UserInputError(f"--compress-probability {self.compress_probability} is outside [0, 1].")


@dataclass
class SplitReport:
    """What was written for one split."""
    path: str
    written: int
    classes: List[str]
    skipped: List[Tuple[str, str]] = field(default_factory=list)   # (file, reason)


class _CorruptImageSeen(Exception):
    """Raised in the main process (from a signal handler) when a worker met a bad file in stop mode."""


class _Source:
    """(RGB PIL image, label) by index for ffcv's writer workers. A file that cannot be decoded is
    appended to ``bad`` (a manager list shared with the main process) and an 8×8 placeholder is
    returned instead of raising, because a raising worker hangs ffcv's writer. With
    ``signal_pid`` the main process is also told at once (SIGUSR1), so stop mode stops early."""

    def __init__(self, samples: Sequence[Tuple[str, int]], bad, signal_pid: Optional[int]) -> None:
        self.samples, self.bad, self.signal_pid = samples, bad, signal_pid

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            image = load_rgb(path)
        except UserInputError as exc:
            self.bad.append((index, path, str(exc.__cause__ or exc)))
            if self.signal_pid is not None:
                os.kill(self.signal_pid, signal.SIGUSR1)
            image = Image.new("RGB", (8, 8))
        return image, label


def check_outputs(paths: Sequence[str], force: bool) -> None:
    """Refuse before anything is read or written if a target exists and ``force`` is off."""
    for path in paths:
        if os.path.exists(path) and not force:
            raise UserInputError(f"{path} already exists; pass --force to overwrite it (it is left untouched).")
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise UserInputError(f"The output folder {folder} does not exist; create it first.")


def _end_writer(writer, workers) -> None:
    """After a failed or interrupted write: end ffcv's worker processes and free its shared memory
    (ffcv's writer leaves both behind, and its non-daemon workers would block interpreter exit)."""
    for child in workers:
        child.terminate()
        child.join(timeout=5)
    memory = getattr(writer, "metadata_sm", None)
    if memory is not None and not isinstance(memory, int):
        try:
            memory.close()
            memory.unlink()
        except (FileNotFoundError, OSError):
            pass


def _write_once(tmp: str, source: _Source, indices: List[int], options: ImageFieldOptions, num_workers: int) -> None:
    require_ffcv()
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {"image": RGBImageField(write_mode=options.write_mode, max_resolution=options.max_resolution,
                                     jpeg_quality=options.jpeg_quality,
                                     compress_probability=options.compress_probability),
              "label": IntField()}
    writer = DatasetWriter(tmp, fields, num_workers=num_workers)
    # Chunks small enough that every worker gets work on a small set, ffcv's default (100) on a large one.
    chunk = max(1, min(100, len(indices) // (4 * num_workers)))
    before = set(multiprocessing.active_children())
    try:
        writer.from_indexed_dataset(source, indices=indices, chunksize=chunk)
    except BaseException:
        _end_writer(writer, set(multiprocessing.active_children()) - before)   # only the writer's own workers
        raise


def write_split(folder: str, out_path: str, options: ImageFieldOptions, num_workers: int = 4,
                on_corrupt: str = "stop", class_names: Optional[List[str]] = None,
                stop_early: bool = False) -> SplitReport:
    """Write ``folder`` (ImageFolder layout: <class>/<image>) to ``out_path``. Labels are the class
    folders' sorted order (torchvision's ImageFolder), or their position in ``class_names``.
    Nothing is left at ``out_path`` (nor next to it) unless the whole file was written.

    With ``on_corrupt="stop"`` a bad file is reported after the pass; ``stop_early`` interrupts the
    pass at the first one instead, by a signal from the worker. An exception raised from a signal
    handler can land anywhere, even inside the logging module's lock handling, and leave a lock held,
    so only a process that exits right after the error (scripts/write_ffcv.py) should ask for it."""
    if on_corrupt not in ON_CORRUPT:
        raise UserInputError(f"--on-corrupt {on_corrupt!r} is not one of {', '.join(ON_CORRUPT)}.")
    found = ImageFolder(folder)
    if class_names is not None and found.classes != class_names:
        raise UserInputError(f"{folder} has class folders {found.classes[:3]}… that differ from the first split's "
                             f"{class_names[:3]}…; expected the same class names in every split.")
    samples = list(found.samples)
    # The manager's process holds the list of bad files (it ignores Ctrl-C, so cleanup can still use it).
    manager = multiprocessing.Manager()
    bad = manager.list()
    stop = on_corrupt == "stop"
    # Stopping early needs a signal handler, which only the main thread can install; elsewhere a bad
    # file is still found, after the pass.
    early_stop = stop and stop_early and threading.current_thread() is threading.main_thread()
    source = _Source(samples, bad, os.getpid() if early_stop else None)
    indices = list(range(len(samples)))
    skipped: Dict[int, Tuple[str, str]] = {}

    writing = [False]   # the handler interrupts a write in progress only; `bad` is checked after it anyway

    def corrupt_seen(signum, frame):
        # Once per write: other workers meeting bad files signal too, and a second raise would
        # interrupt the clean-up of the first (leaving workers and shared memory behind).
        if writing[0]:
            writing[0] = False
            raise _CorruptImageSeen()

    previous = signal.signal(signal.SIGUSR1, corrupt_seen) if early_stop else None
    try:
        with atomic_path(out_path) as tmp:
            while True:
                try:
                    writing[0] = True
                    _write_once(tmp, source, indices, options, num_workers)
                    writing[0] = False
                except _CorruptImageSeen:
                    pass   # the bad file is in `bad`; reported below
                finally:
                    writing[0] = False
                if not bad:
                    break
                if stop:
                    _, path, reason = bad[0]
                    raise UserInputError(f"Image {path} could not be decoded ({reason}); remove or replace it, "
                                         "or pass --on-corrupt skip to leave such files out.")
                # skip: write again without them (a bad file costs one more pass, a clean set none).
                skipped.update({i: (p, r) for i, p, r in bad})
                del bad[:]
                indices = [i for i in indices if i not in skipped]
                if not indices:
                    raise UserInputError(f"No image under {folder} could be decoded; nothing was written.")
    finally:
        if early_stop:
            signal.signal(signal.SIGUSR1, previous)
        manager.shutdown()
    return SplitReport(out_path, len(indices), found.classes, [skipped[i] for i in sorted(skipped)])
