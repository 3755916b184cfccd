"""The names of the post-hoc calibration methods, in their order: the registry
`fastai_ls.calibration.calibrators.CALIBRATORS` is built from this tuple, and the `fastai-ls` command's parser lists
and checks `--methods` with it before any subcommand imports torch (this module imports nothing)."""

__all__ = ["CALIBRATOR_NAMES"]

CALIBRATOR_NAMES = ("temperature", "vector", "matrix", "dirichlet", "isotonic", "top_label_isotonic", "histogram",
                    "ets")
