"""MONAI Label app serving the project's diffusion bundles (``bundles/*``) with diffusion-uncertainty active learning.

Start (in the environment of ``requirements-monailabel.txt``, from the repository root)::

    monailabel start_server --app scripts/monailabel_app --studies <folder> --conf models <names|all>

``--conf`` keys: ``models`` (comma-separated bundle folder names, or ``all``, the default; unknown names are an
error — nothing is looked up in the model zoo), ``bundles`` (the bundles folder; default ``<repo>/bundles``),
``finetune_dir`` (fine-tuned weights; default ``<studies>/.diffseg_finetune``), ``scoring_samples`` (default
ensemble size of the scoring, 2), ``scoring_measure`` (``std`` or ``entropy``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import monailabel
from fastapi import HTTPException
from lib.bundles import InvalidRequestError, check_readable, discover_bundles, select_bundles
from lib.infer import DiffusionBundleInferTask
from lib.scoring import DiffusionUncertainty, DiffusionUncertaintyScoring
from lib.train import DiffusionBundleTrainTask
from monailabel.config import settings
from monailabel.datastore.local import LocalDatastore
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.datastore import Datastore
from monailabel.tasks.activelearning.random import Random

logger = logging.getLogger(__name__)


class CheckedLocalDatastore(LocalDatastore):
    """``LocalDatastore`` that refuses an upload MONAI cannot read (HTTP 422) instead of storing a broken study."""

    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        try:
            check_readable(image_filename)
        except InvalidRequestError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e
        return super().add_image(image_id, image_filename, image_info)


class DiffSegApp(MONAILabelApp):
    """Every selected bundle gets an infer task, a train task and a disagreement score; one strategy ranks them."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]) -> None:
        root = Path(app_dir).resolve().parents[1]
        available = discover_bundles(conf.get("bundles") or root / "bundles")
        self.bundles = select_bundles(available, conf.get("models"))
        self.finetune_dir = Path(conf.get("finetune_dir") or Path(studies) / ".diffseg_finetune")
        logger.info(f"Bundles served: {list(self.bundles)} (available: {list(available)})")
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MONAI DiffSeg",
            description="Diffusion-model segmentation bundles with diffusion-uncertainty active learning",
            version=monailabel.__version__,
        )

    def init_datastore(self) -> Datastore:
        if self.studies.startswith(("http://", "https://")):
            return super().init_datastore()
        return CheckedLocalDatastore(
            self.studies,
            extensions=settings.MONAI_LABEL_DATASTORE_FILE_EXT,
            auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
            read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
        )

    def init_infers(self) -> dict[str, DiffusionBundleInferTask]:
        infers = {}
        for name, path in self.bundles.items():
            task = DiffusionBundleInferTask(str(path), self.conf, finetuned=str(self.finetune_dir / name / "model.pt"))
            if task.is_valid():
                infers[name] = task
            else:
                logger.warning(f"Bundle {name} is not servable by MONAI Label (see the warnings above); skipped")
        return infers

    def init_trainers(self) -> dict[str, DiffusionBundleTrainTask]:
        trainers = {}
        for name in self._infers:
            task = DiffusionBundleTrainTask(str(self.bundles[name]), self.conf, output_dir=self.finetune_dir / name)
            if task.is_valid():
                trainers[name] = task
        return trainers

    def init_scoring_methods(self) -> dict[str, DiffusionUncertaintyScoring]:
        samples = int(self.conf.get("scoring_samples", 2))
        measure = self.conf.get("scoring_measure", "std")
        return {"diffusion_uncertainty": DiffusionUncertaintyScoring(self._infers, samples, measure)}

    def init_strategies(self) -> dict[str, Any]:
        return {"diffusion_uncertainty": DiffusionUncertainty(list(self._infers)), "random": Random()}

    def infer(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        """MONAI Label's infer with client errors as 4xx: unknown model / image id (404), bad image or knob (422)."""
        model, image = request.get("model"), request.get("image")
        if model not in self._infers:
            raise HTTPException(status_code=404, detail=f"model {model!r} not served; served: {list(self._infers)}")
        if isinstance(image, str):
            if os.path.exists(image):  # an uploaded file (POST /infer with `file`)
                self._check_upload(image)
            elif not (datastore or self.datastore()).get_image_uri(image):
                raise HTTPException(status_code=404, detail=f"image {image!r} is not in the datastore")
        try:
            return super().infer(request, datastore)
        except InvalidRequestError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e

    def scoring(self, request: dict[str, Any], datastore: Datastore | None = None) -> dict[str, Any]:
        try:
            return super().scoring(request, datastore)
        except InvalidRequestError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e

    def next_sample(self, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return super().next_sample(request)
        except InvalidRequestError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e

    @staticmethod
    def _check_upload(path: str) -> None:
        try:
            check_readable(path)
        except InvalidRequestError as e:
            raise HTTPException(status_code=422, detail=str(e)) from e
