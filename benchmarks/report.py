"""Benchmark reports: what a benchmark script printed, written as a page of `docs/benchmarks/` together with the
command, the date and the machine (and its load, which says whether the timings are quiet or loaded).

Each script takes `--report PATH`; without it, it only prints."""

from __future__ import annotations

import io
import os
import platform
import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["add_report_argument", "report_to", "machine_description"]


def add_report_argument(parser) -> None:
    """Add `--report PATH` to a benchmark's argparse parser."""
    parser.add_argument("--report", metavar="PATH", help="also write what is printed, with the command, the date "
                        "and the machine, to this markdown file (e.g. docs/benchmarks/NAME.md)")


def machine_description() -> str:
    """CPU model and cores, Python, torch and the GPU if there is one."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"
    torch = sys.modules.get("torch")
    if torch is not None:
        text += f", torch {torch.__version__} ({torch.get_num_threads()} threads)"
        if torch.cuda.is_available():
            text += f", {torch.cuda.get_device_name()}"
    return text


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def _load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "unknown"


def _load_verdict() -> str:
    """Whether the last minute's load average per core says the machine was quiet (a benchmark alone on it reads
    up to about 0.75 per core in the minute after another run of its own) or loaded."""
    if not hasattr(os, "getloadavg"):
        return "load unknown"
    per_core = os.getloadavg()[0] / (os.cpu_count() or 1)
    if per_core < 0.75:
        return f"{per_core:.2f} per core: nothing else was running, quiet timings"
    return f"{per_core:.2f} per core: **loaded**, other work shared the cores and the timings are not quiet ones"


@contextmanager
def report_to(path: str | None, title: str) -> Iterator[None]:
    """Print as usual; with a `path`, also write the printed text to it as a markdown page titled `title`."""
    if path is None:
        yield
        return
    started, load_before, verdict = datetime.now(timezone.utc), _load(), _load_verdict()
    captured, stdout = io.StringIO(), sys.stdout
    sys.stdout = _Tee(stdout, captured)
    try:
        yield
    finally:
        sys.stdout = stdout
    command = shlex.join(["python", os.path.relpath(sys.argv[0]), *sys.argv[1:]])
    page = (f"# {title}\n\nWritten by `{command}` on {started:%d %b %Y, %H:%M} UTC.\n\n"
            f"Machine: {machine_description()}. Load average (1/5/15 min) before it ran: {load_before} ({verdict}); "
            f"at the end, its own threads included: {_load()}.\n\n```text\n{captured.getvalue().rstrip()}\n```\n")
    Path(path).write_text(page)
    print(f"report written to {path}")
