"""Folder inference with a bundle's own ``configs/inference.json``: the engine of ``scripts/segment.py``.

:func:`load_bundle` parses the bundle's ``preprocessing``, ``network`` (+ the ``ckpt_path`` weights), ``inferer``
and ``postprocessing`` with MONAI's ``ConfigParser`` (settings overridden through ``displayable_configs`` ids), so a
case segmented here equals the same case run by ``python -m monai.bundle run``. Only the bundle's ``SaveImaged``
and ``SaveOverlayd`` steps are taken out of ``postprocessing``: the writers are called here with temporary file
names.

:func:`segment_folder` runs the cases of :func:`diffseg.discovery.discover`:

- **pipelined**: the next case is read and preprocessed in a background thread while the current one is sampled,
  and the previous case's files are written in another;
- **robust**: a failing case becomes a ``"failed"`` manifest entry with the reason and the batch goes on; every
  output is written to a temporary name in the case folder and renamed (``os.replace``) when complete, and the
  manifest entry is written after the outputs, so after ``kill -9`` a file at a final name is always complete; a
  DICOM instance the series reader cannot decode (or silently drops) fails its series, naming the file;
- **accounted**: the manifest's ``files_found`` input files are each counted in one entry's ``files`` or listed in
  ``skipped_files`` with the reason (:func:`diffseg.discovery.scan`);
- **resumable**: with ``resume=True`` a case is skipped when the manifest says ``"ok"`` and its outputs exist;
- **sharded**: under ``torchrun`` (``WORLD_SIZE`` > 1) rank r takes cases r, r + N, …, writes
  ``manifest.rank<r>.json``, and rank 0 merges them into ``manifest.json`` after a barrier.

Outputs per case in ``<output>/<case id>/``: ``seg.nii.gz`` (uint8 labels, original geometry), ``seg.dcm`` (DICOM
SEG, DICOM inputs), ``rtstruct.dcm`` (RT Structure Set, DICOM inputs), ``uncertainty.nii.gz``, ``overlay.png``,
``statistics.json`` (``statistics=True``; ``<output>/statistics.csv`` over all cases); the overlay is drawn by
:mod:`diffseg.overlay`, files are written with :func:`diffseg.io.atomic_path`. With an ensemble (≥ 2 samples)
and an uncertainty map each entry gets ``qc``: the disagreement inside the predicted foreground and the review flag
(:func:`diffseg.reports.review_flag`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, SaveImaged
from tqdm.auto import tqdm

from diffseg.bundles import bundle_imports, bundle_parser
from diffseg.discovery import Case, pixel_data_problem, scan, unique_ids
from diffseg.io import CheckImaged, as_numpy, atomic_path
from diffseg.overlay import SaveOverlayd, class_rgb, radiological, save_overlay
from diffseg.reports import review_flag, structure_statistics, write_statistics_csv

__all__ = [
    "FORMATS",
    "RUNTIMES",
    "BundleModel",
    "dist_info",
    "exit_code",
    "load_bundle",
    "read_manifest",
    "read_manifest_file",
    "segment_folder",
]

logger = logging.getLogger(__name__)

FORMATS = ("nifti", "dicom_seg", "rtstruct", "uncertainty", "png")
RUNTIMES = ("torch", "onnxruntime")
SETTINGS = {"steps": "num_inference_steps", "samples": "num_samples", "seed": "seed"}
MANIFEST = "manifest.json"


@dataclass
class BundleModel:
    """A bundle's inference components, parsed from its configs (see :func:`load_bundle`)."""

    root: Path
    name: str
    version: str
    spatial_dims: int
    classes: dict[int, str]
    image_meta: dict[str, Any]  # metadata network_data_format.inputs.image (num_channels, spatial_shape, ...)
    image_key: str
    preprocessing: Compose
    raw_end: int  # preprocessing[:raw_end] reads the image (original geometry, channel first)
    network: torch.nn.Module
    inferer: Callable
    postprocessing: Compose  # the bundle's postprocessing without its SaveImaged steps
    savers: dict[str, Any]  # key ("pred", "uncertainty") → the bundle's SaveImage writer
    device: torch.device
    settings: dict[str, Any] = field(default_factory=dict)
    uncertainty_measure: str | None = None  # the measure of out["uncertainty"] ("std" / "entropy") when it is on
    qc_threshold: float | None = None  # review flag: disagreement inside the foreground above this


