"""Base of the diffseg samplers: a MONAI ``Scheduler`` that respaces correctly and keeps float64 schedule arrays.

MONAI 1.6.1's ``DDPMScheduler.step`` takes the previous ᾱ from ``timestep - 1`` and ``DDIMScheduler.step`` from
``timestep - T // n``; both are wrong once ``set_timesteps`` has chosen a rounded subset. Here the previous timestep is
looked up in ``self.timesteps`` (as diffusers' ``previous_timestep``), and the subset is the ImgX ᾱ-subsampling of
:mod:`diffseg.respacing`, so a strided step equals a step of the respaced chain.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from monai.networks.schedulers import Scheduler
from monai.networks.schedulers.ddpm import DDPMPredictionType
from monai.utils import unsqueeze_right

from diffseg.respacing import spaced_timesteps
from diffseg.schedules import make_betas

__all__ = ["DiffusionScheduler", "PredictionType", "StepOutput"]

PredictionType = DDPMPredictionType  # "epsilon" | "sample" | "v_prediction"


class StepOutput(NamedTuple):
    """Result of one reverse step; unpacks like MONAI's ``(prev_sample, pred_original_sample)`` tuple."""

    prev_sample: torch.Tensor  # x_{t_prev}, shape of the sample (B, C, *spatial)
    pred_original_sample: torch.Tensor  # x̂_0, same shape


