"""The suite fails on a deprecation warning raised from the pack's own code (pyproject's filterwarnings),
while libraries' warnings about their own internals stay warnings."""
from __future__ import annotations

import warnings

import pytest


@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning, PendingDeprecationWarning])
def test_a_deprecation_from_our_code_is_an_error(category):
    with pytest.raises(category):
        warnings.warn_explicit("old API", category, "samplers/emu35.py", 1, module="gentor.samplers.emu35")


def test_a_librarys_own_deprecation_stays_a_warning():
    with pytest.warns(FutureWarning):
        warnings.warn_explicit("old API", FutureWarning, "transformers/x.py", 1, module="transformers.models.x")