def _split_savers(post: Compose) -> tuple[Compose, dict[str, Any]]:
    kept, savers = [], {}
    for t in post.transforms:
        if isinstance(t, SaveImaged):
            for key in t.keys:
                savers[key] = t.saver
        elif not isinstance(t, SaveOverlayd):  # the folder CLI draws its own overlay.png
            kept.append(t)
    return Compose(kept), savers


def _raw_end(pre: Compose) -> int:
    """Index after the last leading read step (LoadImaged, EnsureChannelFirstd)."""
    end = 0
    for i, t in enumerate(pre.transforms):
        if isinstance(t, (LoadImaged, EnsureChannelFirstd)):
            end = i + 1
        else:
            break
    return end


def _spatial_dims(pre: Compose, meta: Mapping[str, Any]) -> int:
    for t in pre.transforms:
        if isinstance(t, CheckImaged):
            return int(t.spatial_dims)
    return len(meta["network_data_format"]["inputs"]["image"]["spatial_shape"])


def load_bundle(
    bundle: str | os.PathLike[str],
    device: str = "cpu",
    steps: int | None = None,
    samples: int | None = None,
    seed: int | None = None,
    uncertainty: bool | None = False,
    overrides: Mapping[str, Any] | None = None,
    configs: Sequence[str] = ("inference.json",),
    load_weights: bool = True,
    qc_threshold: float | None = None,
) -> BundleModel:
    """Parse a bundle's inference components and load its weights.

    Args:
        bundle: bundle folder (``configs/inference.json``, ``configs/metadata.json``, ``models/model.pt``).
        device: torch device string.
        steps, samples, seed: overrides of ``displayable_configs#num_inference_steps`` / ``#num_samples`` /
            ``#seed`` (None keeps the bundle's value; a bundle without such a setting raises ValueError).
        uncertainty: switch the bundle's ``save_uncertainty`` on (True: ValueError when it has none; None: when it
            has one, for statistics and the review flag).
        overrides: more config ids → values (e.g. a smaller network and its ``ckpt_path`` for tests).
        configs: config files merged in order.
        load_weights: load ``ckpt_path`` (False keeps the parsed initialisation).
        qc_threshold: the review flag's threshold (None: the bundle's ``qc_threshold`` in metadata.json or the
            config, for its ``uncertainty_measure``: a number, or a mapping measure → number).
    """
    root = Path(bundle).resolve()
    if not (root / "configs" / "inference.json").is_file():
        raise FileNotFoundError(f"{root} is not a bundle with configs/inference.json")
    parser = bundle_parser(root, configs)
    displayable = parser.get("displayable_configs") or {}
    update: dict[str, Any] = {"device": f"$torch.device('{device}')"}
    asked = {"steps": steps, "samples": samples, "seed": seed}
    for option, value in asked.items():
        if value is None:
            continue
        if SETTINGS[option] not in displayable:
            raise ValueError(
                f"bundle {root.name} has no displayable_configs#{SETTINGS[option]} (--{option}); "
                f"its settings: {sorted(displayable)}"
            )
        update[f"displayable_configs#{SETTINGS[option]}"] = int(value)
    has_uncertainty = "save_uncertainty" in parser.config
    if uncertainty and not has_uncertainty:
        raise ValueError(f"bundle {root.name} has no save_uncertainty setting: it cannot write uncertainty maps")
    if has_uncertainty and uncertainty is not False:
        update["save_uncertainty"] = True
    for key, value in {"output_ext": ".nii.gz", "output_dir": tempfile.gettempdir()}.items():
        if key in parser.config:
            update[key] = value
    update.update(overrides or {})
    parser.update(update)
    meta = parser.get("_meta_")
    with bundle_imports(root):
        if "initialize" in parser.config:
            parser.get_parsed_content("initialize")  # e.g. set_determinism, as `monai.bundle run` does
        pre = parser.get_parsed_content("preprocessing")
        network = parser.get_parsed_content("network")
        inferer = parser.get_parsed_content("inferer")
        post, savers = _split_savers(parser.get_parsed_content("postprocessing"))
        ckpt = parser.get_parsed_content("ckpt_path") if "ckpt_path" in parser.config else None
    torch_device = torch.device(device)
    if load_weights and ckpt is not None:
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"checkpoint {ckpt} not found (bundle {root.name}, id ckpt_path)")
        state = torch.load(ckpt, map_location=torch_device, weights_only=True)
        state = state["model"] if isinstance(state.get("model"), dict) else state  # CheckpointLoader's layouts
        network.load_state_dict(state)
    network.eval()
    channel_def = meta["network_data_format"]["outputs"]["pred"].get("channel_def", {})
    settings = {"device": device, **{SETTINGS[k]: displayable.get(SETTINGS[k]) for k in SETTINGS}}
    settings.update({SETTINGS[k]: int(v) for k, v in asked.items() if v is not None})
    measure = str(parser.get("uncertainty_measure", "std")) if parser.get("save_uncertainty") else None
    if qc_threshold is None:
        qc_threshold = meta.get("qc_threshold", parser.get("qc_threshold"))
        qc_threshold = qc_threshold.get(measure) if isinstance(qc_threshold, Mapping) else qc_threshold
    return BundleModel(
        root=root,
        name=root.name,
        version=str(meta.get("version", "")),
        spatial_dims=_spatial_dims(pre, meta),
        classes={int(k): str(v) for k, v in channel_def.items()},
        image_meta=dict(meta["network_data_format"]["inputs"]["image"]),
        image_key=str(parser.get("image_key", "image")),
        preprocessing=pre,
        raw_end=_raw_end(pre),
        network=network,
        inferer=inferer,
        postprocessing=post,
        savers=savers,
        device=torch_device,
        settings=settings,
        uncertainty_measure=measure,
        qc_threshold=None if qc_threshold is None else float(qc_threshold),
    )


