"""Builds the optional C kernel of the fused CPU loss; everything else is declared in setup.cfg.

`optional=True`: without a C compiler (or OpenMP) the install still succeeds and the loss runs its torch path.
"""

import hashlib
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
SOURCE = "fastai_ls/loss/backends/fused_cpu.c"
# The library records which source it was built from: fastai_ls/loss/backends/c_kernel.py refuses one built from another
# version of the file (a build left over from before a pull), rather than call it with a signature it does not have.
SOURCE_SHA256 = hashlib.sha256((HERE / SOURCE).read_bytes()).hexdigest()


class BuildExtRecordingHashes(build_ext):
    """build_ext that writes the SHA-256 of each library it built beside it (`<library>.sha256`): c_kernel.py loads
    no library whose bytes differ from it (damaged code would kill the process, SIGILL, instead of raising)."""

    def run(self):
        super().run()
        for ext in self.extensions:
            name = self.get_ext_filename(self.get_ext_fullname(ext.name))
            built = Path(self.build_lib) / name
            if not built.is_file():  # optional, and not built (no C compiler)
                continue
            data = built.read_bytes()
            record = (hashlib.sha256(data).hexdigest() + "\n").encode()
            built.with_name(built.name + ".sha256").write_bytes(record)
            # --inplace and editable installs copy the library beside the sources: record that copy too, if it is one.
            copy = HERE / name
            if copy.is_file() and copy.read_bytes() == data:
                copy.with_name(copy.name + ".sha256").write_bytes(record)


setup(
    cmdclass={"build_ext": BuildExtRecordingHashes},
    ext_modules=[
        Extension(
            "fastai_ls.loss.backends._fused_cpu",
            sources=[SOURCE],
            define_macros=[("FUSED_CPU_SOURCE_SHA256", f'"{SOURCE_SHA256}"')],
            extra_compile_args=["-O3", "-fopenmp"],
            extra_link_args=["-fopenmp"],
            libraries=["m"],
            optional=True,
        )
    ]
)
