"""Active-learning scores from diffusion-sample disagreement, and the strategy that serves the most uncertain study.

:class:`DiffusionUncertaintyScoring` runs each served bundle's ensemble on every unlabeled study and stores, in the
datastore's image info under ``"diffusion_uncertainty"``, one entry per bundle::

    {"<bundle>": {"score": 0.0123, "measure": "std", "num_samples": 4, "ensemble": "samples", "weights": "...",
                  "weights_mtime": 1732300000, "params": {...}}}

- Bundles whose ``displayable_configs`` have ``num_samples`` (a :class:`~diffseg.segmenter.DiffusionSegmenter`): one
  inference with ``num_samples`` chains batched; the score is the segmenter's ``last_uncertainty`` reduced by
  :func:`diffseg.uncertainty.image_score` (``ensemble: "samples"``).
- Bundles with only a ``seed`` (e.g. the paper-004 probe, whose features come from noised images): ``num_samples``
  inferences with seeds ``seed, seed+1, …``; the per-class probabilities of the runs form the ensemble
  (``ensemble: "seeds"``).

A study the bundle's preprocessing rejects (e.g. a 3D volume for a 2D bundle) gets ``{"score": None, "error": ...}``
and is not retried until the weights or the parameters change; any other failure stops the scoring.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monailabel.interfaces.datastore import Datastore
from monailabel.interfaces.tasks.scoring import ScoringMethod
from monailabel.interfaces.tasks.strategy import Strategy
from monailabel.tasks.infer.basic_infer import CallBackTypes

from diffseg.uncertainty import UNCERTAINTY_MEASURES, image_score, uncertainty

from .bundles import ImageRejectedError, InvalidRequestError
from .infer import DiffusionBundleInferTask

__all__ = ["INFO_KEY", "DiffusionUncertainty", "DiffusionUncertaintyScoring", "as_probabilities"]

logger = logging.getLogger(__name__)

INFO_KEY = "diffusion_uncertainty"


def as_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """Per-class scores (C, *S) as probabilities: kept if they already are (non-negative, sum 1), else softmax."""
    scores = scores.float()
    if scores.min() >= 0 and torch.allclose(scores.sum(0), torch.ones(()), atol=1e-3):
        return scores
    return scores.softmax(0)


def _names(value: str | Sequence[str] | None, default: Sequence[str]) -> list[str]:
    if value is None or value == "" or value == "all":
        return list(default)
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else list(value)
    unknown = [n for n in names if n not in default]
    if unknown:
        raise InvalidRequestError(f"unknown model(s) {unknown}; served: {list(default)}")
    return names


class DiffusionUncertaintyScoring(ScoringMethod):
    """Score every unlabeled study by the disagreement of each bundle's diffusion ensemble.

    Request parameters (``POST /scoring/diffusion_uncertainty`` JSON body): ``models`` (names or comma list; default
    every served bundle), ``num_samples`` (ensemble size, >= 2; default max(2, the bundle's own)), ``measure``
    (``"std"``: mean per-voxel std of the samples' class probabilities, or ``"entropy"`` of their mean), ``force``
    (re-score scored studies), and any other bundle ``displayable_configs`` value (e.g. ``num_inference_steps``).
    """

    def __init__(self, infers: Mapping[str, DiffusionBundleInferTask], num_samples: int = 2, measure: str = "std"):
        super().__init__("Diffusion-sample disagreement (mean per-voxel std or entropy) of each bundle's ensemble")
        self.infers = dict(infers)
        self.num_samples, self.measure = num_samples, measure

    def info(self) -> dict[str, Any]:
        return {**super().info(), "models": list(self.infers), "num_samples": self.num_samples, "measure": self.measure}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any]:
        models = _names(request.get("models"), list(self.infers))
        measure = request.get("measure", self.measure)
        if measure not in UNCERTAINTY_MEASURES:
            raise InvalidRequestError(f"measure={measure!r}; expected one of {list(UNCERTAINTY_MEASURES)}")
        force = str(request.get("force", False)).lower() in {"true", "1"}
        start, executed, skipped = time.time(), 0, 0
        for image_id in datastore.get_unlabeled_images():
            info = datastore.get_image_info(image_id)
            entries = dict(info.get(INFO_KEY) or {})
            for name in models:
                task = self.infers[name]
                params = self._params(task, request)
                fingerprint = self._fingerprint(task, params, measure)
                if not force and all(entries.get(name, {}).get(k) == v for k, v in fingerprint.items()):
                    skipped += 1
                    continue
                entries[name] = {**fingerprint, **self.score(task, info["path"], params, measure)}
                executed += 1
                logger.info(f"{INFO_KEY}: {image_id} / {name} => {entries[name]}")
            datastore.update_image_info(image_id, {INFO_KEY: entries})
        return {"executed": executed, "skipped": skipped, "models": models, "latency": round(time.time() - start, 3)}

    def _params(self, task: DiffusionBundleInferTask, request: Mapping[str, Any]) -> dict[str, Any]:
        defaults = task.sampling_defaults
        params = {k: request[k] for k in defaults if k in request}
        default_n = max(2, int(defaults.get("num_samples", self.num_samples)))
        params["num_samples"] = int(request.get("num_samples", default_n))
        if params["num_samples"] < 2:
            raise InvalidRequestError(f"num_samples={params['num_samples']}: an ensemble needs at least 2 samples")
        if "num_samples" not in defaults and "seed" not in defaults:
            raise InvalidRequestError(f"{task.name}: neither num_samples nor seed in its displayable_configs")
        return params

    @staticmethod
    def _fingerprint(task: DiffusionBundleInferTask, params: Mapping[str, Any], measure: str) -> dict[str, Any]:
        weights = task.get_path()
        return {
            "measure": measure,
            "num_samples": params["num_samples"],
            "weights": weights,
            "weights_mtime": int(os.stat(weights).st_mtime),
            "params": dict(params),
        }

    def score(self, task: DiffusionBundleInferTask, image: str, params: Mapping[str, Any], measure: str) -> dict:
        """``{"score": float, "ensemble": "samples"|"seeds"}`` or ``{"score": None, "error": str}``."""
        base = {"image": image, "skip_writer": True, "logging": "WARNING"}
        try:
            if "num_samples" in task.sampling_defaults:
                _, data = task({**base, **params})
                return {"score": data["result"]["diffusion"]["uncertainty"][measure], "ensemble": "samples"}
            runs: list[torch.Tensor] = []

            def keep_scores(data: dict) -> dict:  # after the inferer, before post-processing: (C, *S) scores
                runs.append(as_probabilities(data[task.output_label_key].detach()))
                return data

            n, seed = params["num_samples"], int(params.get("seed", task.sampling_defaults["seed"]))
            capture = {CallBackTypes.INFERER: keep_scores}
            seeded = {k: v for k, v in params.items() if k != "num_samples"}
            for i in range(n):
                task({**base, **seeded, "seed": seed + i}, callbacks=capture)
            maps = uncertainty(torch.stack(runs)[None])  # (1, N, C, *S)
            return {"score": float(image_score(maps, measure)[0]), "ensemble": "seeds"}
        except ImageRejectedError as e:  # e.g. a 3D volume for a 2D bundle: recorded, not retried
            logger.warning(f"{INFO_KEY}: {task.name} cannot score {image}: {e}")
            return {"score": None, "error": str(e)}


class DiffusionUncertainty(Strategy):
    """Next study = the unlabeled study with the highest stored disagreement score of one bundle.

    Request parameters: ``model`` (default: the app's first served bundle). Studies without a score for that model
    are not candidates; with none scored the answer is empty (run ``/scoring/diffusion_uncertainty`` first).
    """

    def __init__(self, models: Sequence[str]) -> None:
        super().__init__("Most uncertain unlabeled study: highest diffusion-sample disagreement of the chosen bundle")
        self.models = list(models)

    def info(self) -> dict[str, Any]:
        return {**super().info(), "models": self.models, "default_model": self.models[0] if self.models else None}

    def __call__(self, request: dict[str, Any], datastore: Datastore) -> dict[str, Any] | None:
        model = request.get("model") or (self.models[0] if self.models else None)
        if model not in self.models:
            raise InvalidRequestError(f"model={model!r}; served: {self.models}")
        scored = {}
        for image_id in datastore.get_unlabeled_images(request.get("label_tag"), request.get("labels")):
            entry = (datastore.get_image_info(image_id).get(INFO_KEY) or {}).get(model) or {}
            if entry.get("score") is not None:
                scored[image_id] = entry
        if not scored:
            logger.info(f"{INFO_KEY}: no unlabeled study has a {model} score yet")
            return None
        best = max(sorted(scored), key=lambda i: scored[i]["score"])
        entry = scored[best]
        return {"id": best, "model": model, "score": entry["score"], "measure": entry["measure"]}
