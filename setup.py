"""Builds the optional C kernel of the fused CPU loss; everything else is declared in setup.cfg.

`optional=True`: without a C compiler (or OpenMP) the install still succeeds and the loss runs its torch path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "fastai_ls.loss._fused_cpu",
            sources=["fastai_ls/loss/fused_cpu.c"],
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            libraries=["m"],
            optional=True,
        )
    ]
)
