"""The analyses of paper 001 (Öttl et al.) for any diffusion bundle of this project; PNG + CSV/JSON outputs.

Every analysis reads the bundle's own ``configs/train.json`` (plus ``--configs`` override files merged after it and
``--override`` ids), its validation data (``validate#dataset``: the bundle's preprocessing of image and label, so
``--dataset_dir`` picks an MSD-style ``dataset.json``) and its ``network_def`` (a ``diffseg.DiffusionSegmenter``)
with the weights of ``--ckpt`` (default: the config's ``ckpt_path``).

    python scripts/analyze.py fingerprint --bundle bundles/<name> --output <dir> [--timesteps "[0,250,500]"]
    python scripts/analyze.py calibration --bundle bundles/<name> --output <dir> [--samples 9]
    python scripts/analyze.py compare --bundle bundles/<name> --ckpt <diffusion.pt> --other_ckpt <ff.pt>
        --other_configs "['train_feedforward.json']" --output <dir>
    python scripts/analyze.py stability --bundle bundles/<name> --output <dir> [--seeds "[0,1,2]"]
    python scripts/analyze.py ensemble --bundle bundles/<name> --output <dir> [--samples "[1,3,9]"] [--seeds "[0,1,2]"]
    python scripts/analyze.py otsu --bundle bundles/<name> --output <dir>     # the threshold baseline
    python scripts/analyze.py score --pred <seg.nii.gz> --label <reference> [--region 384:512] [--binary]
    python scripts/analyze.py curves --runs a/curve.csv,b/curve.csv --labels diffusion,feed-forward --output x.png
    python scripts/analyze.py qc-threshold --bundle bundles/<name> --input <held-out case(s)> [--samples 3] [--write]

``qc-threshold`` runs the folder engine (``diffseg.deploy``, the bundle's ``inference.json``) instead of
``train.json``. ``python scripts/analyze.py <analysis> --help`` documents each one.
"""

from __future__ import annotations

import datetime
import json
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import fire
import nibabel as nib
import numpy as np
import torch
from monai.transforms import ResizeWithPadOrCrop

from diffseg.analysis import (
    mask_error_curve,
    save_curve_plot,
    save_reliability_diagram,
    segmentation_scores,
    write_csv,
)
from diffseg.bundles import bundle_imports, bundle_parser
from diffseg.curves import curve_summary, plot_curves, read_curve
from diffseg.data import cache_dir
from diffseg.deploy import load_bundle, segment_folder
from diffseg.ensembles import aggregate
from diffseg.io import atomic_path
from diffseg.metrics import reliability_data, seed_stability
from diffseg.reports import region_disagreement


def _load(bundle: str, configs: Sequence[str], ckpt: str | None, override: dict | None, weights: bool = True):
    """(segmenter, validation dataset, validation inferer, roi_size or None) of a bundle, weights loaded (unless
    ``weights`` is False)."""
    root = Path(bundle).resolve()
    with bundle_imports(root):
        parser = bundle_parser(root, ["train.json", *configs], **(override or {}))
        segmenter = parser.get_parsed_content("network_def").eval()
        dataset = parser.get_parsed_content("validate#dataset")
        inferer = parser.get_parsed_content("validate#inferer")
        path = ckpt or parser.get_parsed_content("ckpt_path")
        roi = parser.get_parsed_content("roi_size", default=None)
    if weights:
        segmenter.load_state_dict(torch.load(path, weights_only=True))
    return segmenter, dataset, inferer, roi


