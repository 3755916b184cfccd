"""One home per argument check (`fastai_ls.validation`): each check is defined once, every entry point that takes
class ids refuses the same dtypes with the same message, and the option checks load no torch (the command runs them
first)."""

from __future__ import annotations

import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastai_ls.validation as validation
from fastai_ls import CalibrationState, calibration_error, calibration_metrics, compare_confidence_scores
from fastai_ls.calibration.calibrators import TemperatureScaling
from fastai_ls.calibration.compare import compare_calibrators
from fastai_ls.validation import check_class_ids, check_folds, checked_ignore_index, is_class_id_dtype

PACKAGE = Path(validation.__file__).resolve().parents[1]
N, C = 12, 3
REFUSED = [torch.float32, torch.float64, torch.float16, torch.bool, torch.complex64]


def ids(dtype: torch.dtype) -> torch.Tensor:
    return (torch.arange(N) % C).to(dtype)


def probs() -> torch.Tensor:
    return torch.full((N, C), 1 / C)


def logits() -> torch.Tensor:
    informative = torch.nn.functional.one_hot(torch.arange(N) % C, C)  # a temperature well inside its bounds
    return torch.randn(N, C, generator=torch.Generator().manual_seed(0)) + informative


# Every entry point of the math layer that takes class ids, and what it calls them.
ENTRY_POINTS = {
    "calibration_metrics": (lambda y: calibration_metrics(probs(), y), "target"),
    "calibration_error": (lambda y: calibration_error(probs(), y), "target"),
    "CalibrationState.update": (lambda y: CalibrationState(C).update(probs(), y), "target"),
    "Calibrator.fit": (lambda y: TemperatureScaling().fit(logits(), y), "target"),
    "compare_calibrators": (lambda y: compare_calibrators(logits(), y, methods=["temperature"], folds=2, ci=None),
                            "target"),
    "compare_confidence_scores": (lambda y: compare_confidence_scores(logits(), y), "targets"),
}


@pytest.mark.parametrize("dtype", REFUSED, ids=str)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_refuses_non_integer_class_ids_with_the_same_message(entry, dtype):
    call, name = ENTRY_POINTS[entry]
    with pytest.raises(ValueError, match=rf"^{name} must hold {N} integer class ids\b.* got {dtype} \({N},\)"):
        call(ids(dtype))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_takes_every_integer_dtype(entry):
    call, _ = ENTRY_POINTS[entry]
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        call(ids(dtype))


def test_the_class_id_dtypes_are_the_integer_dtypes():
    integers = {torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.uint16, torch.uint32,
                torch.uint64}
    others = {torch.bool, torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64,
              torch.complex128}
    assert all(is_class_id_dtype(dtype) for dtype in integers)
    assert not any(is_class_id_dtype(dtype) for dtype in others)


def test_the_fastai_layer_refuses_complex_class_ids_as_it_refuses_float_ones():
    pytest.importorskip("fastai")
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner

    from fastai_ls import CalibrationCallback
    from fastai_ls.integration.posthoc import holdout_logits

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.complex64):
        items = [(torch.randn(4, generator=g), torch.tensor(i % C).to(dtype)) for i in range(32)]
        dls = DataLoaders.from_dsets(items, items, bs=8, num_workers=0, device="cpu")
        learn = Learner(dls, torch.nn.Linear(4, C), loss_func=lambda pred, target: pred.float().mean())
        with pytest.raises(ValueError, match="post-hoc calibration needs integer class-id targets, got " + str(dtype)):
            holdout_logits(learn)
        learn = Learner(dls, torch.nn.Linear(4, C), loss_func=lambda pred, target: pred.float().mean(),
                        cbs=CalibrationCallback())
        with learn.no_bar(), learn.no_logging(), pytest.raises(ValueError, match="integer class-id targets"):
            learn.validate()


