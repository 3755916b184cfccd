"""The old home of the scaling calibrators, which now live one family to a module (`temperature.py`, `vector.py`,
`matrix.py`, `ets.py`, with their solver in `solver.py`): calibrators pickled before the move name this module and
still load, with a FutureWarning."""

from fastai_ls._deprecation import moved_module

__getattr__ = moved_module(__name__, "fastai_ls.calibration.calibrators")
