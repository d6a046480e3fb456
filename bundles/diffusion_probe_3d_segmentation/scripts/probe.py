"""Probing a frozen diffusion backbone (paper 004, methods.md §4.2–4.4).

- :class:`DiffusionFeatureExtractor`: for each t in ``times`` noise the image with fresh ε (x_t = q_sample(x0, t)), run
  the frozen backbone on ``[x_t, coordinates]`` and concatenate the pyramids level by level across t (level l has
  ``channels_l · len(times)`` channels).
- :class:`FPNNonLinearHead` / :class:`FPNLinearHead`: vox2vec's point-wise FPN heads (mishgon/vox2vec ``nn/fpn.py``).
- :class:`DiffusionProbeSegmenter`: image → class logits. Whole volumes: the backbone runs on overlapping windows
  (MONAI ``sliding_window_inference``, each pyramid level blended at its own resolution, uniform weights = averaged
  features); the noise is drawn once for the whole volume, so a window sees the same ε as the whole volume would.
  The head then runs once on the averaged pyramid. Seeded noise in eval mode → deterministic output.
- :class:`ProbeLoss`: cross-entropy + foreground Dice (``diffseg.ForegroundDiceLoss``).
- :class:`CachedFeaturePrepareBatch`: the CPU option of ``train.json`` (``feature_cache``): the frozen pyramid of each
  whole training volume is computed for ``feature_cache_draws`` noise draws (window-averaged), each of an optionally
  intensity-augmented copy of the image, and the head trains on crops of one of them per batch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffseg import DiffusionScheduler, ForegroundDiceLoss
from diffseg.sliding import fit_window, pad_spatial
from monai.inferers import sliding_window_inference
from monai.networks.blocks import ADN, Convolution
from monai.networks.utils import one_hot
from monai.transforms import Randomizable
from monai.utils import convert_to_dst_type, convert_to_tensor

__all__ = [
    "CachedFeaturePrepareBatch",
    "DiffusionFeatureExtractor",
    "DiffusionProbeSegmenter",
    "FPNLinearHead",
    "FPNNonLinearHead",
    "ProbeLoss",
    "build_head",
]


def _plain(x: torch.Tensor) -> torch.Tensor:
    """A plain tensor (MetaTensor bookkeeping on every op of a network costs more than the op on CPU)."""
    return convert_to_tensor(x, track_meta=False)


class DiffusionFeatureExtractor(nn.Module):
    """Multi-timestep feature pyramid of a frozen diffusion backbone.

    Args:
        backbone: a network with ``pyramid(x, timesteps, context) -> [coarse … fine]`` and ``pyramid_channels``
            (``scripts.backbone.DiffusionFPN``).
        scheduler: the pretraining schedule (``add_noise`` = q_sample).
        times: diffusion steps t (paper: 10, 30, 60 of T = 300).
        image_channels: leading input channels that are noised; the rest (coordinates) are passed as they are.
        frozen: the backbone is a fixed feature extractor (paper 004); ``False`` = the feed-forward twin, the same
            network trained end to end as a segmenter from its features.

    ``forward(x (B, image_channels + k, *S), noise (B, len(times)·image_channels, *S)) -> list`` of L tensors
    (B, channels_l·len(times), *S_l), coarse to fine, computed without gradient when ``frozen``.
    """

    def __init__(
        self, backbone: nn.Module, scheduler: DiffusionScheduler, times: Sequence[int] = (10, 30, 60),
        image_channels: int = 1, frozen: bool = True,
    ) -> None:  # fmt: skip
        super().__init__()
        times = [int(t) for t in times]
        if not times or any(t < 0 or t >= scheduler.num_train_timesteps for t in times):
            raise ValueError(f"times={times} must be non-empty steps in [0, {scheduler.num_train_timesteps})")
        self.backbone, self.scheduler, self.times, self.image_channels = backbone, scheduler, times, image_channels
        self.frozen = frozen

    @property
    def channels(self) -> list[int]:
        """Feature channels per level (coarse to fine) = backbone channels × len(times)."""
        return [c * len(self.times) for c in self.backbone.pyramid_channels]

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> list[torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self._pyramid(_plain(x), _plain(noise))

    def _pyramid(self, x: torch.Tensor, noise: torch.Tensor) -> list[torch.Tensor]:
        n, ic = len(self.times), self.image_channels
        image, coords = x[:, :ic], (x[:, ic:] if x.shape[1] > ic else None)
        b = image.shape[0]
        t = torch.tensor(self.times, device=x.device).repeat_interleave(b)  # (T·B,) time-major
        eps = noise.reshape(b, n, ic, *noise.shape[2:]).transpose(0, 1).reshape(n * b, ic, *noise.shape[2:])
        x_t = self.scheduler.add_noise(image.repeat(n, *([1] * (image.ndim - 1))), eps, t)
        ctx = None if coords is None else coords.repeat(n, *([1] * (coords.ndim - 1)))
        pyramid = self.backbone.pyramid(x_t, t, ctx)
        # (T·B, C, *S) → (B, T·C, *S): level by level, the t's side by side
        return [f.reshape(n, b, *f.shape[1:]).transpose(0, 1).reshape(b, -1, *f.shape[2:]) for f in pyramid]


class _PointwiseResBlock(nn.Module):
    """vox2vec ``ResBlock3d(kernel_size=1)``: x + conv1(ReLU(BN(conv1(ReLU(BN(x))))))."""

    def __init__(self, spatial_dims: int, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ADN("NA", channels, act="relu", norm="batch", norm_dim=spatial_dims),
            Convolution(spatial_dims, channels, channels, kernel_size=1, conv_only=True),
            ADN("NA", channels, act="relu", norm="batch", norm_dim=spatial_dims),
            Convolution(spatial_dims, channels, channels, kernel_size=1, conv_only=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


def _upsample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Nearest ×2 upsampling cropped to ``like``'s spatial size."""
    up = F.interpolate(x, scale_factor=2.0, mode="nearest")
    return up[(..., *(slice(0, s) for s in like.shape[2:]))]