def use_onnxruntime(model: BundleModel, onnx_path: str | os.PathLike[str] | None, cache: Path) -> Path:
    """Run the segmenter's denoiser through ONNX Runtime; export it to ``cache`` first when no file is given (the
    cached file's name carries a digest of the weights, so other weights are never served by a stale graph)."""
    from diffseg.export import OrtDenoiser, export_denoiser

    net = model.network
    if not hasattr(net, "denoiser") or not hasattr(net, "codec"):
        raise ValueError(f"runtime onnxruntime needs a DiffusionSegmenter network; {model.name} has {type(net)}")
    if onnx_path is None:
        weights = hashlib.sha1(usedforsecurity=False)
        for tensor in net.denoiser.state_dict().values():
            weights.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        onnx_path = cache / f"{model.name}-denoiser-{weights.hexdigest()[:12]}.onnx"
        if not onnx_path.is_file():
            export_denoiser(net, model.image_meta, onnx_path)
    net.denoiser = OrtDenoiser(net.denoiser, onnx_path, device=str(model.device))
    return Path(onnx_path)


# ---- the manifest --------------------------------------------------------------------------------------------------


def _write_json(path: Path, payload: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(payload, indent=4) + "\n")


def read_manifest(output: str | os.PathLike[str]) -> dict[str, dict]:
    """Entries (id → entry) of ``manifest.json`` and of any per-rank manifests left in ``output``."""
    entries: dict[str, dict] = {}
    for path in [Path(output) / MANIFEST, *sorted(Path(output).glob("manifest.rank*.json"))]:
        if path.is_file():
            with contextlib.suppress(json.JSONDecodeError):
                entries.update({e["id"]: e for e in json.loads(path.read_text()).get("cases", [])})
    return entries


OUTPUT_FILES = {  # format → file name (DICOM formats: DICOM cases only)
    "nifti": "seg.nii.gz",
    "dicom_seg": "seg.dcm",
    "rtstruct": "rtstruct.dcm",
    "uncertainty": "uncertainty.nii.gz",
    "png": "overlay.png",
    "statistics": "statistics.json",
}
NO_RTSTRUCT = "no rtstruct.dcm: "


