"""Mask codecs: round trips and the ImgX logits ↔ x conversions."""

from __future__ import annotations

import pytest
import torch

from diffseg.codecs import BinaryCodec, OneHotCodec, logits_to_x, x_to_logits


def test_onehot_round_trip_3d():
    codec = OneHotCodec(4)
    label = torch.randint(0, 4, (2, 1, 5, 6, 7))
    x = codec.encode(label)
    assert x.shape == (2, 4, 5, 6, 7)
    assert set(x.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(x.sum(1), torch.full((2, 5, 6, 7), -2.0))  # one +1 and three -1 per voxel
    assert torch.equal(codec.to_labels(codec.decode(x)), label)


def test_onehot_decode_is_softmax_for_x_from_logits():
    codec = OneHotCodec(3)
    logits = torch.randn(2, 3, 4, 4)
    x = codec.logits_to_x(logits)
    torch.testing.assert_close(x, logits_to_x(logits))
    torch.testing.assert_close(codec.decode(x), torch.softmax(logits, 1))
    torch.testing.assert_close(torch.softmax(x_to_logits(x), 1), torch.softmax(logits, 1), rtol=1e-5, atol=1e-6)


def test_onehot_project_renormalises():
    codec = OneHotCodec(2)
    x = torch.tensor([[[[2.0]], [[-0.5]]]])  # p = clamp([1.5, 0.25]) = [1, 0.25] → [0.8, 0.2]
    torch.testing.assert_close(codec.decode(x).flatten(), torch.tensor([0.8, 0.2]))
    torch.testing.assert_close(codec.project(x).flatten(), torch.tensor([0.6, -0.6]))


@pytest.mark.parametrize("channels", [1, 3])
def test_binary_round_trip(channels):
    codec = BinaryCodec(channels)
    label = torch.randint(0, 3, (2, 1, 8, 8))  # any label > 0 is foreground
    x = codec.encode(label)
    assert x.shape == (2, channels, 8, 8)
    probs = codec.decode(x)
    assert probs.shape == (2, 2, 8, 8)
    assert torch.equal(codec.to_labels(probs), (label > 0).long())


def test_binary_decode_means_rgb_channels():
    codec = BinaryCodec(3)
    x = torch.tensor([1.0, 0.0, -3.0]).reshape(1, 3, 1, 1)  # p per channel = 1, 0.5, 0 → mean 0.5
    assert codec.decode(x)[0, 1].item() == pytest.approx(0.5)


def test_bad_labels_are_rejected():
    with pytest.raises(ValueError, match=r"label values must lie in \[0, 2\]"):
        OneHotCodec(3).encode(torch.tensor([[[0, 3]]]).unsqueeze(0))
    with pytest.raises(ValueError, match="one channel"):
        OneHotCodec(3).encode(torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="num_classes=1"):
        OneHotCodec(1)
