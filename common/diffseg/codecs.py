"""Mask codecs: label maps ↔ the {-1,+1} diffusion space ("scaled probabilities", ImgX-DiffSeg), and back.

A codec fixes how a segmentation is represented while it diffuses:

- :class:`OneHotCodec` — multiclass: C channels (background included), ``x = onehot·2 - 1``; logits → x by
  ``softmax·2 - 1`` (ImgX, paper 000).
- :class:`BinaryCodec` — binary foreground repeated to ``channels`` channels, ``x = mask·2 - 1`` (SegDiff: 1 channel;
  SDSeg: 3 channels fed to an RGB autoencoder); probability = mean over channels of ``clamp((x+1)/2, 0, 1)``.

Both decode to per-class probabilities ``(B, num_classes, *S)`` whose argmax is the label map.
"""

from __future__ import annotations

import torch
from monai.networks.utils import one_hot

__all__ = ["EPS", "BinaryCodec", "MaskCodec", "OneHotCodec", "logits_to_x", "x_to_logits"]

EPS = 1e-7  # floor of probabilities before a log (ImgX clips to [EPS, 1])


def logits_to_x(logits: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """``softmax(logits)·2 - 1``: class logits (B, C, *S) → x in [-1, 1]."""
    return torch.softmax(logits, dim=dim) * 2 - 1


def x_to_logits(x: torch.Tensor) -> torch.Tensor:
    """``log(clip((x+1)/2, EPS, 1))``: x (B, C, *S) → logits whose softmax renormalises the clipped probabilities."""
    return torch.log(torch.clamp((x + 1) / 2, EPS, 1.0))


class MaskCodec:
    """Interface of a codec; ``channels`` = channels of x, ``num_classes`` = channels of the decoded probabilities."""

    channels: int
    num_classes: int

    def encode(self, label: torch.Tensor) -> torch.Tensor:
        """Label map (B, 1, *S) of class indices → x0 (B, channels, *S) in {-1, +1}."""
        raise NotImplementedError

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, channels, *S) → probabilities (B, num_classes, *S) that sum to 1 over classes."""
        raise NotImplementedError

    def logits_to_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Network logits (B, channels, *S) → probabilities (B, num_classes, *S)."""
        raise NotImplementedError

    def probs_to_x(self, probs: torch.Tensor) -> torch.Tensor:
        """Probabilities (B, num_classes, *S) → x (B, channels, *S) in [-1, 1]."""
        raise NotImplementedError

    def logits_to_x(self, logits: torch.Tensor) -> torch.Tensor:
        """Network logits → x in [-1, 1] (ImgX's ``logits_to_x`` for the one-hot codec)."""
        return self.probs_to_x(self.logits_to_probs(logits))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Any x (e.g. x̂0 recovered from ε̂) → the nearest valid mask estimate: ``probs_to_x(decode(x))``."""
        return self.probs_to_x(self.decode(x))

    def onehot(self, label: torch.Tensor) -> torch.Tensor:
        """Label map (B, 1, *S) → float one-hot (B, num_classes, *S) in {0, 1}."""
        return one_hot(label.long(), self.num_classes, dtype=torch.float32, dim=1)

    @staticmethod
    def to_labels(probs: torch.Tensor) -> torch.Tensor:
        """Probabilities (B, C, *S) → label map (B, 1, *S) by argmax."""
        return torch.argmax(probs, dim=1, keepdim=True)


class OneHotCodec(MaskCodec):
    """Multiclass codec: ``x = onehot(label)·2 - 1`` with one channel per class, background included.

    Args:
        num_classes: C, background included.
    """

    def __init__(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes={num_classes} must be >= 2 (background + at least one class)")
        self.num_classes = self.channels = num_classes

    def encode(self, label: torch.Tensor) -> torch.Tensor:
        if label.shape[1] != 1:
            raise ValueError(f"label must have one channel of class indices, got shape {tuple(label.shape)}")
        if label.numel() and (label.min() < 0 or label.max() >= self.num_classes):
            lo, hi = label.min().item(), label.max().item()
            raise ValueError(f"label values must lie in [0, {self.num_classes - 1}], got [{lo}, {hi}]")
        return self.onehot(label) * 2 - 1

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.clamp((x + 1) / 2, 0.0, 1.0)
        return p / p.sum(dim=1, keepdim=True).clamp_min(EPS)

    def logits_to_probs(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=1)

    def probs_to_x(self, probs: torch.Tensor) -> torch.Tensor:
        return probs * 2 - 1


class BinaryCodec(MaskCodec):
    """Binary codec: foreground ``label > 0`` as ``mask·2 - 1`` repeated to ``channels`` channels.

    Decoded probabilities have 2 classes: (background, foreground). Network logits have 1 channel per x channel
    (sigmoid), so ``logits_to_x = tanh(logits/2)``.

    Args:
        channels: channels of x (SegDiff 1, SDSeg 3 for an RGB autoencoder).
    """

    num_classes = 2

    def __init__(self, channels: int = 1) -> None:
        if channels < 1:
            raise ValueError(f"channels={channels} must be >= 1")
        self.channels = channels

    def encode(self, label: torch.Tensor) -> torch.Tensor:
        if label.shape[1] != 1:
            raise ValueError(f"label must have one channel, got shape {tuple(label.shape)}")
        x = (label > 0).float() * 2 - 1
        return x.expand(-1, self.channels, *x.shape[2:]).contiguous()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        fg = torch.clamp((x + 1) / 2, 0.0, 1.0).mean(dim=1, keepdim=True)
        return torch.cat([1 - fg, fg], dim=1)

    def logits_to_probs(self, logits: torch.Tensor) -> torch.Tensor:
        fg = torch.sigmoid(logits).mean(dim=1, keepdim=True)
        return torch.cat([1 - fg, fg], dim=1)

    def probs_to_x(self, probs: torch.Tensor) -> torch.Tensor:
        x = probs[:, 1:2] * 2 - 1
        return x.expand(-1, self.channels, *x.shape[2:]).contiguous()
