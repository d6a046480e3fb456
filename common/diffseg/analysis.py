"""The analyses of paper 001 (Öttl et al.) for any :class:`diffseg.DiffusionSegmenter`.

- :func:`mask_error_curve`: the "dataset fingerprint" — error of the one-call x̂0 against the ground truth at each
  timestep of a grid (MSE in the codec's {−1, +1} space and Dice of the decoded mask), averaged over images and
  noise draws; with ``unconditioned=True`` the image is replaced by noise (experiment E3), which shows from which t on
  the image stops mattering.
- :func:`segmentation_scores`: Dice / IoU / ECE of probabilities against labels (the feed-forward vs diffusion table
  compares two of these; the calibration analysis adds :func:`diffseg.metrics.reliability_data`).
- :func:`save_reliability_diagram`, :func:`save_curve_plot`: PNG figures (matplotlib, no display needed).

Seed stability is :func:`diffseg.metrics.seed_stability`.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from .metrics import ReliabilityData, dice_per_class, expected_calibration_error, iou_per_class
from .segmenter import DiffusionSegmenter

__all__ = [
    "mask_error_curve",
    "one_call_x0",
    "save_curve_plot",
    "save_reliability_diagram",
    "segmentation_scores",
    "write_csv",
]


def _to_sample_space(segmenter: DiffusionSegmenter, x0: torch.Tensor) -> torch.Tensor:
    """Mask x0 (B, C, *S) in {−1, +1} → the space the chain runs in (the latent of a latent-diffusion segmenter)."""
    latent = segmenter.latent_decoder
    if latent is None:
        return x0
    if not hasattr(latent, "encode"):
        raise ValueError("a latent segmenter's latent_decoder needs an encode(mask) method for this analysis")
    return latent.encode(x0)


def one_call_x0(
    segmenter: DiffusionSegmenter, x_t: torch.Tensor, timesteps: torch.Tensor, features: object
) -> torch.Tensor:
    """x̂0 in mask space (B, C, *S), clipped to [−1, 1], from ONE denoiser call at ``timesteps`` (B,)."""
    return _one_call(segmenter, x_t, timesteps, features)[1]


def _one_call(
    segmenter: DiffusionSegmenter, x_t: torch.Tensor, timesteps: torch.Tensor, features: object
) -> tuple[torch.Tensor, torch.Tensor]:
    """One denoiser call → (ε̂ implied in the chain's space, like x_t; clipped x̂0 in mask space (B, C, *S))."""
    out = segmenter.denoiser.denoise(x_t, timesteps, features)
    if segmenter.logits_output:
        x0 = segmenter.codec.logits_to_x(out)
    else:
        x0 = segmenter.scheduler.predict_x0(out, timesteps, x_t)
    eps = segmenter.scheduler.predict_epsilon(x0, timesteps, x_t)
    if segmenter.latent_decoder is not None:
        x0 = segmenter.latent_decoder(x0)
    return eps, x0.clamp(-1, 1)


@torch.no_grad()
def mask_error_curve(
    segmenter: DiffusionSegmenter,
    pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
    timesteps: Sequence[int],
    draws: int = 2,
    unconditioned: bool = False,
    seed: int = 0,
) -> list[dict[str, float]]:
    """Mean one-call x̂0 error per timestep over ``pairs`` of (image (1, C_img, *S), label (1, 1, *S)).

    Returns one row per t: ``{"t", "mse", "dice", "noise_slope"}`` — MSE between x̂0 and the encoded label in
    {−1, +1}, the foreground Dice of the decoded x̂0's argmax (mean over foreground classes present in either map),
    and the least-squares slope of the ε̂ implied by the call on the drawn noise ε, ⟨ε̂, ε⟩ / ⟨ε, ε⟩. A denoiser that
    reads x_t has a slope near 1 (an x0-predictor has it by construction); an ε-predictor that ignores x_t has 0,
    and its x̂0 at large t is the image's guess plus the amplified noise √(1−ᾱ)/√ᾱ·ε.
    ``unconditioned``: the image is replaced by standard normal noise of its shape (paper 001, E3).
    """
    generator = torch.Generator().manual_seed(seed)
    codec, scheduler = segmenter.codec, segmenter.scheduler
    sums = {int(t): [0.0, 0.0, 0] for t in timesteps}
    overlap = {int(t): [0.0, 0.0] for t in timesteps}  # Σ⟨ε̂, ε⟩, Σ⟨ε, ε⟩
    for image, label in pairs:
        image, label = torch.as_tensor(image).float(), torch.as_tensor(label)
        if unconditioned:
            image = torch.randn(image.shape, generator=generator)
        features = segmenter.denoiser.encode_condition(image)
        x0 = codec.encode(label).to(image.dtype)
        gt = codec.decode(x0).argmax(1, keepdim=True)  # the label as the codec sees it (binary: label > 0)
        z0 = _to_sample_space(segmenter, x0)
        for t in timesteps:
            steps = torch.full((image.shape[0],), int(t), dtype=torch.long)
            for _ in range(draws):
                noise = torch.randn(z0.shape, generator=generator)
                eps_hat, x0_hat = _one_call(segmenter, scheduler.add_noise(z0, noise, steps), steps, features)
                overlap[int(t)][0] += float((eps_hat * noise).sum())
                overlap[int(t)][1] += float((noise * noise).sum())
                pred = codec.decode(x0_hat).argmax(1, keepdim=True)
                dice = dice_per_class(pred, gt, codec.num_classes)
                row = sums[int(t)]
                row[0] += float(((x0_hat - x0) ** 2).mean())
                row[1] += float(dice.nanmean()) if torch.isfinite(dice).any() else 1.0
                row[2] += 1
    if not any(n for *_, n in sums.values()):
        raise ValueError("mask_error_curve got no (image, label) pairs")
    return [
        {"t": t, "mse": m / n, "dice": d / n, "noise_slope": overlap[t][0] / overlap[t][1]}
        for t, (m, d, n) in sums.items()
    ]


def segmentation_scores(probs: torch.Tensor, label: torch.Tensor, num_bins: int = 10) -> dict[str, float]:
    """Dice, IoU (mean over foreground classes) and, for binary probabilities, ECE of probs (B, C, *S) vs label."""
    c = probs.shape[1]
    pred = probs.argmax(1, keepdim=True)
    scores = {
        "dice": float(dice_per_class(pred, label.long(), c).nanmean()),
        "iou": float(iou_per_class(pred, label.long(), c).nanmean()),
    }
    if c == 2:
        scores["ece"] = float(expected_calibration_error(probs, label, num_bins=num_bins).mean())
    return scores


def write_csv(rows: Sequence[dict], path: str | Path) -> Path:
    """Rows of equal keys → CSV with a header; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path) -> Path:
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def save_curve_plot(curves: dict[str, Sequence[dict[str, float]]], path: str | Path, title: str = "") -> Path:
    """MSE and Dice vs t (and the noise slope, where the rows have it) for several named curves (e.g. conditioned /
    unconditioned) as one PNG."""
    plt = _figure()
    keys = [("mse", "MSE of one-call x̂0 ({−1,+1})", None), ("dice", "Dice of one-call x̂0", (0, 1))]
    if all("noise_slope" in r for rows in curves.values() for r in rows):
        keys.append(("noise_slope", "slope of implied ε̂ on ε (reads x_t: ≈1)", None))
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5))
    for name, rows in curves.items():
        ts = [r["t"] for r in rows]
        for ax, (key, _, _) in zip(axes, keys, strict=True):
            ax.plot(ts, [r[key] for r in rows], marker="o", label=name)
    for ax, (_, label, ylim) in zip(axes, keys, strict=True):
        ax.set(xlabel="timestep t", ylabel=label)
        if ylim:
            ax.set_ylim(*ylim)
    axes[1].legend()
    fig.suptitle(title)
    return _save(plt, fig, path)


def save_reliability_diagram(data: ReliabilityData, path: str | Path, title: str = "") -> Path:
    """Observed foreground frequency vs mean predicted probability per bin, with the diagonal and the ECE."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(4, 4))
    centers = ((data.bin_edges[:-1] + data.bin_edges[1:]) / 2).tolist()
    width = float(data.bin_edges[1] - data.bin_edges[0])
    ax.bar(centers, torch.nan_to_num(data.accuracy).tolist(), width=width * 0.9, edgecolor="k", label="observed")
    ax.plot([0, 1], [0, 1], "r--", label="perfect calibration")
    ax.set(xlabel="predicted probability", ylabel="observed frequency", xlim=(0, 1), ylim=(0, 1))
    ax.set_title(f"{title} ECE = {data.ece:.3f}".strip())
    ax.legend(loc="upper left")
    return _save(plt, fig, path)
