"""Moved to `fastai_ls.loss.modules`; importing from here still works for one release, with a `FutureWarning`."""

from fastai_ls._deprecation import moved_module

__getattr__ = moved_module("fastai_ls.losses", "fastai_ls.loss.modules")
