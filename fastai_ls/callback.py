"""Moved to `fastai_ls.integration.callback`; importing from here still works for one release, with a
`FutureWarning`."""

from fastai_ls._deprecation import moved_module

__getattr__ = moved_module("fastai_ls.callback", "fastai_ls.integration.callback")
