"""Small generated data sets, so that every fastai code path runs on a CPU without any download."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import numpy as np
import pytest
from PIL import Image

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def make_colour_images(folder: Path, per_class: int = 20, size: int = 16, seed: int = 0) -> Path:
    """`folder/<colour>/<colour>_<i>.png`: a noisy square of the class colour on a grey background."""
    rng = np.random.default_rng(seed)
    for name, rgb in COLOURS.items():
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = rng.integers(60, 120, (size, size, 3)).astype(np.uint8)
            lo = rng.integers(0, size // 2)
            img[lo:lo + size // 2, lo:lo + size // 2] = np.clip(np.array(rgb) + rng.integers(-20, 20, 3), 0, 255)
            Image.fromarray(img).save(folder / name / f"{name}_{i}.png")
    return folder


@pytest.fixture(scope="session")
def colour_images(tmp_path_factory) -> Path:
    return make_colour_images(tmp_path_factory.mktemp("colours"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def free_port():
    """Call it for a TCP port on the loopback interface that nothing listens on now (a process group's)."""
    return _free_port


@pytest.fixture(scope="session")
def torchrun(free_port):
    """Call it for the command that launches what follows it in 2 processes with torchrun, on a free port."""
    return lambda: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                    "127.0.0.1", "--master_port", str(free_port())]
