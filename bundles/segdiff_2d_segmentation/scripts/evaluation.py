"""Evaluation handler: ECE (10 right-closed bins, diffseg.metrics) and reliability-diagram data, written as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from diffseg.metrics import expected_calibration_error, reliability_data
from monai.utils import min_version, optional_import

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")

__all__ = ["CalibrationReport"]


def _nan_to_none(values: torch.Tensor) -> list[float | None]:
    """JSON-safe list: NaN (empty bins) → None."""
    return [None if v != v else float(v) for v in values.tolist()]


def _label_map(label: torch.Tensor) -> torch.Tensor:
    """(1, *S) label map or (C, *S) one-hot → (1, *S) label map."""
    return label.argmax(dim=0, keepdim=True) if label.shape[0] > 1 else label


class CalibrationReport:
    """Collects foreground probabilities and labels of every evaluated image; at the end stores the mean per-image
    ECE in ``engine.state.metrics[metric_name]`` and writes ``output_dir/filename`` with all metrics of the run,
    ``info`` (e.g. the ensemble size) and the pooled reliability-diagram data (per bin: mean probability, observed
    foreground frequency, pixel count).

    Args:
        output_dir: folder of the JSON report.
        prob_key: post-processed key holding the probabilities (2, *S) (background, foreground).
        label_key: key holding the ground truth, label map (1, *S) or one-hot (2, *S).
        num_bins: equal-width bins ((m-1)/M, m/M].
        filename: report name.
        metric_name: name of the ECE in ``engine.state.metrics``.
        info: extra entries copied into the report.
    """

    def __init__(
        self,
        output_dir: str,
        prob_key: str = "prob",
        label_key: str = "label",
        num_bins: int = 10,
        filename: str = "calibration.json",
        metric_name: str = "ece",
        info: dict[str, Any] | None = None,
    ) -> None:
        self.output_dir, self.prob_key, self.label_key = output_dir, prob_key, label_key
        self.num_bins, self.filename, self.metric_name = num_bins, filename, metric_name
        self.info = dict(info or {})
        self._fg: list[torch.Tensor] = []
        self._gt: list[torch.Tensor] = []
        self._ece: list[float] = []

    def attach(self, engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self.reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self.compute)
        engine.add_event_handler(Events.COMPLETED, self.write)

    def reset(self, engine=None) -> None:
        self._fg, self._gt, self._ece = [], [], []

    def collect(self, engine) -> None:
        items = engine.state.output if isinstance(engine.state.output, list) else [engine.state.output]
        for item in items:
            probs = torch.as_tensor(item[self.prob_key]).detach().float().cpu()
            gt = _label_map(torch.as_tensor(item[self.label_key]).detach().cpu())
            self._ece.append(float(expected_calibration_error(probs[None], gt[None], self.num_bins)[0]))
            self._fg.append(probs[1].reshape(-1))
            self._gt.append(gt.reshape(-1))

    def compute(self, engine) -> None:
        if self._ece:
            engine.state.metrics[self.metric_name] = sum(self._ece) / len(self._ece)

    def write(self, engine) -> None:
        if not self._fg:
            return
        fg, gt = torch.cat(self._fg), torch.cat(self._gt)
        pooled = reliability_data(torch.stack([1 - fg, fg])[None], gt[None, None], self.num_bins)
        report = {
            **self.info,
            "images": len(self._ece),
            "metrics": {k: float(v) for k, v in engine.state.metrics.items() if isinstance(v, (int, float))},
            "ece_per_image": self._ece,
            "reliability": {
                "bin_edges": pooled.bin_edges.tolist(),
                "mean_probability": _nan_to_none(pooled.confidence),
                "foreground_frequency": _nan_to_none(pooled.accuracy),
                "pixels": pooled.counts.tolist(),
                "pooled_ece": pooled.ece,
            },
        }
        path = Path(self.output_dir) / self.filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=4) + "\n")
