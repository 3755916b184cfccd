"""Running a script of Triton kernels on the CPU: Triton's interpreter (TRITON_INTERPRET=1) must be switched on before
triton is imported, so each check runs in a fresh Python process, from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_in_triton_interpreter(script: str, timeout: int) -> str:
    """`script` run by `python -c` under Triton's interpreter; its standard output, after asserting it exited 0."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
