"""diffseg — the shared diffusion core of MONAI DiffSeg.

One concept per module: ``schedules`` (noise schedules in MONAI's registry), ``respacing`` (ᾱ-subsampling),
``scheduler``/``ddpm``/``ddim`` (samplers), ``sampling`` (the reverse loop), ``codecs`` (mask ↔ {-1,+1}),
``denoiser`` (the conditioning interface), ``recycling`` and ``training`` (training steps for MONAI's
``SupervisedTrainer``), ``losses``, ``segmenter`` (image → scores with the sampler inside), ``sliding``
(window-consistent sampling), ``transforms`` (uncertainty maps in post-processing), ``ensembles``, ``uncertainty``,
``metrics``, ``handlers``/``optimizers``/``curves`` (training to a budget: clock, resumable checkpoints, EMA,
LR schedule, learning curves), ``data`` (the real-data fetcher), ``overlay`` (the overlay PNG, also as the bundles'
``SaveOverlayd`` postprocessing step) and ``notices`` (notices that ask nothing of the user, silenced on import).
"""

from __future__ import annotations

from diffseg import schedules  # noqa: F401  registers the schedules in MONAI's NoiseSchedules
from diffseg.codecs import BinaryCodec, MaskCodec, OneHotCodec
from diffseg.curves import LearningCurve
from diffseg.ddim import DDIMSampler
from diffseg.ddpm import DDPMSampler
from diffseg.denoiser import ConcatDenoiser, ConditionalDenoiser
from diffseg.handlers import PeriodicValidation, RandomStates, TrainingCheckpoint, TrainingClock, WeightEMA
from diffseg.losses import DiffusionSegLoss, ForegroundDiceLoss
from diffseg.notices import silence_notices
from diffseg.optimizers import WarmupCosineSchedule
from diffseg.overlay import SaveOverlayd
from diffseg.respacing import respace, spaced_timesteps
from diffseg.scheduler import DiffusionScheduler, StepOutput
from diffseg.segmenter import DiffusionSegmenter
from diffseg.sliding import StitchedUncertaintyInferer, WindowConsistentInferer
from diffseg.training import DiffusionSegPrepareBatch, FeedForwardPrepareBatch, GradientClipping
from diffseg.transforms import SegmenterUncertaintyd, SelectTransformd

__version__ = "0.1.0"

silence_notices()

__all__ = [
    "BinaryCodec",
    "ConcatDenoiser",
    "ConditionalDenoiser",
    "DDIMSampler",
    "DDPMSampler",
    "DiffusionScheduler",
    "DiffusionSegLoss",
    "DiffusionSegPrepareBatch",
    "DiffusionSegmenter",
    "FeedForwardPrepareBatch",
    "ForegroundDiceLoss",
    "GradientClipping",
    "LearningCurve",
    "MaskCodec",
    "OneHotCodec",
    "PeriodicValidation",
    "RandomStates",
    "SaveOverlayd",
    "SegmenterUncertaintyd",
    "SelectTransformd",
    "StepOutput",
    "StitchedUncertaintyInferer",
    "TrainingCheckpoint",
    "TrainingClock",
    "WarmupCosineSchedule",
    "WeightEMA",
    "WindowConsistentInferer",
    "respace",
    "spaced_timesteps",
]
