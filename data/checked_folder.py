"""An ImageFolder that names the file when an image cannot be decoded."""
from __future__ import annotations

from PIL import Image
from torchvision.datasets import ImageFolder

from accel.errors import UserInputError


def load_rgb(path: str) -> Image.Image:
    """Decode ``path`` fully (so a truncated JPEG fails here, not later) and convert to RGB."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
            return img.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - any decoder failure gets the same sentence
        raise UserInputError(f"Image {path} could not be decoded ({exc}); remove or replace the file.") from exc


class CheckedImageFolder(ImageFolder):
    """torchvision ``ImageFolder`` whose loader raises one sentence naming a corrupt file, instead
    of a decoder traceback, so training never silently skips batches."""

    def __init__(self, root: str, transform=None) -> None:
        super().__init__(root, transform=transform, loader=load_rgb)