class DiffusionScheduler(Scheduler):
    """Shared maths of the diffseg samplers (forward process, x̂0/ε̂ conversions, respaced neighbours).

    Args:
        num_train_timesteps: T, the number of steps the denoiser was trained with.
        schedule: name of a function in MONAI's ``NoiseSchedules`` (diffseg adds ``linear_beta_f64``,
            ``improved_linear_beta``, ``scaled_linear_beta_f64``, ``cosine_clipped_beta``, ``respaced_beta``).
        prediction_type: what the denoiser predicts: ``"epsilon"``, ``"sample"`` (x0) or ``"v_prediction"``.
        clip_sample: clamp x̂0 to ``[clip_sample_min, clip_sample_max]`` before the update.
        schedule_args: passed to the schedule function (e.g. ``beta_start``, ``base_timesteps``).
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta_f64",
        prediction_type: str = PredictionType.EPSILON,
        clip_sample: bool = False,
        clip_sample_min: float = -1.0,
        clip_sample_max: float = 1.0,
        **schedule_args,
    ) -> None:
        betas = make_betas(schedule, num_train_timesteps, **schedule_args)  # validates the name
        super().__init__(num_train_timesteps, schedule, **schedule_args)
        if prediction_type not in PredictionType.__members__.values():
            raise ValueError(f"prediction_type={prediction_type!r}; expected one of {sorted(PredictionType)}")
        self.prediction_type = prediction_type
        self.clip_sample = clip_sample
        self.clip_sample_values = (clip_sample_min, clip_sample_max)
        self.betas64 = betas  # (T,) float64, never cast (MONAI's add_noise casts alphas_cumprod in place)
        self.alphas_cumprod64 = torch.cumprod(1.0 - betas, dim=0)
        self.set_timesteps(num_train_timesteps)

    # ---- inference timesteps -----------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Choose ``num_inference_steps`` timesteps by ᾱ-subsampling; ``self.timesteps`` is descending.

        Also tabulates each listed timestep's successor, so a step costs O(1) however long the chain.

        Raises:
            ValueError: if ``num_inference_steps`` is not in ``[1, num_train_timesteps]``.
        """
        steps = spaced_timesteps(self.num_train_timesteps, num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self.timesteps = steps.flip(0).to(device)
        listed = self.timesteps.tolist()
        self._next_timestep = dict(zip(listed, listed[1:] + [-1], strict=True))

    def previous_timestep(self, timestep: int) -> int:
        """The timestep after ``timestep`` in ``self.timesteps`` (the next one the chain visits), or -1 at the end.

        Raises:
            ValueError: if ``timestep`` is not one of ``self.timesteps``.
        """
        if timestep not in self._next_timestep:
            listed = self.timesteps.tolist()
            raise ValueError(f"timestep {timestep} is not in the scheduler's timesteps {listed}; call set_timesteps")
        return self._next_timestep[timestep]

    def alpha_prod_pair(self, timestep: int) -> tuple[float, float]:
        """(ᾱ_t, ᾱ_prev) as Python floats in float64 precision; ᾱ_prev = 1 after the last listed step."""
        prev = self.previous_timestep(timestep)
        acp_prev = float(self.alphas_cumprod64[prev]) if prev >= 0 else 1.0
        return float(self.alphas_cumprod64[timestep]), acp_prev

    # ---- forward process and parameterisations (per-sample timesteps) ------------------------------------------
    def _gather(self, values: torch.Tensor, timesteps: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        """``values[t]`` broadcast to ``like``: timesteps (B,) or scalar → (B, 1, …, 1) in like's dtype/device."""
        t = torch.as_tensor(timesteps, device=values.device).long()
        out = values[t].to(device=like.device, dtype=like.dtype)
        return unsqueeze_right(out, like.ndim) if out.ndim else out

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """q(x_t | x_0): ``√ᾱ_t·x0 + √(1-ᾱ_t)·ε`` (DDPM eq. 4); x0, ε (B, C, *S), timesteps (B,)."""
        acp = self._gather(self.alphas_cumprod64, timesteps, original_samples)
        return acp.sqrt() * original_samples + (1 - acp).sqrt() * noise

    def predict_x0(self, model_output: torch.Tensor, timesteps: torch.Tensor | int, sample: torch.Tensor):
        """x̂0 from the denoiser output at x_t = ``sample`` (DDPM eq. 15 for ε; identity for x0; v-param. otherwise)."""
        if self.prediction_type == PredictionType.SAMPLE:
            return model_output
        acp = self._gather(self.alphas_cumprod64, timesteps, sample)
        if self.prediction_type == PredictionType.EPSILON:
            return (sample - (1 - acp).sqrt() * model_output) / acp.sqrt()
        return acp.sqrt() * sample - (1 - acp).sqrt() * model_output

    def predict_epsilon(self, x0: torch.Tensor, timesteps: torch.Tensor | int, sample: torch.Tensor) -> torch.Tensor:
        """ε̂ consistent with x̂0 at x_t = ``sample``: ``(x_t - √ᾱ_t·x0) / √(1-ᾱ_t)``."""
        acp = self._gather(self.alphas_cumprod64, timesteps, sample)
        return (sample - acp.sqrt() * x0) / (1 - acp).sqrt()

    def _x0_for_step(self, model_output: torch.Tensor, timestep: int, sample: torch.Tensor) -> torch.Tensor:
        x0 = self.predict_x0(model_output, timestep, sample)
        if self.clip_sample:
            x0 = torch.clamp(x0, *self.clip_sample_values)
        return x0

    def posterior_coefficients(self, timestep: int) -> tuple[float, float, float]:
        """(coef_x0, coef_xt, posterior variance) of q(x_prev | x_t, x0) on the respaced chain (DDPM eq. 6–7).

        With ``β' = 1 - ᾱ_t/ᾱ_prev``: coef_x0 = β'√ᾱ_prev/(1-ᾱ_t), coef_xt = √(1-β')(1-ᾱ_prev)/(1-ᾱ_t),
        variance = β'(1-ᾱ_prev)/(1-ᾱ_t).
        """
        acp_t, acp_prev = self.alpha_prod_pair(timestep)
        beta = 1.0 - acp_t / acp_prev
        coef_x0 = beta * acp_prev**0.5 / (1.0 - acp_t)
        coef_xt = (1.0 - beta) ** 0.5 * (1.0 - acp_prev) / (1.0 - acp_t)
        return coef_x0, coef_xt, beta * (1.0 - acp_prev) / (1.0 - acp_t)

    @staticmethod
    def _noise_like(sample: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        # drawn exactly as MONAI's schedulers draw it, so seeded runs agree with them
        return torch.randn(sample.size(), dtype=sample.dtype, generator=generator, device=sample.device)
