"""DDIM sampling (Song et al. 2021, arXiv 2010.02502) on any respaced chain; one step from t = T-1 is SDSeg's
single-step reverse process."""

from __future__ import annotations

import torch

from diffseg.scheduler import DiffusionScheduler, StepOutput

__all__ = ["DDIMSampler"]


class DDIMSampler(DiffusionScheduler):
    """DDIM step with ``eta`` (0 = deterministic DDIM, 1 = DDPM-like noise).

    ``set_timesteps(1)`` keeps only ``t = T-1``, and its step returns x̂0 = (x_T - √(1-ᾱ)·ε̂)/√ᾱ directly: the
    single-step reverse process of SDSeg. Paper symbols: ``std_dev`` → σ_t (eq. 16), ``acp_prev`` → α_{t-1}.

    Args:
        eta: σ_t = eta·√((1-ᾱ_prev)/(1-ᾱ_t)·(1-ᾱ_t/ᾱ_prev)).
        kwargs: ``prediction_type``, ``clip_sample``, schedule arguments… of
            :class:`diffseg.scheduler.DiffusionScheduler`.
    """

    def __init__(
        self, num_train_timesteps: int = 1000, schedule: str = "linear_beta_f64", eta: float = 0.0, **kwargs
    ) -> None:
        if eta < 0:
            raise ValueError(f"eta={eta} must be >= 0 (0: deterministic DDIM, 1: DDPM-like)")
        self.eta = eta
        super().__init__(num_train_timesteps, schedule, **kwargs)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> StepOutput:
        """One DDIM step x_t → x_prev (eq. 12); shapes (B, C, *spatial)."""
        timestep = int(timestep)
        acp_t, acp_prev = self.alpha_prod_pair(timestep)
        # 1. predicted x0 and the ε consistent with it (after clipping, as in the DDIM reference code)
        x0 = self._x0_for_step(model_output, timestep, sample)
        eps = self.predict_epsilon(x0, timestep, sample)
        # 2. σ_t (eq. 16)
        std_dev = self.eta * ((1 - acp_prev) / (1 - acp_t) * (1 - acp_t / acp_prev)) ** 0.5
        # 3. direction pointing to x_t and the deterministic part of x_prev (eq. 12)
        prev = acp_prev**0.5 * x0 + max(1 - acp_prev - std_dev**2, 0.0) ** 0.5 * eps
        # 4. random part
        if std_dev > 0:
            prev = prev + std_dev * self._noise_like(sample, generator)
        return StepOutput(prev, x0)