def _items(dataset, limit: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(image (1, C, *S), label (1, 1, *S)) plain tensors of the preprocessed validation items."""
    for i in range(len(dataset) if limit is None else min(limit, len(dataset))):
        item = dataset[i]
        yield torch.as_tensor(item["image"])[None].float(), torch.as_tensor(item["label"])[None]


def _slab(image: torch.Tensor, label: torch.Tensor, roi: Sequence[int] | None, slice_axis: int | None):
    """The slice with the most foreground along ``slice_axis`` (a 2D network on 3D data), then a centre crop/pad of
    image and label to ``roi`` (one denoiser call on the whole input must fit in memory)."""
    if slice_axis is not None:
        axis = 2 + slice_axis
        dims = [d for d in range(2, label.ndim) if d != axis]
        best = int((label > 0).sum(dim=[0, 1, *dims]).argmax())
        image, label = image.select(axis, best), label.select(axis, best)
    if roi is not None:
        crop = ResizeWithPadOrCrop(list(roi))
        image, label = crop(image[0])[None], crop(label[0])[None]
    return torch.as_tensor(image), torch.as_tensor(label)


def _probs(segmenter, inferer, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.as_tensor(inferer(image, segmenter)).float()


def fingerprint(
    bundle: str,
    output: str,
    timesteps: Sequence[int] | None = None,
    draws: int = 2,
    configs: Sequence[str] = (),
    ckpt: str | None = None,
    roi: Sequence[int] | None = None,
    slice_axis: int | None = None,
    limit: int | None = None,
    seed: int = 0,
    override: dict | None = None,
) -> list[dict]:
    """Dataset fingerprint: one-call x̂0 error (MSE in {−1,+1}, Dice of x̂0) vs timestep, conditioned on the image
    and with the image replaced by noise (E3, "unconditioned"). Writes fingerprint.csv and fingerprint.png.

    Args:
        timesteps: grid of t (default: 10 points over the training chain, t = 0 and T−1 included).
        draws: noise draws per image and t. roi: centre crop/pad of each input (default: the config's roi_size).
        slice_axis: for a 2D bundle on 3D volumes, the axis to take the most-foreground slice along.
        limit: the first ``limit`` validation items only.
    """
    segmenter, dataset, _, roi_size = _load(bundle, configs, ckpt, override)
    t_max = segmenter.scheduler.num_train_timesteps
    grid = list(timesteps) if timesteps else sorted({round(i * (t_max - 1) / 9) for i in range(10)})
    data = [_slab(i, lab, roi or roi_size, slice_axis) for i, lab in _items(dataset, limit)]
    rows = []
    for name, blind in (("conditioned", False), ("unconditioned", True)):
        curve = mask_error_curve(segmenter, data, grid, draws=draws, unconditioned=blind, seed=seed)
        rows += [{"condition": name, **row} for row in curve]
    out = Path(output)
    write_csv(rows, out / "fingerprint.csv")
    curves = {c: [r for r in rows if r["condition"] == c] for c in ("conditioned", "unconditioned")}
    save_curve_plot(curves, out / "fingerprint.png", f"{Path(bundle).name}: one-call x̂0 error vs t")
    return rows


def calibration(
    bundle: str,
    output: str,
    samples: int = 9,
    num_bins: int = 10,
    configs: Sequence[str] = (),
    ckpt: str | None = None,
    limit: int | None = None,
    override: dict | None = None,
) -> dict:
    """Reliability diagram (calibration.png) and ECE with ``num_bins`` bins of the foreground probability for an
    N-sample ensemble (multiclass bundles: 1 − p(background) vs any foreground); calibration.json holds the per-bin
    data, the pooled ECE and per-image Dice/IoU (and ECE for binary bundles)."""
    segmenter, dataset, inferer, _ = _load(bundle, configs, ckpt, override)
    segmenter.num_samples = samples
    probs, labels, per_image = [], [], []
    for image, label in _items(dataset, limit):
        p = _probs(segmenter, inferer, image)
        per_image.append(segmentation_scores(p, label, num_bins))
        if p.shape[1] > 2:  # multiclass: calibration of "any foreground" = 1 − p(background)
            p, label = torch.cat([p[:, :1], 1 - p[:, :1]], 1), (label > 0).long()
        probs.append(p.flatten(2))
        labels.append(label.flatten(2))
    data = reliability_data(torch.cat(probs, 2), torch.cat(labels, 2), num_bins=num_bins)
    report = {
        "samples": samples,
        "voxels": sum(lab.numel() for lab in labels),
        "ece_pooled": data.ece,
        "bins": {k: getattr(data, k).tolist() for k in ("bin_edges", "confidence", "accuracy", "counts")},
        "per_image": per_image,
    }
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration.json").write_text(json.dumps(report, indent=4) + "\n")
    save_reliability_diagram(data, out / "calibration.png", f"{Path(bundle).name}, N = {samples}")
    return report


def compare(
    bundle: str,
    output: str,
    ckpt: str,
    other_ckpt: str,
    configs: Sequence[str] = (),
    other_configs: Sequence[str] = (),
    names: Sequence[str] = ("diffusion", "feed-forward"),
    limit: int | None = None,
    override: dict | None = None,
) -> list[dict]:
    """Two checkpoints of the same architecture side by side (paper 001, E1: diffusion vs feed-forward training):
    mean Dice / IoU / ECE over the validation items → compare.csv (one row per model)."""
    rows = []
    for name, weights, extra in ((names[0], ckpt, configs), (names[1], other_ckpt, other_configs)):
        segmenter, dataset, inferer, _ = _load(bundle, extra, weights, override)
        scores = [segmentation_scores(_probs(segmenter, inferer, i), lab) for i, lab in _items(dataset, limit)]
        rows.append({"model": name, **{k: sum(s[k] for s in scores) / len(scores) for k in scores[0]}})
    write_csv(rows, Path(output) / "compare.csv")
    return rows


def stability(
    bundle: str,
    output: str,
    seeds: Sequence[int] = (0, 1, 2),
    configs: Sequence[str] = (),
    ckpt: str | None = None,
    limit: int | None = None,
    override: dict | None = None,
) -> list[dict]:
    """Agreement of repeated inference with different seeds: Dice of the label maps and PSNR/SSIM of the score maps,
    mean over seed pairs, per validation item → stability.csv."""
    segmenter, dataset, inferer, _ = _load(bundle, configs, ckpt, override)
    rows = []
    for index, (image, _) in enumerate(_items(dataset, limit)):
        runs = []
        for s in seeds:
            segmenter.seed = int(s)
            runs.append(_probs(segmenter, inferer, image))
        result = seed_stability(runs)
        rows.append({"item": index, "dice": result.dice, "psnr": result.psnr, "ssim": result.ssim})
    write_csv(rows, Path(output) / "stability.csv")
    return rows


def otsu(
    bundle: str, output: str, configs: Sequence[str] = (), limit: int | None = None, override: dict | None = None
) -> dict:
    """The trivial baseline: an Otsu threshold (``skimage.filters.threshold_otsu``) of each validation image's
    channel 0 (bright = foreground; the threshold is invariant to the bundle's affine intensity normalisation), scored
    as a {0, 1} probability map with the same Dice / IoU / ECE as the models → otsu.csv; returns the mean row."""
    from skimage.filters import threshold_otsu

    _, dataset, _, _ = _load(bundle, configs, None, override, weights=False)
    rows = []
    for index, (image, label) in enumerate(_items(dataset, limit)):
        channel = image[:, :1].numpy()
        threshold = float(threshold_otsu(channel))
        fg = torch.as_tensor(channel > threshold).float()
        scores = segmentation_scores(torch.cat([1 - fg, fg], 1), (label > 0).long())
        rows.append({"item": index, "threshold": threshold, **scores})
    write_csv(rows, Path(output) / "otsu.csv")
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("dice", "iou", "ece")}


def score(pred: str, label: str, region: str | None = None, binary: bool = False) -> dict:
    """Dice and IoU per class of a written label file ``pred`` (e.g. what ``make demo`` wrote) against a reference
    label file ``label`` of the same grid, both read with MONAI's ``LoadImage`` (so PNG / TIFF arrays are (x, y) in
    both). ``region``: comma-separated ``start:stop`` numpy slices of those arrays scored alone (SegDiff's held-out
    quarter of the 512² stardist image: ``384:512``); ``binary``: foreground = label > 0 in both (instance masks).
    Volumes are compared in RAS orientation. Prints and returns {class: {"dice", "iou", "voxels"}} for every class > 0
    in either file."""
    from monai.transforms import Compose, EnsureChannelFirst, LoadImage, Orientation

    def load(path: str) -> np.ndarray:
        image = LoadImage(image_only=True)(path)
        if image.ndim == 3:  # volumes: compared in RAS (a DICOM-grid output vs an LAS reference of the same grid)
            image = Compose([EnsureChannelFirst(channel_dim="no_channel"), Orientation("RAS")])(image)
        return np.asarray(image).squeeze()

    p, r = load(pred), load(label)
    if p.shape != r.shape:
        raise ValueError(f"{pred} has shape {p.shape} but {label} has {r.shape}: score labels of the same grid")
    if region:
        window = tuple(slice(*(int(v) if v else None for v in part.split(":"))) for part in region.split(","))
        p, r = p[window], r[window]
    if binary:
        p, r = p > 0, r > 0
    out = {}
    for c in sorted({int(v) for v in np.unique(np.concatenate([np.unique(p), np.unique(r)]))} - {0}):
        a, b = p == c, r == c
        union = int((a | b).sum())
        inter = int((a & b).sum())
        out[c] = {"dice": float(2 * inter / (a.sum() + b.sum())), "iou": inter / union, "voxels": int(b.sum())}
        print(f"class {c}: Dice {out[c]['dice']:.4f}  IoU {out[c]['iou']:.4f}  reference voxels {out[c]['voxels']}")
    return out


def ensemble(
    bundle: str,
    output: str,
    samples: Sequence[int] = (1, 3, 9),
    seeds: Sequence[int] = (0, 1, 2),
    num_bins: int = 10,
    configs: Sequence[str] = (),
    ckpt: str | None = None,
    limit: int | None = None,
    override: dict | None = None,
) -> list[dict]:
    """Ensemble size vs Dice / IoU / ECE (paper 002's claim): per seed, one run of max(``samples``) chains; the mean
    of its first N sample maps is the N-sample ensemble (the chains are independent, so N' < N costs nothing more).
    Writes ensemble.csv (seed, N, item, scores), ensemble_summary.csv (per N: mean ± std over seeds of the per-seed
    mean over items) and calibration_N<n>.png (reliability diagram of the first seed) for each N."""
    segmenter, dataset, inferer, _ = _load(bundle, configs, ckpt, override)
    sizes = sorted({int(n) for n in samples})
    segmenter.num_samples = sizes[-1]
    rows, pooled = [], {n: ([], []) for n in sizes}
    for s in seeds:
        segmenter.seed = int(s)
        for index, (image, label) in enumerate(_items(dataset, limit)):
            _probs(segmenter, inferer, image)
            for n in sizes:
                p = aggregate(segmenter.last_samples[:, :n], segmenter.aggregation)
                rows.append({"seed": int(s), "samples": n, "item": index, **segmentation_scores(p, label, num_bins)})
                if s == seeds[0]:
                    pooled[n][0].append((1 - p[:, :1]).flatten(2))  # any foreground (binary: p[:, 1])
                    pooled[n][1].append((label > 0).long().flatten(2))
    out = Path(output)
    write_csv(rows, out / "ensemble.csv")
    summary = []
    for n in sizes:
        per_seed = {k: [] for k in ("dice", "iou", "ece") if k in rows[0]}
        for s in seeds:
            mine = [r for r in rows if r["samples"] == n and r["seed"] == int(s)]
            for k in per_seed:
                per_seed[k].append(sum(r[k] for r in mine) / len(mine))
        row = {"samples": n, "seeds": len(seeds)}
        for k, v in per_seed.items():
            t = torch.tensor(v, dtype=torch.float64)
            row[f"{k}_mean"], row[f"{k}_std"] = float(t.mean()), float(t.std(unbiased=False))
        summary.append(row)
        fg, gt = (torch.cat(x, 2) for x in pooled[n])
        data = reliability_data(torch.cat([1 - fg, fg], 1), gt, num_bins=num_bins)
        save_reliability_diagram(data, out / f"calibration_N{n}.png", f"{Path(bundle).name}, N = {n}, seed {seeds[0]}")
    write_csv(summary, out / "ensemble_summary.csv")
    print("| N | " + " | ".join(k for k in ("Dice", "IoU", "ECE")) + " |\n|---|---|---|---|")
    for r in summary:
        cells = [f"{r[f'{k}_mean']:.3f} ± {r[f'{k}_std']:.3f}" for k in ("dice", "iou", "ece") if f"{k}_mean" in r]
        print(f"| {r['samples']} | " + " | ".join(cells) + " |")
    return summary


def _shell_path(path: str) -> str:
    """A path for a reproducible command line: a file of the demo data cache as ``$(python scripts/fetch_data.py
    --path <name>)``, any other path as given."""
    resolved, cache = Path(path).resolve(), cache_dir().resolve()
    if resolved.is_relative_to(cache):
        return f"$(python scripts/fetch_data.py --path {resolved.relative_to(cache).as_posix()})"
    return path


def qc_threshold(
    bundle: str,
    input: str | Sequence[str],  # noqa: A002 - the flag name of scripts/segment.py
    samples: int = 3,
    steps: int | None = None,
    seed: int | None = None,
    percentile: float = 95.0,
    min_voxels: int = 50,
    tile: int = 64,
    write: bool = False,
    output: str | None = None,
    configs: Sequence[str] = ("inference.json",),
    device: str = "cpu",
    override: dict | None = None,
) -> dict:
    """The review flag's threshold of a bundle from its held-out evaluation case(s) ``input`` (files or folders,
    comma-separated; e.g. TotalSegmentator patient B's DICOM series, or SegDiff's held-out strip).

    The folder engine (``diffseg.deploy.load_bundle`` + ``segment_folder``, the bundle's inference defaults with
    ``samples`` ensemble members, ``steps`` and ``seed`` when given) writes each case's label and uncertainty map;
    from those files, the mean disagreement inside the predicted foreground is taken per axial slice with at least
    ``min_voxels`` foreground voxels (3D) or per ``tile``² tile with foreground (2D), and the threshold is the
    ``percentile`` of these values over all cases: a case whose average disagreement is as high as the worst 5 % of
    the slices of a held-out case the model segments is worth a look. Prints the value and each case's ``qc``;
    ``write`` stores ``"qc_threshold": {measure: value}`` and ``"qc_threshold_source"`` (command, data, samples,
    date) in the bundle's ``configs/metadata.json`` (what ``load_bundle`` reads).

    Args:
        output: keep the segmentations in this folder (default: a temporary one).
        configs, device, override: as for ``scripts/segment.py`` (``override``: config ids → values).
    """
    if samples < 2:
        raise ValueError(f"samples={samples}: the ensemble disagreement needs at least 2 samples")
    inputs = _names(input)
    if "save_uncertainty" not in bundle_parser(Path(bundle), list(configs)).config:
        raise ValueError(f"{Path(bundle).name} writes no uncertainty map (no save_uncertainty): it has no review flag")
    model = load_bundle(bundle, device, steps, samples, seed, True, override, list(configs))
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(output or scratch)
        manifest = segment_folder(model, inputs, out, ("nifti", "uncertainty"), progress=False)
        regions, cases = [], []
        for entry in manifest["cases"]:
            if entry["status"] != "ok":
                raise RuntimeError(f"case {entry['id']} {entry['status']}: {entry['error']}")
            seg = nib.load(out / entry["id"] / "seg.nii.gz")
            unc = np.asarray(nib.load(out / entry["id"] / "uncertainty.nii.gz").dataobj)
            label = np.asarray(seg.dataobj)
            found = region_disagreement(label, unc.reshape(label.shape), seg.affine, min_voxels, tile)
            regions += [{"case": entry["id"], **r} for r in found]
            cases.append({"case": entry["id"], "regions": len(found), **entry["qc"]})
    if not regions:
        raise ValueError(f"no slice or tile of {inputs} has enough predicted foreground for a threshold")
    values = [r["disagreement"] for r in regions]
    value = float(f"{np.percentile(values, percentile):.6g}")
    measure = model.uncertainty_measure
    kind = f"axial slices with >= {min_voxels} foreground voxels" if model.spatial_dims == 3 else f"{tile}² tiles"
    spread = f"min {min(values):.4g}, median {np.median(values):.4g}, max {max(values):.4g}"
    print(f"{model.name} {model.version}: qc_threshold {measure} = {value}")
    print(f"  the {percentile:g}th percentile over {len(values)} {kind} ({spread})")
    for case in cases:
        review = case["disagreement"] > value
        print(f"  case {case['case']}: qc disagreement {case['disagreement']} over {case['foreground_voxels']} "
              f"foreground voxels ({case['regions']} regions) -> review {review}")  # fmt: skip
    flags = [f"--samples {samples}"] + [f"--{k} {v}" for k, v in (("steps", steps), ("seed", seed)) if v is not None]
    flags += [f"--percentile {percentile:g}"] if percentile != 95.0 else []
    data = ",".join(_shell_path(i) for i in inputs)
    command = f'python scripts/analyze.py qc-threshold --bundle bundles/{model.name} --input "{data}" {" ".join(flags)}'
    source = (
        f"{command} --write: the {percentile:g}th percentile of the mean ensemble {measure} inside the predicted "
        f"foreground over {len(values)} {kind} of case(s) {', '.join(c['case'] for c in cases)} "
        f"({model.settings.get('num_inference_steps')} steps, {samples} samples, seed {model.settings.get('seed')}, "
        f"the bundle's models/ weights); {datetime.date.today().isoformat()}"
    )
    result = {"qc_threshold": {measure: value}, "qc_threshold_source": source, "regions": regions, "cases": cases}
    if write:
        path = model.root / "configs" / "metadata.json"
        text = path.read_text()
        meta = json.loads(text)
        previous = meta.get("qc_threshold")
        meta["qc_threshold"] = {**(previous if isinstance(previous, dict) else {}), measure: value}
        meta["qc_threshold_source"] = source
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(meta, indent=4, ensure_ascii="\\u" in text) + "\n")
        print(f"written to {path}")
    return result


def _names(value: str | Sequence[str]) -> list[str]:
    """Fire passes ``a,b`` as a string or a tuple."""
    return [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v) for v in value]


def curves(
    runs: str | Sequence[str],
    output: str,
    labels: str | Sequence[str] | None = None,
    metric: str = "val_mean_dice",
) -> list[dict]:
    """Several trainings in one figure: loss and ``metric`` against wall minutes from their ``curve.csv`` files
    (written by every bundle's ``train.json``) → ``output`` (PNG); prints and returns each run's best and final
    ``metric`` with the wall minutes at which they were reached, its iterations and seconds per iteration.
    ``metric`` may name several columns, comma-separated: their mean is plotted (e.g. the five-organ mean
    ``val_dice_liver,val_dice_spleen,...``; a validation row missing one of them is left out)."""
    paths = _names(runs)
    names = _names(labels) if labels is not None else [Path(p).parent.name for p in paths]
    if len(names) != len(paths):
        raise ValueError(f"{len(paths)} runs but {len(names)} labels: give one label per curve.csv")
    data = {name: read_curve(path) for name, path in zip(names, paths, strict=True)}
    columns = _names(metric)
    if len(columns) > 1:
        metric = f"mean of {len(columns)} columns"  # the axis label; the columns are in the card's command
        for rows in data.values():
            for row in rows:
                if all(c in row for c in columns):
                    row[metric] = float(np.mean([row[c] for c in columns]))
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    plot_curves(data, output, metric)
    rows = [{"run": name, **curve_summary(rows, metric)} for name, rows in data.items()]
    print(f"| run | best {metric} | at min | final {metric} | at min | iterations | s/iteration |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['run']} | {r['best']:.4f} | {r['best_minutes']:.1f} | {r['final']:.4f} | "
            f"{r['final_minutes']:.1f} | {r['final_iteration']:.0f} | {r['seconds_per_iteration']:.2f} |"
        )
    return rows


if __name__ == "__main__":
    fire.Fire(
        {
            "fingerprint": fingerprint,
            "calibration": calibration,
            "compare": compare,
            "stability": stability,
            "otsu": otsu,
            "score": score,
            "ensemble": ensemble,
            "curves": curves,
            "qc-threshold": qc_threshold,
        }
    )
