"""Builds the optional C kernel of the fused CPU loss; everything else is declared in setup.cfg.

`optional=True`: without a C compiler (or OpenMP) the install still succeeds and the loss runs its torch path.
"""

import hashlib
from pathlib import Path

from setuptools import Extension, setup

SOURCE = "fastai_ls/loss/fused_cpu.c"
# The library records which source it was built from: fastai_ls/loss/cpu_kernel.py refuses one built from another
# version of the file (a build left over from before a pull), rather than call it with a signature it does not have.
SOURCE_SHA256 = hashlib.sha256((Path(__file__).parent / SOURCE).read_bytes()).hexdigest()

setup(
    ext_modules=[
        Extension(
            "fastai_ls.loss._fused_cpu",
            sources=[SOURCE],
            define_macros=[("FUSED_CPU_SOURCE_SHA256", f'"{SOURCE_SHA256}"')],
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            libraries=["m"],
            optional=True,
        )
    ]
)
