"""The ImageFolder layout every data path of the project reads: ``root/<split>/<class>/<image>``."""
from __future__ import annotations

import os
from typing import List, Optional, Sequence

from accel.errors import UserInputError


def split_folders(root: Optional[str], splits: Sequence[str] = ("train", "val"), name: str = "") -> List[str]:
    """``root/<split>`` for each split, or one sentence naming ``root`` (as ``name=root`` when the
    value came from a config key) if it is not a folder of such splits, each with class folders."""
    shown = f"{name}={root!r}" if name else repr(root)
    layout = " and ".join(f"{s}/" for s in splits)
    if not root or not os.path.isdir(root):
        raise UserInputError(f"{shown} is not a directory; expected a folder with {layout}, each holding one "
                             "sub-folder of images per class.")
    folders = []
    for split in splits:
        path = os.path.join(root, split)
        if not os.path.isdir(path) or not any(e.is_dir() for e in os.scandir(path)):
            raise UserInputError(f"{shown} has no {split}/ class folders ({path} is missing or empty); expected "
                                 f"{root}/{split}/<class>/<image>.")
        folders.append(path)
    return folders
