"""The documentation: the API reference builds from the docstrings with warnings as errors, and every code block of
the README and of docs/ runs.

How a Markdown file's fenced blocks are read (docs/development.md says the same to writers):
- ```python blocks run in order in one namespace per file, in a scratch folder, so a page reads as one session;
- ```bash blocks run as a bash script (`set -euo pipefail`) in the same scratch folder;
- ```text blocks are listings (printed output, a command's synopsis) and are not code;
- an HTML comment right above a block, `<!-- not run: <reason> -->`, leaves it out, and says why (it downloads,
  installs, or runs the test suite itself); `<!-- setup: <python code> -->` runs hidden python code, in the page's
  namespace and folder, just before the block (a stand-in for what the page leaves to the reader, such as the
  reader's own DataLoaders, or a file that a command reads).
A fence without one of those languages, or an empty reason, fails `test_every_code_block_is_run_or_says_why_not`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MARKDOWN = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
LANGUAGES = {"python", "bash", "text"}
FENCE = re.compile(r"^(\s*)```(.*)$")
COMMENT = re.compile(r"<!--\s*(not run|setup):(.*?)-->\s*$", re.DOTALL)


@dataclass
class Block:
    path: Path
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    not_run: str | None = None  # the reason, when marked
    setup: str | None = None


def code_blocks(path: Path) -> list[Block]:
    """The fenced blocks of a Markdown file, each with the marker comment that ends right above it, if any."""
    lines = path.read_text().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, language = match.group(1), match.group(2).strip()
        end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
        if end is None:
            raise AssertionError(f"{path.name}:{i + 1}: a code fence that is never closed")
        code = "\n".join(line[len(indent):] if line.startswith(indent) else line for line in lines[i + 1:end])
        block = Block(path, i + 1, language, code)
        above = "\n".join(lines[:i]).rstrip()
        if above.endswith("-->"):
            comment = COMMENT.search(above[above.rfind("<!--"):])
            if comment and comment.group(1) == "not run":
                block.not_run = comment.group(2).strip()
            elif comment:
                block.setup = comment.group(2)
        blocks.append(block)
        i = end + 1
    return blocks


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_every_code_block_is_run_or_says_why_not():
    problems = []
    for path in MARKDOWN:
        for block in code_blocks(path):
            where = f"{_name(path)}:{block.line}"
            if block.language not in LANGUAGES:
                problems.append(f"{where}: fence language {block.language!r}, not one of {sorted(LANGUAGES)}")
            elif block.not_run is not None and not block.not_run:
                problems.append(f"{where}: `<!-- not run: -->` without a reason")
            elif block.setup is not None and block.language == "text":
                problems.append(f"{where}: a setup comment above a text block, which is not run")
    assert not problems, "\n".join(problems)


def test_the_block_reader_sees_markers_languages_and_indented_fences(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# t\n\n<!-- not run: downloads Pets -->\n```bash\nfastai-ls pets\n```\n\n"
                    "<!-- setup: x = 1 -->\n```python\nprint(x)\n```\n\n- item:\n\n  ```text\n  out\n  ```\n\n"
                    "```\nbare\n```\n")
    blocks = code_blocks(page)
    assert [(b.language, b.not_run, b.setup, b.code) for b in blocks] == [
        ("bash", "downloads Pets", None, "fastai-ls pets"), ("python", None, " x = 1 ", "print(x)"),
        ("text", None, None, "out"), ("", None, None, "bare")]


def test_the_readme_links_only_to_files_that_exist():
    """mkdocs checks the links of docs/ (below); the README is read on GitHub and on PyPI, outside that build."""
    text = (ROOT / "README.md").read_text()
    targets = [t.split("#")[0] for t in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:|#", t)]
    assert targets, "the README links to docs/"
    assert [t for t in targets if not (ROOT / t).exists()] == []


@pytest.fixture(scope="module")
def fastai_home(tmp_path_factory):
    """fastai's data folder for the pages' code: a user's home is not touched (the digits are written there)."""
    return tmp_path_factory.mktemp("fastai_home")


RUN = [path for path in MARKDOWN if any(b.language in ("python", "bash") and b.not_run is None
                                       for b in code_blocks(path))]


@pytest.mark.slow  # each page trains small models or runs the command: 10 s to a minute and more
@pytest.mark.parametrize("path", RUN, ids=_name)
def test_the_code_blocks_of_each_page_run(path, tmp_path, monkeypatch, fastai_home):
    from fastai.data.external import fastai_cfg

    env = {**os.environ, "FASTAI_HOME": str(fastai_home), "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    monkeypatch.setenv("FASTAI_HOME", str(fastai_home))
    monkeypatch.chdir(tmp_path)
    fastai_cfg.cache_clear()  # fastai reads FASTAI_HOME once, into a cached Config
    namespace: dict = {"__name__": "__main__"}
    try:
        for block in code_blocks(path):
            if block.not_run is not None or block.language == "text":
                continue
            where = f"{_name(path)}:{block.line}"
            if block.setup is not None:
                exec(compile(block.setup, f"{where} (setup)", "exec"), namespace)
            if block.language == "python":
                with warnings.catch_warnings():  # the docs teach no spelling that is on its way out
                    warnings.filterwarnings("error", message=".*will be removed in the next release",
                                            category=FutureWarning)
                    exec(compile(block.code, where, "exec"), namespace)
            else:
                result = subprocess.run(["bash", "-c", "set -euo pipefail\n" + block.code], cwd=tmp_path, env=env,
                                        capture_output=True, text=True, timeout=900)
                assert result.returncode == 0, f"{where}: exit status {result.returncode}\n{result.stdout}\n" \
                                               f"{result.stderr}"
    finally:
        fastai_cfg.cache_clear()
        import matplotlib.pyplot as plt
        plt.close("all")


@pytest.mark.slow
def test_the_api_reference_builds_without_warnings(tmp_path):
    """`mkdocs build --strict`: a docstring the reference cannot parse, a broken link or anchor, or a page left out
    of the navigation fails it."""
    pytest.importorskip("mkdocstrings_handlers.python", reason="mkdocstrings[python] builds the reference")
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or shutil.which("mkdocs")
    assert mkdocs, "mkdocs is installed with mkdocstrings but its command is not found"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "api" / "loss" / "index.html").read_text().count("label_smoothing_cross_entropy")
