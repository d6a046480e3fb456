"""DDPM ancestral sampling (Ho et al. 2020, arXiv 2006.11239) on any respaced chain."""

from __future__ import annotations

import torch
from monai.networks.schedulers.ddpm import DDPMVarianceType

from diffseg.scheduler import DiffusionScheduler, StepOutput

__all__ = ["DDPMSampler", "VarianceType"]

VarianceType = DDPMVarianceType  # "fixed_small" | "fixed_large" (learned variants are not used by these methods)


class DDPMSampler(DiffusionScheduler):
    """Ancestral DDPM step with x0-, ε- or v-parameterisation and fixed-small / fixed-large variance.

    ``step`` moves from ``timestep`` to the next entry of ``self.timesteps``, so ``set_timesteps(5)`` on a
    1001-step linear schedule samples exactly the 5-step chain of ImgX-DiffSeg v0.1.0.

    Args:
        variance_type: ``"fixed_small"`` (posterior variance β̃) or ``"fixed_large"`` (β' of the respaced chain, as
            improved-diffusion's ``[β̃_1, β_1:]`` at every step that adds noise).
        kwargs: ``prediction_type``, ``clip_sample``, schedule arguments… of
            :class:`diffseg.scheduler.DiffusionScheduler`.
    """

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        schedule: str = "linear_beta_f64",
        variance_type: str = VarianceType.FIXED_LARGE,
        **kwargs,
    ) -> None:
        if variance_type not in (VarianceType.FIXED_SMALL, VarianceType.FIXED_LARGE):
            raise ValueError(f"variance_type={variance_type!r}; expected one of ['fixed_large', 'fixed_small']")
        self.variance_type = variance_type
        super().__init__(num_train_timesteps, schedule, **kwargs)

    def variances(self) -> torch.Tensor:
        """Per-step variances of the current chain, shape ``(K,)`` in ascending timestep order (float64).

        ``fixed_small``: posterior variances β̃_k; ``fixed_large``: ``[β̃_1, β'_1, …, β'_{K-1}]`` (improved-diffusion
        and ImgX: for the 5-step ImgX chain ``[1.0e-4, 0.478, 0.851, 0.957, 0.988]``). Index 0 is never used: the
        last reverse step adds no noise.
        """
        ascending = self.timesteps.flip(0).tolist()
        posterior = torch.tensor([self.posterior_coefficients(t)[2] for t in ascending], dtype=torch.float64)
        if self.variance_type == VarianceType.FIXED_SMALL:
            return posterior.clamp_min(1e-20)
        acp = self.alphas_cumprod64[ascending]
        large = 1.0 - acp[1:] / acp[:-1]
        return torch.cat([posterior[1:2] if len(ascending) > 1 else posterior[:1], large])

    def step_variance(self, timestep: int) -> float:
        """Variance of the noise added when leaving ``timestep`` (0 at the last listed step)."""
        prev = self.previous_timestep(timestep)
        if prev < 0:
            return 0.0
        if self.variance_type == VarianceType.FIXED_SMALL:
            return max(self.posterior_coefficients(timestep)[2], 1e-20)
        return 1.0 - float(self.alphas_cumprod64[timestep] / self.alphas_cumprod64[prev])

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """One reverse step x_t → x_prev.

        Args:
            model_output: denoiser output at x_t, shape (B, C, *spatial).
            timestep: current t, an entry of ``self.timesteps``.
            sample: x_t, shape (B, C, *spatial).
            generator: source of the step noise (same generator → same sample).

        Returns:
            ``StepOutput(prev_sample, pred_original_sample)``.
        """
        timestep = int(timestep)
        # 1. predicted x0 (eq. 15 for ε-prediction), optionally clipped
        x0 = self._x0_for_step(model_output, timestep, sample)
        # 2. posterior mean μ̃(x_t, x0) (eq. 7)
        coef_x0, coef_xt, _ = self.posterior_coefficients(timestep)
        prev = coef_x0 * x0 + coef_xt * sample
        # 3. add noise, except when leaving the last listed timestep
        variance = self.step_variance(timestep)
        if variance > 0:
            prev = prev + variance**0.5 * self._noise_like(sample, generator)
        return StepOutput(prev, x0)
