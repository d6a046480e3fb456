"""Ensemble aggregation of diffusion samples."""

from __future__ import annotations

import pytest
import torch

from diffseg.ensembles import aggregate, majority_vote, mean_probabilities


def _samples():
    # B=1, N=3, C=3, one voxel: sample argmaxes 1, 1, 2; mean probabilities favour class 2
    p = torch.tensor([[0.1, 0.5, 0.4], [0.1, 0.45, 0.45 - 1e-3], [0.0, 0.02, 0.98]])
    return p.reshape(1, 3, 3, 1)


def test_mean_probabilities():
    torch.testing.assert_close(mean_probabilities(_samples()).flatten(), _samples()[0].mean(0).flatten())
    assert int(mean_probabilities(_samples()).argmax(1)) == 2


def test_majority_vote_counts_argmax_masks():
    votes = majority_vote(_samples()).flatten()
    torch.testing.assert_close(votes, torch.tensor([0.0, 2 / 3, 1 / 3]))
    assert int(votes.argmax()) == 1  # the vote and the mean disagree here, as they may


def test_unknown_aggregation():
    with pytest.raises(ValueError, match="aggregation='staple'"):
        aggregate(_samples(), "staple")
