"""The `fastai-ls` command (also `python -m fastai_ls`): the parser and its subcommands in `main.py`, the demo's
training and report in `demo.py`."""

from fastai_ls.cli.main import main

__all__ = ["main"]