class FPNNonLinearHead(nn.Module):
    """vox2vec ``FPNNonLinearHead``: point-wise residual blocks per level, top-down nearest upsampling + addition.

    Args:
        spatial_dims: 3 (2 for tests).
        in_channels: channels of the pyramid levels, coarse to fine.
        num_classes: output channels.

    ``forward([coarse … fine]) -> logits (B, num_classes, *S_finest)``.
    """

    def __init__(self, spatial_dims: int, in_channels: Sequence[int], num_classes: int) -> None:
        super().__init__()
        c = list(in_channels)
        self.in_channels = c
        self.bottom = _PointwiseResBlock(spatial_dims, c[0])
        self.lateral = nn.ModuleList(
            Convolution(spatial_dims, c[i + 1], c[i + 1], kernel_size=1, conv_only=True) for i in range(len(c) - 1)
        )
        self.top_down = nn.ModuleList(
            Convolution(spatial_dims, c[i], c[i + 1], kernel_size=1, conv_only=True) for i in range(len(c) - 1)
        )
        self.blocks = nn.ModuleList(_PointwiseResBlock(spatial_dims, c[i + 1]) for i in range(len(c) - 1))
        self.final = Convolution(spatial_dims, c[-1], num_classes, kernel_size=1, conv_only=True)

    def forward(self, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        _check_pyramid(pyramid, self.in_channels)
        x = self.bottom(pyramid[0])
        for fmap, lateral, top_down, block in zip(pyramid[1:], self.lateral, self.top_down, self.blocks, strict=True):
            x = block(_upsample(top_down(x), fmap) + lateral(fmap))
        return self.final(x)


class FPNLinearHead(nn.Module):
    """vox2vec ``FPNLinearHead``: a 1×1 conv per level to the classes (bias only at the finest), then top-down
    nearest upsampling and summation — a linear function of the pyramid."""

    def __init__(self, spatial_dims: int, in_channels: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        last = len(self.in_channels) - 1
        self.layers = nn.ModuleList(
            Convolution(spatial_dims, c, num_classes, kernel_size=1, bias=i == last, conv_only=True)
            for i, c in enumerate(self.in_channels)
        )

    def forward(self, pyramid: Sequence[torch.Tensor]) -> torch.Tensor:
        _check_pyramid(pyramid, self.in_channels)
        x = self.layers[0](pyramid[0])
        for fmap, layer in zip(pyramid[1:], self.layers[1:], strict=True):
            x = _upsample(x, fmap) + layer(fmap)
        return x


def _check_pyramid(pyramid: Sequence[torch.Tensor], channels: Sequence[int]) -> None:
    got = [int(f.shape[1]) for f in pyramid]
    if got != list(channels):
        raise ValueError(f"feature pyramid channels {got} (coarse to fine) do not match the head's {list(channels)}")


def build_head(kind: str, spatial_dims: int, in_channels: Sequence[int], num_classes: int) -> nn.Module:
    """``"nonlinear"`` (vox2vec FPNNonLinearHead, the paper's probing) or ``"linear"`` (FPNLinearHead)."""
    heads = {"nonlinear": FPNNonLinearHead, "linear": FPNLinearHead}
    if kind not in heads:
        raise ValueError(f"head={kind!r}; expected one of {sorted(heads)}")
    return heads[kind](spatial_dims, in_channels, num_classes)


class DiffusionProbeSegmenter(nn.Module):
    """Frozen diffusion backbone + multi-timestep features + trainable head: image → class logits.

    Args:
        extractor: the feature extractor; a ``frozen`` one gets ``requires_grad=False`` and stays in eval mode.
        head: the probing head (``in_channels == extractor.channels``).
        roi_size: window of the backbone on volumes larger than it (multiples of the backbone's size divisor).
        overlap: window overlap; window steps are rounded down to multiples of the backbone's size divisor.
        sw_batch_size: windows per backbone call.
        blend_mode: ``"constant"`` (features of overlapping windows averaged) or ``"gaussian"``.
        seed: noise seed in eval mode (same input → same output); training draws from the global generator.
        padding_mode: padding of the input up to a multiple of the size divisor (``diffseg.sliding.pad_spatial``:
            "replicate" = edge replication, not zeros, so a thin volume's window holds no empty slab).

    ``forward(x (B, image_channels + k, *S)) -> logits (B, num_classes, *S)``. With a frozen extractor ``train()``
    never leaves eval mode for the backbone, and the backbone runs without gradient, so only the head learns.
    """

    def __init__(
        self,
        extractor: DiffusionFeatureExtractor,
        head: nn.Module,
        roi_size: Sequence[int] | int = 64,
        overlap: float = 0.5,
        sw_batch_size: int = 1,
        blend_mode: str = "constant",
        seed: int | None = 0,
        padding_mode: str = "replicate",
    ) -> None:
        super().__init__()
        self.extractor, self.head = extractor, head
        if list(getattr(head, "in_channels", extractor.channels)) != extractor.channels:
            raise ValueError(f"head in_channels {head.in_channels} != feature channels {extractor.channels}")
        if extractor.frozen:
            self.extractor.requires_grad_(False)
            self.extractor.eval()
        self.roi_size, self.overlap, self.sw_batch_size = roi_size, overlap, sw_batch_size
        self.blend_mode, self.seed, self.padding_mode = blend_mode, seed, padding_mode

    @property
    def backbone(self) -> nn.Module:
        return self.extractor.backbone

    def train(self, mode: bool = True) -> DiffusionProbeSegmenter:
        super().train(mode)
        if self.extractor.frozen:
            self.extractor.eval()  # GroupNorm/dropout of the frozen backbone stay in inference mode
        return self

    def draw_noise(self, x: torch.Tensor, fresh: bool = False) -> torch.Tensor:
        """(B, len(times)·image_channels, *S): seeded in eval mode, from the global generator in training (or if
        ``fresh``)."""
        shape = (x.shape[0], len(self.extractor.times) * self.extractor.image_channels, *x.shape[2:])
        if fresh or self.training or self.seed is None:
            return torch.randn(shape, device=x.device, dtype=x.dtype)
        generator = torch.Generator().manual_seed(int(self.seed))
        return torch.randn(shape, generator=generator, dtype=x.dtype).to(x.device)

    def features(self, x: torch.Tensor, noise: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The (window-averaged) pyramid of ``x`` whose spatial size is a multiple of the size divisor."""
        noise = self.draw_noise(x) if noise is None else noise
        divisor = self.backbone.size_divisor
        roi = fit_window(self.roi_size, x.shape[2:], divisor)  # a thin volume: a window of its own (padded) depth
        if any(r % divisor for r in roi):
            raise ValueError(f"roi_size {roi} must be a multiple of the backbone's size divisor {divisor}")
        if roi == list(x.shape[2:]):
            return self.extractor(x, noise)
        # window steps rounded down to multiples of the divisor, so every pyramid level is cut between its voxels
        steps = [max(divisor, int(r * (1 - self.overlap)) // divisor * divisor) for r in roi]
        overlap = [1.0 - (s + 0.5) / r for s, r in zip(steps, roi, strict=True)]  # MONAI: step = int(r * (1 - o))
        channels = x.shape[1]

        def predictor(window: torch.Tensor) -> tuple[torch.Tensor, ...]:
            # finest first: MONAI 1.6.1 reuses the last resized weight map, so the full-size output must come first
            return tuple(self.extractor(window[:, :channels], window[:, channels:]))[::-1]

        out = sliding_window_inference(  # the extractor decides on gradients (none when frozen)
            torch.cat([x, noise], dim=1), roi, self.sw_batch_size, predictor, overlap, self.blend_mode,
        )  # fmt: skip
        return [_plain(f) for f in out][::-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        divisor = self.backbone.size_divisor
        padded, crop = pad_spatial(x, [-(-s // divisor) * divisor for s in x.shape[2:]], self.padding_mode)
        logits = self.head(self.features(padded))[crop]
        return convert_to_dst_type(logits, x)[0]  # a MetaTensor input's metadata travels on (Invertd / SaveImaged)


class ProbeLoss(nn.Module):
    """``ce_weight · CE(logits, y) + dice_weight · foreground Dice(softmax(logits), onehot(y))``.

    ``forward(logits (B, C, *S), label (B, 1, *S) integer classes) -> scalar``; the Dice term ignores classes absent
    from a sample (``diffseg.ForegroundDiceLoss``).
    """

    def __init__(self, num_classes: int, ce_weight: float = 1.0, dice_weight: float = 1.0) -> None:
        super().__init__()
        self.num_classes, self.ce_weight, self.dice_weight = num_classes, ce_weight, dice_weight
        self.dice = ForegroundDiceLoss()

    def forward(self, logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        logits, label = _plain(logits), _plain(label).long()
        loss = self.ce_weight * F.cross_entropy(logits, label[:, 0])
        if self.dice_weight:
            onehot = one_hot(label, self.num_classes, dim=1).to(logits.dtype)
            loss = loss + self.dice_weight * self.dice(torch.softmax(logits, dim=1), onehot)
        return loss


class CachedFeaturePrepareBatch:
    """``prepare_batch`` of ``SupervisedTrainer(network=segmenter.head)`` for whole-volume batches (CPU option).

    The first time a volume is seen (key: its file name), its window-averaged feature pyramid is computed with the
    frozen backbone for ``draws`` independent noise draws (torch's global generator, so a seeded run is reproducible)
    and kept. Each call picks one draw uniformly (global generator; paper 004 draws fresh noise every batch, and
    inference meets yet another seeded draw, so one cached draw would let the head fit that draw's noise) and returns
    crops of its pyramid and of the label: with probability
    ``foreground_ratio`` the crop contains a random voxel of a randomly chosen foreground class present in the
    volume, otherwise it is placed uniformly (vox2vec's sampling); crop corners are multiples of the backbone's size
    divisor so every pyramid level is cropped exactly.

    Args:
        segmenter: the :class:`DiffusionProbeSegmenter` (its ``features`` are used; its head is what trains).
        patch_size: crop size in voxels (multiples of the size divisor).
        num_samples: crops per call (stacked on the batch axis).
        foreground_ratio: share of foreground-anchored crops.
        image_key, label_key: batch keys.
        draws: noise draws cached per volume (1 = one draw, as before).
        augment: applied to the image channels (C_img, *S) before each draw (e.g. MONAI's ``RandShiftIntensity``), so
            the draws differ in intensity as well as in noise; the coordinate channels are left as they are.
        view: a random dict transform of ``{image_key: (C, *S), label_key: (1, *S)}`` applied before each draw (e.g.
            MONAI's ``RandSpatialCropd`` with ``random_size``), so that each draw sees the volume in its own field of
            view: the window-averaged features of a voxel depend on the windows' context (how much air, how many
            slices), and a head fitted on one field of view reads another one's features badly.

    Returns ``(pyramid crops [coarse … fine], label crops (num_samples, 1, *patch))``; batches hold one volume.

    Memory per volume of N voxels (after padding to the size divisor) with backbone channels c_0 … c_{L-1} (fine to
    coarse): ``draws · 4 B · len(times) · Σ_l c_l · N / 8^l`` (float32). Demo backbone (16, 32, 64, 128), 3 times:
    255 B per voxel per draw, i.e. 0.38 GB per draw for the whole patient A (128×104×112 after padding) and 3 GB for
    8 draws; ``crop_to_labels`` shrinks N to the labelled box.
    """

    def __init__(
        self,
        segmenter: DiffusionProbeSegmenter,
        patch_size: Sequence[int],
        num_samples: int = 1,
        foreground_ratio: float = 0.5,
        image_key: str = "image",
        label_key: str = "label",
        draws: int = 8,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
        view: Callable[[dict], dict] | None = None,
    ) -> None:
        if draws < 1:
            raise ValueError(f"draws={draws} must be >= 1")
        self.segmenter, self.patch_size, self.draws = segmenter, [int(p) for p in patch_size], int(draws)
        divisor = segmenter.backbone.size_divisor
        if any(p % divisor for p in self.patch_size):
            raise ValueError(f"patch_size {self.patch_size} must be a multiple of the size divisor {divisor}")
        self.num_samples, self.foreground_ratio, self.augment = num_samples, foreground_ratio, augment
        self.view, self.image_key, self.label_key = view, image_key, label_key
        # file name → per draw: (pyramid [coarse … fine], its padded label, class voxels)
        self.cache: dict[str, list[tuple[list[torch.Tensor], torch.Tensor, dict[int, torch.Tensor]]]] = {}
        self.last_draw = 0  # the draw the last batch was cropped from

    def volume(self, image: torch.Tensor, label: torch.Tensor) -> tuple[list[list[torch.Tensor]], list[torch.Tensor]]:
        """(``draws`` pyramids, their labels) of one whole volume (1, C, *S): each draw's ``view`` of it (the whole
        volume without one), padded to a multiple of the size divisor and at least ``patch_size``; image and label
        padded alike (``segmenter.padding_mode``, edge replication)."""
        for transform in (self.augment, self.view):
            if isinstance(transform, Randomizable):  # seeded from the global generator, like the noise
                transform.set_random_state(seed=int(torch.randint(2**31 - 1, ())))
        divisor, mode = self.segmenter.backbone.size_divisor, self.segmenter.padding_mode
        pyramids, labels = [], []
        for _ in range(self.draws):
            img, lab = image, label
            if self.view is not None:
                viewed = self.view({self.image_key: _plain(image[0]), self.label_key: _plain(label[0])})
                img, lab = (_plain(viewed[k])[None].to(image.device) for k in (self.image_key, self.label_key))
            shape = img.shape[2:]
            target = [max(-(-s // divisor) * divisor, p) for s, p in zip(shape, self.patch_size, strict=True)]
            x = self.augmented(pad_spatial(img, target, mode)[0])
            pyramids.append([f.detach() for f in self.segmenter.features(x, self.segmenter.draw_noise(x, fresh=True))])
            labels.append(pad_spatial(lab, target, mode)[0])
        return pyramids, labels

    def augmented(self, image: torch.Tensor) -> torch.Tensor:
        """(1, C, *S) with ``augment`` applied to the first ``image_channels`` channels (as it is without one)."""
        if self.augment is None:
            return image
        x, ic = _plain(image), self.segmenter.extractor.image_channels
        channels = convert_to_tensor(self.augment(x[0, :ic]), track_meta=False).to(x)
        return torch.cat([channels[None], x[:, ic:]], dim=1)

    @staticmethod
    def class_voxels(label: torch.Tensor) -> dict[int, torch.Tensor]:
        """Voxel indices (N, spatial dims) of every foreground class present in a (1, 1, *S) label."""
        return {int(c): torch.nonzero(label[0, 0] == c) for c in torch.unique(label) if int(c) > 0}

    def crop_start(
        self, size: Sequence[int], class_voxels: dict[int, torch.Tensor], generator: torch.Generator | None = None
    ) -> list[int]:
        """Corner of the next crop in a volume of spatial ``size``, a multiple of the size divisor."""
        size, patch = list(size), self.patch_size
        divisor = self.segmenter.backbone.size_divisor
        present = sorted(class_voxels)
        if present and float(torch.rand((), generator=generator)) < self.foreground_ratio:
            cls = present[int(torch.randint(len(present), (), generator=generator))]
            voxels = class_voxels[cls]
            anchor = voxels[int(torch.randint(len(voxels), (), generator=generator))].tolist()
            # any corner whose crop contains the anchor
            low = [max(0, a - p + 1) for a, p in zip(anchor, patch, strict=True)]
            high = [min(a, s - p) for a, s, p in zip(anchor, size, patch, strict=True)]
            start = [
                lo + int(torch.randint(max(hi - lo + 1, 1), (), generator=generator))
                for lo, hi in zip(low, high, strict=True)
            ]
            return [min((st // divisor) * divisor, s - p) for st, s, p in zip(start, size, patch, strict=True)]
        return [
            int(torch.randint((s - p) // divisor + 1, (), generator=generator)) * divisor
            for s, p in zip(size, patch, strict=True)
        ]

    def __call__(self, batchdata, device=None, non_blocking: bool = False, **kwargs):
        image, label = batchdata[self.image_key], batchdata[self.label_key]
        if image.shape[0] != 1:
            raise ValueError(f"feature cache batches must hold one whole volume, got batch size {image.shape[0]}")
        key = str(getattr(image, "meta", {}).get("filename_or_obj", ["volume"])[0])
        if key not in self.cache:
            pyramids, padded_labels = self.volume(image.to(device), label.to(device))
            self.cache[key] = [(p, y, self.class_voxels(y)) for p, y in zip(pyramids, padded_labels, strict=True)]
        draws = self.cache[key]
        self.last_draw = int(torch.randint(len(draws), ())) if len(draws) > 1 else 0
        pyramid, full_label, class_voxels = draws[self.last_draw]
        factor = self.segmenter.backbone.size_divisor
        crops: list[list[torch.Tensor]] = [[] for _ in pyramid]
        labels = []
        for _ in range(self.num_samples):
            start = self.crop_start(full_label.shape[2:], class_voxels)
            for level, fmap in enumerate(pyramid):
                scale = factor // 2**level  # level 0 is the coarsest
                box = [slice(st // scale, (st + p) // scale) for st, p in zip(start, self.patch_size, strict=True)]
                crops[level].append(fmap[(slice(None), slice(None), *box)])
            labels.append(
                full_label[
                    (
                        slice(None),
                        slice(None),
                        *(slice(st, st + p) for st, p in zip(start, self.patch_size, strict=True)),
                    )
                ]
            )
        return [torch.cat(c) for c in crops], torch.cat(labels).to(device)
