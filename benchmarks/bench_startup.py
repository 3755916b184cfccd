"""Start-up time of the command and the package: the median wall time of fresh interpreters running each command.

    python benchmarks/bench_startup.py [--reps 7]

`fastai-ls --help` and `import fastai_ls` load neither torch nor fastai (target: `--help` under 1 s); the last row,
a public name that needs fastai, is the cost they defer to the first use.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from report import add_report_argument, report_to  # benchmarks/report.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "python -m fastai_ls --help  (fastai-ls --help)": [sys.executable, "-m", "fastai_ls", "--help"],
    "python -m fastai_ls demo --help": [sys.executable, "-m", "fastai_ls", "demo", "--help"],
    'python -c "import fastai_ls"': [sys.executable, "-c", "import fastai_ls"],
    'python -c "import fastai_ls; fastai_ls.pets_learner"': [sys.executable, "-c",
                                                             "import fastai_ls; fastai_ls.pets_learner"],
}


def median_seconds(command: list[str], reps: int) -> float:
    # This checkout's fastai_ls, whatever is installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7, help="runs per command (default 7)")
    add_report_argument(parser)
    args = parser.parse_args()
    with report_to(args.report, "Start-up time (`benchmarks/bench_startup.py`)"):
        print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs; median of {args.reps} fresh processes each")
        for name, command in COMMANDS.items():
            print(f"{name:<56}{median_seconds(command, args.reps):8.3f} s")


if __name__ == "__main__":
    main()
