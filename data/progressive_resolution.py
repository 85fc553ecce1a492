"""Progressive resizing as in ffcv-imagenet (Leclerc et al., "FFCV", CVPR 2023, Sec. 5): train at
``min_res`` until ``start_ramp``, grow linearly to ``max_res`` at ``end_ramp`` (rounded to a
multiple of ``step``), then stay there. Low resolution early makes the first epochs cheap."""
from __future__ import annotations

from dataclasses import dataclass

from accel.errors import UserInputError


@dataclass(frozen=True)
class ResolutionSchedule:
    """Training resolution (px, square) for each epoch (0-based)."""
    min_res: int = 160
    max_res: int = 192
    start_ramp: int = 0
    end_ramp: int = 0
    step: int = 32

    def __post_init__(self) -> None:
        if not 0 < self.min_res <= self.max_res:
            raise UserInputError(f"data.progressive min_res={self.min_res}, max_res={self.max_res}; expected "
                                 "0 < min_res <= max_res (e.g. 160 and 192).")
        if not 0 <= self.start_ramp <= self.end_ramp:
            raise UserInputError(f"data.progressive start_ramp={self.start_ramp}, end_ramp={self.end_ramp}; expected "
                                 "0 <= start_ramp <= end_ramp (epochs).")
        if self.step < 1:
            raise UserInputError(f"data.progressive step={self.step}; expected a positive number of pixels (e.g. 32).")

    def __call__(self, epoch: int) -> int:
        if epoch <= self.start_ramp:
            return self.min_res
        if epoch >= self.end_ramp:
            return self.max_res
        frac = (epoch - self.start_ramp) / (self.end_ramp - self.start_ramp)
        res = self.min_res + frac * (self.max_res - self.min_res)
        return int(round(res / self.step)) * self.step
