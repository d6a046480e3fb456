"""diffseg.transforms.SelectTransformd: one pre-processing per datalist entry, chosen by a key."""

from __future__ import annotations

import pytest

from diffseg import SelectTransformd


def test_select_transformd_applies_the_named_transform_and_the_default():
    select = SelectTransformd("modality", {"CT": lambda d: {**d, "x": "hu"}, "MR": lambda d: {**d, "x": "pct"}}, "CT")
    assert select({"modality": "MR"})["x"] == "pct"
    assert select({"modality": "CT"})["x"] == "hu" and select({})["x"] == "hu"


def test_select_transformd_names_the_unknown_choice():
    select = SelectTransformd("modality", {"CT": dict}, "CT")
    with pytest.raises(ValueError, match="modality='US': expected one of \\['CT'\\]"):
        select({"modality": "US"})
    with pytest.raises(ValueError, match="default='MR' is not one of the transforms' names \\['CT'\\]"):
        SelectTransformd("modality", {"CT": dict}, "MR")
