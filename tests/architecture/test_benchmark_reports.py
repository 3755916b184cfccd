"""Benchmark scripts write their reports themselves (`--report PATH`): what they printed, with the command, the date
and the machine, as a docs page whose code block the docs tests accept (a `text` fence)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

from report import report_to  # noqa: E402  (benchmarks/report.py, as the scripts import it)


def test_a_report_holds_what_was_printed_with_the_command_date_and_machine(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["benchmarks/bench_x.py", "--quick"])
    path = tmp_path / "x.md"
    with report_to(str(path), "X's speed"):
        print("shape  ratio\n64x37  0.62")
    page = path.read_text()
    assert page.startswith("# X's speed\n") and "`python benchmarks/bench_x.py --quick`" in page
    assert " UTC." in page and "cores" in page and "Load average" in page
    assert "```text\nshape  ratio\n64x37  0.62\n```" in page
    assert "64x37  0.62" in capsys.readouterr().out  # still printed


def test_without_a_path_nothing_is_written_and_the_output_is_printed(tmp_path, capsys):
    with report_to(None, "X"):
        print("hello")
    assert capsys.readouterr().out == "hello\n" and not list(tmp_path.iterdir())


def test_every_benchmark_script_takes_report():
    for script in sorted(BENCHMARKS.glob("bench_*.py")):
        source = script.read_text()
        assert "add_report_argument(parser)" in source and "report_to(args.report" in source, script.name
        ast.parse(source)


def test_a_report_says_loaded_when_other_work_shared_the_cores(tmp_path, monkeypatch):
    # A report once called a load of 0.7 per core "below about 0.3 per core, quiet" whatever the load was.
    monkeypatch.setattr(sys, "argv", ["benchmarks/bench_x.py"])
    monkeypatch.setattr("os.getloadavg", lambda: (4.0, 4.0, 4.0))
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    with report_to(str(tmp_path / "busy.md"), "X"):
        print("64x37  0.62")
    assert "2.00 per core: **loaded**" in (tmp_path / "busy.md").read_text()
    monkeypatch.setattr("os.getloadavg", lambda: (0.2, 0.2, 0.2))
    with report_to(str(tmp_path / "quiet.md"), "X"):
        print("64x37  0.62")
    assert "0.10 per core: nothing else was running, quiet timings" in (tmp_path / "quiet.md").read_text()