def _complete(entry: dict | None, output: Path, case: Case, wanted: Sequence[str]) -> bool:
    """An ``ok`` entry whose files all exist and that has every output of ``wanted`` (formats + ``statistics``)."""
    if not entry or entry.get("status") != "ok" or not all((output / p).is_file() for p in entry["outputs"]):
        return False
    wanted = [w for w in wanted if case.kind == "dicom" or w not in ("dicom_seg", "rtstruct")]
    if "rtstruct" in wanted and any(n.startswith(NO_RTSTRUCT) for n in entry.get("notes", [])):
        wanted.remove("rtstruct")  # an empty label has no RT Structure Set
    return all(f"{case.id}/{OUTPUT_FILES[w]}" in entry["outputs"] for w in wanted)


def exit_code(manifest: Mapping[str, Any]) -> int:
    """0 when every case is ``"ok"`` or ``"skipped"``, else 1."""
    return 0 if all(c["status"] in ("ok", "skipped") for c in manifest["cases"]) else 1


def dist_info() -> tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else from torchrun's environment."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


# ---- one case -----------------------------------------------------------------------------------------------------
@dataclass
class _Loaded:
    data: dict | None = None
    raw: Any = None
    error: str = ""
    seconds: float = 0.0
    workdir: Path | None = None


def _load(model: BundleModel, case: Case, work: Path) -> _Loaded:
    """Read + preprocess one case (runs in the prefetch thread); errors are returned, not raised."""
    start = time.perf_counter()
    loaded = _Loaded()
    try:
        source = case.input
        if case.kind == "dicom":  # hand the reader a folder holding exactly this series
            loaded.workdir = Path(tempfile.mkdtemp(prefix=f"{case.id}-", dir=work))
            for i, f in enumerate(case.files):
                os.symlink(os.path.abspath(f), loaded.workdir / f"{i:05d}.dcm")
            source = str(loaded.workdir)
        data = _read(model, case, source)
        loaded.raw = data[model.image_key]
        loaded.data = model.preprocessing(dict(data), start=model.raw_end)
    except Exception as e:
        reason = _reason(e)
        name = Path(case.input).name
        loaded.error = f"reading/preprocessing failed: {reason if name in reason else f'{name}: {reason}'}"
    loaded.seconds = time.perf_counter() - start
    return loaded


def _read(model: BundleModel, case: Case, source: str) -> dict:
    """The bundle's read steps on ``source``. A DICOM series whose reader fails or returns fewer slices than the
    case has instances (ITK drops undecodable files silently) raises naming the first file pydicom cannot decode."""
    data, error = None, None
    try:
        data = model.preprocessing({model.image_key: source}, end=model.raw_end)
    except Exception as e:
        if case.kind != "dicom":
            raise
        error = e
    slices = None if data is None else int(data[model.image_key].shape[-1])
    if case.kind == "dicom" and slices != len(case.files):
        problems = ((f, pixel_data_problem(f)) for f in case.files)
        broken = next((f"{os.path.relpath(f, case.input)}: {p}" for f, p in problems if p), None)
        if error is not None and broken is None:
            raise error
        raise ValueError(broken or f"the reader returned {slices} slices for {len(case.files)} instances")
    return data


def _reason(exc: BaseException) -> str:
    """The innermost message of a (MONAI-wrapped) exception chain, with the transform that raised it; an error
    raised ``from None`` (a clearer message in place of torch's) ends the chain."""
    inner, step = exc, ""
    while True:
        match = re.search(r"applying transform <([\w.]+)", str(inner))
        step = match.group(1).rsplit(".", 1)[-1] if match else step
        nxt = inner.__cause__ or (None if inner.__suppress_context__ else inner.__context__)  # `raise … from None`
        if nxt is None:
            break
        inner = nxt
    text = f"{type(inner).__name__}: {str(inner).strip().splitlines()[0][:500] if str(inner).strip() else ''}"
    return f"{text} (in {step})" if step else text


