"""Learning-rate schedules for runs counted in iterations (``LrScheduleHandler(epoch_level=False)``)."""

from __future__ import annotations

from monai.optimizers import WarmupCosineSchedule as _MonaiWarmupCosine

__all__ = ["WarmupCosineSchedule"]


class WarmupCosineSchedule(_MonaiWarmupCosine):
    """MONAI's linear warmup + cosine decay to ``end_lr``, held at ``end_lr`` after ``t_total`` iterations.

    MONAI's schedule keeps following the cosine past ``t_total`` (the LR rises again); here it never rises after the
    warmup. ``t_total`` is the run's expected length in iterations (``max_epochs × iterations per epoch``); with
    ``end_lr`` equal to the base LR it is "warmup, then constant".
    """

    def lr_lambda(self, step: int) -> float:
        return super().lr_lambda(min(step, self.t_total))
