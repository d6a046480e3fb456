"""Seed stability (SDSeg Table 5): run the validation evaluator once per seed and compare the runs.

Per image, over all pairs of seeds: Dice agreement of the label maps, PSNR and SSIM of the foreground score maps
(:func:`diffseg.metrics.seed_stability`) and MS-SSIM of the score maps slice by slice (MONAI
``MultiScaleSSIMMetric``, 2D). Also the Dice against the reference label of every run. Writes ``stability.json``.
"""

from __future__ import annotations

import json
import statistics
from itertools import combinations
from pathlib import Path

import torch
from diffseg.metrics import seed_stability
from monai.engines import SupervisedEvaluator
from monai.metrics import MultiScaleSSIMMetric
from monai.utils import convert_to_tensor

__all__ = ["SeedStability", "ms_ssim_slices"]

_MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003


def ms_ssim_slices(a: torch.Tensor, b: torch.Tensor, scales: int = 3, kernel_size: int = 7) -> float:
    """Mean 2D MS-SSIM over the slices of two score maps (1, H, W[, D]) in [0, 1] (``scales`` ≤ 5 levels)."""
    if a.ndim == 4:  # (1, H, W, D) → (D, 1, H, W)
        a, b = a.permute(3, 0, 1, 2), b.permute(3, 0, 1, 2)
    else:
        a, b = a[None], b[None]
    weights = _MS_SSIM_WEIGHTS[:scales]
    weights = tuple(w / sum(weights) for w in weights)
    metric = MultiScaleSSIMMetric(spatial_dims=2, data_range=1.0, kernel_size=kernel_size, weights=weights)
    return float(metric(a.float(), b.float()).mean())


class SeedStability:
    """Repeated evaluation with different seeds.

    Args:
        evaluator: the validation ``SupervisedEvaluator``; its postprocessing must keep the scores as ``probs``
            (B=1 per image) and its key metric is reported per seed.
        segmenter: the ``DiffusionSegmenter`` whose ``seed`` is set before each run.
        seeds: at least 2.
        output_dir: where ``stability.json`` goes.
        ms_ssim_scales: MS-SSIM levels (3 fits slices ≥ 64²).
    """

    def __init__(
        self,
        evaluator: SupervisedEvaluator,
        segmenter: torch.nn.Module,
        seeds: list[int],
        output_dir: str,
        ms_ssim_scales: int = 3,
    ) -> None:
        if len(seeds) < 2:
            raise ValueError(f"stability needs at least 2 seeds, got {seeds}")
        self.evaluator, self.segmenter, self.seeds = evaluator, segmenter, list(seeds)
        self.output_dir, self.ms_ssim_scales = Path(output_dir), ms_ssim_scales

    def run(self) -> dict:
        """Evaluate once per seed; returns (and writes) the summary."""
        from ignite.engine import Events

        runs: list[list[torch.Tensor]] = []
        current: list[torch.Tensor] = []

        def collect(engine) -> None:
            for item in engine.state.output:
                current.append(convert_to_tensor(item["probs"], track_meta=False).detach().cpu())

        self.evaluator.add_event_handler(Events.ITERATION_COMPLETED, collect)
        dice_vs_label = []
        for seed in self.seeds:
            self.segmenter.seed = seed
            current.clear()
            self.evaluator.run()
            runs.append(list(current))
            state = self.evaluator.state
            dice_vs_label.append(float(state.metrics[state.key_metric_name]))
        per_image = []
        for i in range(len(runs[0])):
            maps = [run[i][None] for run in runs]  # (1, C, *S) per seed
            agreement = seed_stability(maps)
            ms = [ms_ssim_slices(a[0, 1:], b[0, 1:], self.ms_ssim_scales) for a, b in combinations(maps, 2)]
            per_image.append({**agreement._asdict(), "ms_ssim": sum(ms) / len(ms)})
        summary = {
            "seeds": self.seeds,
            "num_inference_steps": getattr(self.segmenter, "num_inference_steps", None),
            "dice_vs_label_per_seed": dice_vs_label,
            "dice_vs_label_mean": statistics.fmean(dice_vs_label),
            "dice_vs_label_std": statistics.pstdev(dice_vs_label),
            "per_image": per_image,
            **{k: statistics.fmean(img[k] for img in per_image) for k in ("dice", "psnr", "ssim", "ms_ssim")},
        }
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "stability.json").write_text(json.dumps(summary, indent=4) + "\n")
        return summary
