"""Feed-forward training of SegDiff's network (analysis paper 001, experiment E1).

The same denoiser is trained directly as a segmenter: its noisy-mask input is pure N(0, I) noise (no mask signal),
its timestep input is fixed to T-1, and its output is read as mask logits trained with Dice + CE. At inference the
diffseg segmenter runs it as a one-step predictor (``num_inference_steps=1`` from t = T-1, ``prediction_type="sample"``,
``logits_output=True``), which feeds exactly such noise.
"""

from __future__ import annotations

import torch

from diffseg.codecs import MaskCodec
from diffseg.scheduler import DiffusionScheduler
from diffseg.training import DiffusionSegPrepareBatch

__all__ = ["FeedForwardPrepareBatch"]


class FeedForwardPrepareBatch(DiffusionSegPrepareBatch):
    """``(noise, target, (), {"timesteps": T-1, "image": image})`` for ``SupervisedTrainer``.

    ``target`` is :class:`diffseg.training.DiffusionSegPrepareBatch`'s mapping with ``x_t`` = the noise, so
    :class:`diffseg.losses.DiffusionSegLoss` (``logits_output=True``, Dice + CE) trains a direct segmenter.
    """

    def __init__(
        self, scheduler: DiffusionScheduler, codec: MaskCodec, image_key: str = "image", label_key: str = "label"
    ) -> None:
        super().__init__(scheduler, codec, logits_output=True, image_key=image_key, label_key=label_key)

    def get_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        return torch.full((images.shape[0],), self.num_train_timesteps - 1, dtype=torch.long, device=images.device)

    def prepare(
        self, image: torch.Tensor, label: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple, dict[str, torch.Tensor]]:
        _, target, args, kw = super().prepare(image, label)
        target["x_t"] = target["noise"]  # the network never sees the mask
        return target["noise"], target, args, kw