def test_class_ids_in_a_column_or_one_per_row_come_out_as_int64():
    column = torch.tensor([[2], [0], [1]], dtype=torch.int16)
    got = check_class_ids(column, 3, n_classes=3)
    assert got.dtype == torch.int64 and got.tolist() == [2, 0, 1] and column.dtype == torch.int16
    with pytest.raises(ValueError, match=r"must hold 3 integer class ids \(one per row of logits\), got torch.int16"):
        check_class_ids(column, 3, rows="logits", column=False)


def test_out_of_range_ids_are_counted_and_ignore_index_skips_them():
    target = torch.tensor([0, 5, -100, 2])
    with pytest.raises(ValueError, match=r"^2 targets are not class ids in \[0, 3\) \(e\.g\. 5\)$"):
        check_class_ids(target, 4, n_classes=3)
    with pytest.raises(ValueError, match=r"^targets hold 1 class ids outside \[0, 3\) \(first: 5 in row 1\); drop it$"):
        check_class_ids(target, 4, n_classes=3, ignore_index=-100, name="targets", column=False, fix="drop it")
    assert check_class_ids(target.clone().clamp(max=2), 4, n_classes=3, ignore_index=-100).tolist() == [0, 2, -100, 2]


def test_uint64_ids_beyond_int64_are_out_of_range_not_negative():
    huge = torch.tensor([0, 2**63 + 100], dtype=torch.uint64)  # wraps to a negative int64
    with pytest.raises(ValueError, match=r"one >= 2\*\*63 - 1"):
        check_class_ids(huge, 2, n_classes=3, ignore_index=-(2**63) + 100)


@pytest.mark.parametrize("value", [True, 1.0, 2**63, torch.tensor(1.0)])
def test_ignore_index_must_be_an_int64_integer(value):
    with pytest.raises(ValueError, match="ignore_index must be an int"):
        checked_ignore_index(value)


def test_the_fold_check_advises_the_fewest_folds_that_work():
    for n in range(2, 60):
        for n_classes in range(1, 30):
            for folds in range(2, n + 1):
                works = n - math.ceil(n / folds) >= n_classes
                try:
                    check_folds(n, n_classes, folds)
                except ValueError as err:
                    assert not works
                    if n > n_classes:
                        enough = int(str(err).split("use folds=")[1].split()[0])
                        check_folds(n, n_classes, enough)
                        assert enough == folds + 1 or n - math.ceil(n / (enough - 1)) < n_classes
                else:
                    assert works


def test_the_command_spells_the_option_as_it_is_typed():
    with pytest.raises(ValueError, match="^--folds 5 fits each calibrator on 4 of the 5 folds") as info:
        check_folds(12, 10, 5, option="--folds")
    assert "folds=" not in str(info.value)
    with pytest.raises(ValueError, match="^--folds 6 is more than the 5 rows: use at most --folds 5$"):
        check_folds(5, 2, 6, option="--folds")


def test_the_option_checks_load_no_torch():
    code = ("import sys\nfrom fastai_ls.validation import check_ci, check_folds, check_int, check_number, check_seed\n"
            "from fastai_ls.calibrator_names import CALIBRATOR_NAMES\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'numpy', 'fastai'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# Each shared check and its one home (the command passes `option="--folds"` to spell the option as typed).
HOMES = {
    **dict.fromkeys(["check_int", "check_number", "check_ci", "check_seed", "check_interval_grid", "check_folds"],
                    "validation/scalars.py"),
    **dict.fromkeys(["check_logits", "check_class_ids", "checked_ignore_index", "is_class_id_dtype"],
                    "validation/tensors.py"),
}


def test_each_shared_check_is_defined_in_fastai_ls_validation_alone():
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.lstrip("_") in HOMES:
                found.setdefault(node.name.lstrip("_"), []).append(path.relative_to(PACKAGE).as_posix())
    want = {name: [home] for name, home in HOMES.items()}
    assert found == want


def test_the_package_exports_each_check_from_its_module():
    assert sorted(validation.__all__) == sorted(set(HOMES) | {"plain", "compute_dtype", "upcast"})
    for name, module in validation._SOURCES.items():
        assert getattr(validation, name).__module__ == module
    assert sorted(validation._SOURCES) == sorted(validation.__all__)
