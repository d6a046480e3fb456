"""MONAI Label's bundle train task on a bundle's ``train.json``, writing fine-tuned weights outside the bundle.

``BundleTrainTask`` overrides ``train#dataset#data`` (the datastore's labeled studies), ``train#trainer#max_epochs``,
``device`` and ``validate#dataset#data``. This subclass also points ``ckpt_dir`` (and ``ckpt_name`` where a bundle
has it) at the app's fine-tune folder, so the shipped ``models/model.pt`` is never overwritten; the infer task
serves the fine-tuned file once it exists. Training starts from the latest weights (fine-tuned, else shipped).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from monai.handlers import CheckpointLoader
from monailabel.tasks.train.bundle import BundleTrainTask

from diffseg.bundles import bundle_imports

__all__ = ["DiffusionBundleTrainTask"]

WEIGHTS_NAME = "model.pt"
LOADER_DESC = "monailabel_app: start from the latest whole-network weights"


class DiffusionBundleTrainTask(BundleTrainTask):
    """Fine-tune a bundle from its ``train.json`` on the datastore's labels.

    Args:
        path: the bundle folder.
        conf: the app's ``--conf`` pairs.
        output_dir: where ``model.pt`` (plain state_dict, ``save_final``) and the run's files go.
    """

    def __init__(self, path: str, conf: dict[str, str], output_dir: str | os.PathLike[str], **kwargs: Any) -> None:
        super().__init__(path, conf, **kwargs)
        self.output_dir = Path(output_dir)

    @property
    def finetuned(self) -> Path:
        return self.output_dir / WEIGHTS_NAME

    def config(self) -> dict[str, Any]:
        options = super().config()
        options.pop("model_filename", None)  # start weights: the fine-tuned file if any, else models/model.pt
        options.update(max_epochs=1, multi_gpu=False)
        return options

    def __call__(self, request: dict[str, Any], datastore: Any) -> dict[str, Any]:
        """Train; options missing from the request take the defaults of :meth:`config` (as clients send them).

        An empty ``run_id`` (the option's default) means the bundle's ``run`` (``monai.bundle.run(run_id="")``
        would evaluate the whole config, including the bundle's own dataset list).
        """
        merged = {**self.config(), **request}
        merged["run_id"] = merged.get("run_id") or "run"
        return super().__call__(merged, datastore)

    def _load_checkpoint(self, model_pytorch: str, pretrained: bool, train_handlers: list) -> None:
        """Load the latest whole-network weights first (a bundle's own loaders, e.g. of a backbone, are kept)."""
        if not pretrained:
            return
        path = str(self.finetuned if self.finetuned.is_file() else Path(self.bundle_path) / "models" / WEIGHTS_NAME)
        # entries are handler configs or references to shared ones ("@clock", "@ema")
        train_handlers[:] = [h for h in train_handlers if not (isinstance(h, dict) and h.get("_desc_") == LOADER_DESC)]
        train_handlers.insert(
            0,
            {
                "_target_": CheckpointLoader.__name__,
                "_desc_": LOADER_DESC,
                "load_path": path,
                "load_dict": {self.model_dict_key: f"$@{self.const.key_network()}"},
                "map_location": "cpu",
                "strict": True,
            },
        )

    def _update_overrides(self, overrides: dict[str, Any]) -> dict[str, Any]:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        overrides["ckpt_dir"] = str(self.output_dir)
        overrides["output_dir"] = str(self.output_dir / "eval")
        if self.bundle_config.get("ckpt_name") is not None:
            overrides["ckpt_name"] = WEIGHTS_NAME
        return overrides

    def run_single_gpu(self, request: dict[str, Any], overrides: dict[str, Any]) -> None:
        with bundle_imports(self.bundle_path):
            super().run_single_gpu(request, overrides)