def _infer(model: BundleModel, data: dict) -> dict:
    """The evaluator's step: inferer(image batch of 1, network), then the bundle's postprocessing."""
    image = data[model.image_key]
    with torch.no_grad():
        pred = model.inferer(image.unsqueeze(0).to(model.device), model.network)
    return model.postprocessing({**data, "pred": pred[0]})


def _write_outputs(
    model: BundleModel, case: Case, out: dict, raw: Any, folder: Path, formats: Sequence[str], statistics: bool
) -> tuple[list[str], list[str], dict[str, Any]]:
    """Write the case's outputs (each atomically); returns (paths relative to the output root, notes, more entry
    fields: ``qc``)."""
    written, notes, extra = [], [], {}
    label = out["pred"]
    if "nifti" in formats:
        saver = model.savers.get("pred")
        with atomic_path(folder / "seg.nii.gz") as tmp:
            if saver is not None:  # the bundle's own writer (dtype, metadata) with our file name
                saver(label, filename=str(tmp)[: -len(".nii.gz")])
            else:
                _nifti(label, tmp, np.uint8)
        written.append("seg.nii.gz")
    unc = out.get("uncertainty")
    if "uncertainty" in formats:
        if unc is None:
            raise ValueError("the bundle's postprocessing produced no 'uncertainty'")
        saver = model.savers.get("uncertainty")
        with atomic_path(folder / "uncertainty.nii.gz") as tmp:
            if saver is not None:
                saver(unc, filename=str(tmp)[: -len(".nii.gz")])
            else:
                _nifti(unc, tmp, np.float32)
        written.append("uncertainty.nii.gz")
    affine = as_numpy(label.affine) if hasattr(label, "affine") else np.eye(4)
    array = as_numpy(label)[0]
    if case.kind == "dicom":
        _write_dicom(model, case, array.astype(np.uint8), affine, folder, formats, written, notes)
    samples = model.settings.get("num_samples") or 1
    if unc is not None and samples >= 2:
        extra["qc"] = review_flag(array, as_numpy(unc), model.uncertainty_measure, samples, model.qc_threshold)
    if statistics:
        found = structure_statistics(
            array, affine, as_numpy(raw), model.classes, None if unc is None else as_numpy(unc),
            model.uncertainty_measure or "std",
        )  # fmt: skip
        _write_json(folder / "statistics.json", {"case": case.id, "bundle": model.name, **found})
        written.append("statistics.json")
    if "png" in formats:
        title = f"{case.id} — {model.name} {model.version}"
        qc = extra.get("qc") or {}
        flag = f"REVIEW: disagreement {qc['disagreement']:.4g} > {qc['threshold']:.4g}" if qc.get("review") else ""
        image, shown, uncertainty = radiological(raw, label, unc)
        save_overlay(image, shown, folder / "overlay.png", model.classes, uncertainty, title, flag=flag)
        written.append("overlay.png")
    return [f"{case.id}/{name}" for name in written], notes, extra


def _write_dicom(
    model: BundleModel,
    case: Case,
    label: np.ndarray,
    affine: np.ndarray,
    folder: Path,
    formats: Sequence[str],
    written: list[str],
    notes: list[str],
) -> None:
    """``seg.dcm`` (DICOM SEG) and ``rtstruct.dcm`` (RT Structure Set; not written for an empty label, with a note)
    of a DICOM case, appending to ``written`` and ``notes`` (each note once)."""
    from diffseg.dicomseg import write_dicom_seg
    from diffseg.rtstruct import write_rtstruct

    args = (label, affine, case.files, model.classes)
    colors = {k: class_rgb(k) for k in model.classes}
    writers = {"dicom_seg": ("seg.dcm", write_dicom_seg, ()), "rtstruct": ("rtstruct.dcm", write_rtstruct, (colors,))}
    for fmt, (name, write, more) in writers.items():
        if fmt not in formats:
            continue
        if fmt == "rtstruct" and not label.any():
            notes.append(NO_RTSTRUCT + "nothing was segmented (an RT Structure Set needs at least one ROI)")
            continue
        with atomic_path(folder / name) as tmp:
            new = write(*args, tmp, model.name, model.version, *more)
        notes += [n for n in new if n not in notes]
        written.append(name)


