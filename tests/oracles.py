"""The optional independent references of the tests (the `test` extra installs them): each is imported when a test
first uses it, and that test alone is skipped where the package is missing, so a missing oracle never stops the
collection of the suite nor skips the tests that do not need it."""

from __future__ import annotations

from typing import Any

import pytest


class OptionalModule:
    """A module imported on first attribute access, through `pytest.importorskip`."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attribute: str) -> Any:
        return getattr(pytest.importorskip(self._name), attribute)


relplot = OptionalModule("relplot")
uncertainty_calibration = OptionalModule("calibration")  # the uncertainty-calibration package (Kumar et al. 2019)
torchmetrics_classification = OptionalModule("torchmetrics.functional.classification")


def multiclass_calibration_error(*args: Any, **kwargs: Any) -> Any:
    """torchmetrics' `multiclass_calibration_error`."""
    return torchmetrics_classification.multiclass_calibration_error(*args, **kwargs)
