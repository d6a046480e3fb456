"""MONAI Label's bundle infer task, with the bundle's sampling knobs reaching the network on every request.

MONAI Label 0.8.5's ``BundleInferTask`` re-parses ``displayable_configs`` per request, but builds ``network_def`` once
at start-up and caches it, so a request's ``num_inference_steps`` / ``num_samples`` / ``seed`` (constructor arguments
of the segmenter) would silently be ignored. :class:`DiffusionBundleInferTask` builds ``network_def`` from the
request's configs, loads the plain ``models/model.pt`` state_dict into it (``torch.load(weights_only=True)``), and
reports in the result JSON what the network actually ran with and how much its samples disagreed. Its config parser
also reads the bundle's ``metadata.json`` (as ``monai.bundle run`` does; 0.8.5's does not), so ``@_meta_#…``
references of ``inference.json`` (the overlay's class names) resolve.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from typing import Any

import torch
from monai.bundle import ConfigParser
from monailabel.tasks.infer.bundle import BundleInferTask

from diffseg.bundles import bundle_imports
from diffseg.uncertainty import UNCERTAINTY_MEASURES, Uncertainty, image_score

from .bundles import ImageRejectedError, InvalidRequestError

__all__ = ["DiffusionBundleInferTask", "RenameKey", "UncertaintyRecorder", "coerce_configs"]

logger = logging.getLogger(__name__)

_TRUE, _FALSE = {"true", "1", "yes"}, {"false", "0", "no"}


def _coerce(key: str, default: Any, value: Any) -> Any:
    if isinstance(default, bool):
        text = str(value).strip().lower()
        if isinstance(value, bool) or text in _TRUE | _FALSE:
            return value if isinstance(value, bool) else text in _TRUE
    elif isinstance(default, int):
        number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
        if number is not None and number.is_integer() and number >= (1 if default > 0 else 0):
            return int(number)
    elif isinstance(default, float):
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        return str(value)
    else:
        return value
    raise InvalidRequestError(f"{key}={value!r}: expected {type(default).__name__} like the default {default!r}")


def coerce_configs(defaults: Mapping[str, Any], request: Mapping[str, Any]) -> dict[str, Any]:
    """Request values of the bundle's ``displayable_configs`` converted to the defaults' types.

    Integers must be >= 0, and >= 1 when the default is positive (steps, samples, batch sizes; a seed may be 0).

    Raises:
        InvalidRequestError: a value of the wrong type or range (the app answers 422).
    """
    out = {}
    for key, default in defaults.items():
        if key in request:
            try:
                out[key] = _coerce(key, default, request[key])
            except ValueError as e:
                raise InvalidRequestError(f"{key}={request[key]!r}: {e}") from e
    return out


class RenameKey:
    """Move ``data[src]`` to ``data[dst]`` (if present): a transform around steps that must not see a key."""

    def __init__(self, src: str, dst: str) -> None:
        self.src, self.dst = src, dst

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        if self.src in d:
            d[self.dst] = d.pop(self.src)
        return d


class Squeeze2DLabel:
    """(1, H, W) → (H, W) for a 2D image's label: MONAI Label's writer gives a 3-axis array a 3D affine."""

    def __init__(self, label: str, image: str) -> None:
        self.label, self.image = label, image

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        label, image = d.get(self.label), d.get(self.image)
        if label is not None and image is not None and image.ndim == 3 and label.ndim == 3 and label.shape[0] == 1:
            d[self.label] = label[0]
        return d


# MONAI 1.6.1's Spacingd/Orientationd call ``d[k].update(meta)`` on every ``image_*`` entry of a NIfTI's data dict,
# and MONAI Label puts the string ``image_path`` there (AttributeError): it is stashed for the bundle's transforms.
_STASH = ("image_path", "_stashed_image_path")


class UncertaintyRecorder:
    """Per-image disagreement of a :class:`~diffseg.segmenter.DiffusionSegmenter` over one inference.

    Inferers that call the segmenter per window or per slice batch (MONAI's sliding-window / slice inferers) each
    leave the uncertainty of their part in ``last_uncertainty``: a forward hook averages the parts' scores weighted
    by their voxel counts. :class:`~diffseg.sliding.WindowConsistentInferer` samples the whole image in one call
    (no forward call) and leaves the whole image's uncertainty, which is then used as is.
    """

    def __init__(self, network: torch.nn.Module) -> None:
        self.network = network
        self.sums = dict.fromkeys(UNCERTAINTY_MEASURES, 0.0)
        self.voxels = 0
        self._handle = network.register_forward_hook(self._hook) if hasattr(network, "last_uncertainty") else None

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        maps: Uncertainty | None = module.last_uncertainty
        if maps is None:
            return
        voxels = maps.entropy[0].numel()  # per image of the batch
        for measure in self.sums:
            self.sums[measure] += float(image_score(maps, measure).sum()) * voxels
        self.voxels += voxels * maps.entropy.shape[0]

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def scores(self) -> dict[str, float] | None:
        """Mean per-voxel ``std`` (class-averaged, across samples) and ``entropy`` (of the mean), or None."""
        if self.voxels:
            return {m: s / self.voxels for m, s in self.sums.items()}
        maps = getattr(self.network, "last_uncertainty", None)
        if maps is None:
            return None
        return {m: float(image_score(maps, m).mean()) for m in self.sums}


class DiffusionBundleInferTask(BundleInferTask):
    """``BundleInferTask`` for a diffusion bundle: per-request sampling knobs, fine-tuned weights, uncertainty.

    Args:
        path: the bundle folder (``configs/inference.json``, ``configs/metadata.json``, ``models/model.pt``).
        conf: the app's ``--conf`` pairs.
        finetuned: weights written by the app's training task; used instead of ``models/model.pt`` once they exist.
        kwargs: ``BundleInferTask`` arguments.

    The result JSON of every inference has ``"diffusion"``: the bundle, the weights file, the sampling values read
    back from the network that ran (``sampling``), and ``uncertainty`` (mean per-voxel ``std`` / ``entropy`` of the
    ensemble in the preprocessed image space; None for a network without ``last_uncertainty``).
    """

    def __init__(self, path: str, conf: dict[str, str], finetuned: str | None = None, **kwargs: Any) -> None:
        self.name = os.path.basename(path)
        with bundle_imports(path) as root:
            super().__init__(str(root), conf, **kwargs)
        self._local = threading.local()
        if not self.valid:
            return
        if finetuned:
            self.path = [*self.path, finetuned]  # BasicInferTask.get_path: the last existing file wins
        self._config.pop("model_filename", None)  # other models/*.pt are parts (backbone, autoencoder), not choices
        self.sampling_defaults: dict[str, Any] = dict(getattr(self, "displayable_configs", None) or {})

    def _load_bundle_config(self, path: str, config: str) -> ConfigParser:
        """``BundleInferTask``'s parser plus the bundle's metadata under ``_meta_``."""
        parser = super()._load_bundle_config(path, config)
        parser.read_meta(os.path.join(path, "configs", self.const.metadata_json()))
        return parser

    def pre_transforms(self, data: dict[str, Any] | None = None) -> list:
        if data is not None:
            data.update(coerce_configs(self.sampling_defaults, data))
        with bundle_imports(self.bundle_path):
            return [RenameKey(*_STASH), *super().pre_transforms(data)]

    def run_pre_transforms(self, data: dict[str, Any], transforms: list) -> dict[str, Any]:
        """The bundle's input handling; an image it cannot load or take (dimensions, channels, NaN) is a 422."""
        try:
            return super().run_pre_transforms(data, transforms)
        except Exception as e:
            raise ImageRejectedError(f"{self.name} cannot take this image: {type(e).__name__}: {e}") from e

    def inferer(self, data: dict[str, Any] | None = None):
        with bundle_imports(self.bundle_path):
            return super().inferer(data)

    def post_transforms(self, data: dict[str, Any] | None = None) -> list:
        with bundle_imports(self.bundle_path):
            post = super().post_transforms(data)
        return [*post, Squeeze2DLabel(self.key_pred, self.key_image), RenameKey(*reversed(_STASH))]

    def _get_network(self, device: str, data: dict[str, Any] | None) -> torch.nn.Module:
        """``network_def`` as configured by this request (``pre_transforms`` re-parsed it) with the latest weights."""
        path = self.get_path()
        with bundle_imports(self.bundle_path):
            network = self.bundle_config.get_parsed_content(self.const.key_network_def(), instantiate=True)
        state = torch.load(path, map_location="cpu", weights_only=True)
        network.load_state_dict(state.get(self.model_state_dict, state), strict=True)
        network = network.to(torch.device(device)).eval()
        self._local.network, self._local.path = network, path
        self._local.recorder = UncertaintyRecorder(network)
        return network

    def run_inferer(self, data: dict[str, Any], convert_to_batch: bool = True, device: str = "cuda") -> dict:
        try:
            data = super().run_inferer(data, convert_to_batch=convert_to_batch, device=device)
        finally:
            recorder = getattr(self._local, "recorder", None)
            if recorder is not None:
                recorder.close()
        network = self._local.network
        result = dict(data.get(self.output_json_key) or {})
        result["diffusion"] = {
            "bundle": self.name,
            "weights": self._local.path,
            "sampling": {k: getattr(network, k) for k in self.sampling_defaults if hasattr(network, k)},
            "uncertainty": recorder.scores(),
        }
        data[self.output_json_key] = result
        return data