def _nifti(tensor: Any, path: Path, dtype: Any) -> None:
    from monai.data import NibabelWriter

    writer = NibabelWriter(output_dtype=dtype)
    writer.set_data_array(tensor, channel_dim=0, squeeze_end_dims=True)
    writer.set_metadata(getattr(tensor, "meta", {}), resample=False)
    writer.write(str(path))


# ---- the folder ---------------------------------------------------------------------------------------------------
def segment_folder(
    model: BundleModel,
    input_path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    formats: Sequence[str] = ("nifti", "dicom_seg", "png"),
    resume: bool = False,
    progress: bool = True,
    runtime: str = "torch",
    statistics: bool = False,
) -> dict[str, Any]:
    """Segment every case under ``input_path`` (one path or several) into ``output``; returns the manifest (also
    written to disk). ``statistics`` writes each case's ``statistics.json`` and ``<output>/statistics.csv``.

    Rank r of N (torchrun) takes every N-th case; rank 0 returns the merged manifest, other ranks their own.
    """
    unknown = sorted(set(formats) - set(FORMATS))
    if unknown:
        raise ValueError(f"unknown format(s) {unknown}; expected some of {FORMATS}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    if hasattr(model.network, "progress"):
        model.network.progress = progress  # tqdm over sampling steps
    rank, world = dist_info()
    inputs = [input_path] if isinstance(input_path, (str, os.PathLike)) else list(input_path)
    inventories = [scan(path, model.spatial_dims) for path in inputs]
    cases = unique_ids([case for inventory in inventories for case in inventory.cases])
    mine = cases[rank::world]
    previous = read_manifest(output) if resume else {}
    header = {
        "bundle": model.name,
        "version": model.version,
        "seed": model.settings.get("seed"),
        "settings": {
            **model.settings,
            "formats": list(formats),
            "statistics": statistics,
            "qc_threshold": model.qc_threshold,
            "runtime": runtime,
            "input": [str(p) for p in inputs],
        },
        "files_found": sum(inventory.found for inventory in inventories),
        "skipped_files": [{"file": f, "reason": r} for inv in inventories for f, r in inv.skipped_files.items()],
    }
    manifest_path = output / (MANIFEST if world == 1 else f"manifest.rank{rank}.json")
    order = {case.id: i for i, case in enumerate(mine)}
    entries: list[dict] = []

    def record(entry: dict) -> None:
        if world > 1:
            entry["rank"] = rank
        entries.append(entry)
        entries.sort(key=lambda e: order[e["id"]])
        _write_json(manifest_path, {**header, "cases": entries})

    todo: list[Case] = []
    for case in mine:
        if case.status is not None:
            record(_entry(case, case.status, case.error, [], 0.0))
        elif resume and _complete(previous.get(case.id), output, case, [*formats, *["statistics"] * statistics]):
            record({**previous[case.id], **_accounting(case), "resumed": True})
        else:
            todo.append(case)
    work = output / ".work"
    work.mkdir(exist_ok=True)
    bar = tqdm(total=len(todo), desc=f"cases (rank {rank})" if world > 1 else "cases", disable=not progress)
    with (
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as reader,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="writer") as writer,
    ):
        future: Future | None = reader.submit(_load, model, todo[0], work) if todo else None
        writing: Future | None = None
        for i, case in enumerate(todo):
            loaded = future.result()
            future = reader.submit(_load, model, todo[i + 1], work) if i + 1 < len(todo) else None
            inferred = _infer_case(model, case, loaded, output)
            if writing is not None:  # the previous case's files were written while this one was sampled
                record(writing.result())
                bar.update()
            writing = writer.submit(_finish_case, model, case, loaded, inferred, output, formats, statistics)
        if writing is not None:
            record(writing.result())
            bar.update()
    bar.close()
    shutil.rmtree(work, ignore_errors=True)
    if world > 1:
        _merge(output, header, cases, rank, world)
    result = read_manifest_file(output) if rank == 0 and world > 1 else {**header, "cases": entries}
    if statistics and rank == 0:
        with atomic_path(output / "statistics.csv") as tmp:
            write_statistics_csv(tmp, output, result["cases"])
    return result


def _accounting(case: Case) -> dict[str, Any]:
    """``input`` (the folders of a DICOM series from several, else the case's input) and ``files`` (how many input
    files the case accounts for)."""
    return {"input": list(case.folders) if len(case.folders) > 1 else case.input, "files": len(case.sources)}


def _entry(case: Case, status: str, error: str, outputs: list[str], seconds: float, **extra: Any) -> dict:
    entry = {"id": case.id, **_accounting(case), "status": status, "error": error, "outputs": outputs}
    entry["seconds"] = round(seconds, 3)
    if case.kind == "dicom" and case.files:
        entry["instances"] = len(case.files)
    notes = [*case.notes, *extra.pop("notes", [])]
    return {**entry, **({"notes": notes} if notes else {}), **extra}


@dataclass
class _Inferred:
    out: dict | None = None
    entry: dict | None = None  # a failure entry (reading or inference failed)
    seconds: float = 0.0


def _infer_case(model: BundleModel, case: Case, loaded: _Loaded, output: Path) -> _Inferred:
    """Inference of one read case (main thread); a failure becomes its manifest entry."""
    start = time.perf_counter()
    for stale in (output / case.id).glob(".*.tmp.*"):  # left by an interrupted run
        stale.unlink(missing_ok=True)
    if loaded.error:
        return _Inferred(entry=_entry(case, "failed", loaded.error, [], loaded.seconds))
    try:
        out = _infer(model, loaded.data)
    except Exception as e:
        logger.debug("case %s failed", case.id, exc_info=True)
        entry = _entry(case, "failed", f"inference failed: {_reason(e)}", [], loaded.seconds)
        return _Inferred(entry=entry)
    return _Inferred(out=out, seconds=time.perf_counter() - start)


def _finish_case(
    model: BundleModel,
    case: Case,
    loaded: _Loaded,
    inferred: _Inferred,
    output: Path,
    formats: Sequence[str],
    statistics: bool,
) -> dict[str, Any]:
    """Write one case's outputs (writer thread, overlapping the next case's sampling); returns its entry."""
    start = time.perf_counter()
    try:
        if inferred.entry is not None:
            return inferred.entry
        try:
            outputs, notes, extra = _write_outputs(
                model, case, inferred.out, loaded.raw, output / case.id, formats, statistics
            )
        except Exception as e:
            logger.debug("case %s: writing failed\n%s", case.id, traceback.format_exc())
            return _entry(case, "failed", f"writing outputs failed: {_reason(e)}", [], loaded.seconds)
        write = time.perf_counter() - start
        timing = {"read": round(loaded.seconds, 3), "infer": round(inferred.seconds, 3), "write": round(write, 3)}
        seconds = loaded.seconds + inferred.seconds + write
        return _entry(case, "ok", "", outputs, seconds, notes=notes, timing=timing, **extra)
    finally:
        if loaded.workdir is not None:
            shutil.rmtree(loaded.workdir, ignore_errors=True)


def read_manifest_file(output: str | os.PathLike[str]) -> dict[str, Any]:
    """The whole ``<output>/manifest.json``."""
    return json.loads((Path(output) / MANIFEST).read_text())


def _merge(output: Path, header: dict, cases: list[Case], rank: int, world: int) -> None:
    """Barrier, then rank 0 writes ``manifest.json`` with every rank's entries in case order."""
    torch.distributed.barrier()
    if rank != 0:
        return
    by_id = {}
    for r in range(world):
        path = output / f"manifest.rank{r}.json"
        by_id.update({e["id"]: e for e in json.loads(path.read_text())["cases"]})
    merged = {**header, "world_size": world, "cases": [by_id[c.id] for c in cases if c.id in by_id]}
    _write_json(output / MANIFEST, merged)
    for r in range(world):
        (output / f"manifest.rank{r}.json").unlink(missing_ok=True)
