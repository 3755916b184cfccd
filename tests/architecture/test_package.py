"""`import fastai_ls` and the command's parser stay light (torch and fastai load only when a name or a subcommand
needs them), every public name still imports as before, and the public functions document their parameters."""

from __future__ import annotations

import ast
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

import fastai_ls

INIT = Path(fastai_ls.__file__)
HEAVY = ("torch", "fastai", "torchvision", "matplotlib", "pandas", "sklearn", "numpy")

# Prints the heavy modules loaded after the statements given on the command line ran.
PROBE = """
import sys
{statements}
print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy})))
"""


def heavy_modules_after(statements: str) -> str:
    code = PROBE.format(statements=statements, heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1]


def test_importing_the_package_loads_neither_torch_nor_fastai():
    assert heavy_modules_after("import fastai_ls; fastai_ls.__version__") == "[]"


@pytest.mark.parametrize("args", [["--help"], ["demo", "--help"], ["pets", "--help"], ["article", "--help"],
                                  ["--version"], ["demo", "--epochs", "abc"], ["pets", "--eps", "2"]])
def test_help_version_and_argument_errors_load_neither_torch_nor_fastai(args):
    # What makes `fastai-ls --help` fast (0.1 s, from 5 to 8 s when `import fastai_ls` imported fastai): the
    # command's modules import only the standard library until a subcommand runs.
    statements = f"from fastai_ls.cli import main\ntry:\n    main({args!r})\nexcept SystemExit:\n    pass"
    assert heavy_modules_after(statements) == "[]"


def type_checking_imports() -> dict[str, str]:
    """Name -> module of the imports under `if TYPE_CHECKING:` in fastai_ls/__init__.py (what IDEs read)."""
    tree = ast.parse(INIT.read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    names = {}
    for node in block.body:
        for alias in node.names:
            # `from fastai_ls.integration import distributed` imports a submodule: the table names the submodule.
            is_submodule = (INIT.parent / node.module.removeprefix("fastai_ls.").replace(".", "/")
                            / f"{alias.name}.py").is_file()
            names[alias.name] = f"{node.module}.{alias.name}" if is_submodule else node.module
    return names


def test_the_lazy_map_the_ide_imports_and_all_list_the_same_names():
    assert type_checking_imports() == fastai_ls._SOURCES
    assert sorted(fastai_ls.__all__) == sorted(fastai_ls._SOURCES)


@pytest.mark.parametrize("name", fastai_ls.__all__)
def test_every_public_name_imports_from_the_package(name):
    module = importlib.import_module(fastai_ls._SOURCES[name])
    expected = module if name in fastai_ls._SUBMODULES else getattr(module, name)
    assert getattr(fastai_ls, name) is expected
    namespace = {}
    exec(f"from fastai_ls import {name}", namespace)
    assert namespace[name] is expected
    assert name in dir(fastai_ls)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'fastai_ls' has no attribute 'pets_lerner'"):
        fastai_ls.pets_lerner  # noqa: B018
    with pytest.raises(ImportError):
        exec("from fastai_ls import pets_lerner", {})


def test_a_public_name_imports_fastai_without_its_torch_jit_warning():
    # (`from fastai_ls.integration.callback import CalibrationCallback`, straight from the module, records it four
    # times.)
    code = ("import warnings\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    from fastai_ls import CalibrationCallback\n"
            "print([str(w.message) for w in caught if 'torch.jit.script' in str(w.message)])")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# The modules of the command and the learner factories: every public function documents each parameter in a
# numpy-style `Parameters` section (`name : type`) and shows an example, which `help()` and IDEs display.
DOCUMENTED = ["fastai_ls.cli.main", "fastai_ls.cli.parser", "fastai_ls.cli.demo", "fastai_ls.cli.calibrate",
              "fastai_ls.cli.archive", "fastai_ls.cli.tables", "fastai_ls.cli.selective",
              "fastai_ls.validation.scalars", "fastai_ls.validation.tensors",
              "fastai_ls.pets",
              "fastai_ls.digits", "fastai_ls.integration.splits"]


def public_functions():
    for module_name in DOCUMENTED:
        module = importlib.import_module(module_name)
        for name, obj in vars(module).items():
            if inspect.isfunction(obj) and obj.__module__ == module_name and not name.startswith("_"):
                yield pytest.param(obj, id=f"{module_name}.{name}")


@pytest.mark.parametrize("function", public_functions())
def test_public_functions_document_every_parameter_and_show_an_example(function):
    doc = inspect.getdoc(function)
    assert doc and ">>> " in doc, "no example"
    parameters = [p for p in inspect.signature(function).parameters.values()]
    if not parameters:
        return
    assert "\nParameters\n----------\n" in doc
    section = doc.split("\nParameters\n----------\n", 1)[1].split("\n\n")[0]
    lines = [line for line in section.splitlines() if line and not line.startswith(" ")]
    documented = [line.split(" : ")[0] for line in lines]
    expected = [("**" if p.kind is p.VAR_KEYWORD else "*" if p.kind is p.VAR_POSITIONAL else "") + p.name
                for p in parameters]
    assert documented == expected
    assert all(" : " in line for line, p in zip(lines, parameters) if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL))
    assert "#" not in inspect.getsource(function).split(")", 1)[0], "a parameter comment in the signature"


@pytest.mark.parametrize("old, new, name", [
    ("fastai_ls.losses", "fastai_ls.loss.modules", "LabelSmoothingCrossEntropy"),
    ("fastai_ls.callback", "fastai_ls.integration.callback", "CalibrationCallback"),
    ("fastai_ls.posthoc", "fastai_ls.integration.posthoc", "fit_calibrator"),
])
def test_a_moved_module_still_gives_its_names_with_a_future_warning_naming_the_new_one(old, new, name):
    with pytest.warns(FutureWarning, match=f"{old}.{name} is deprecated.*use {new}.{name}"):
        value = getattr(importlib.import_module(old), name)
    assert value is getattr(importlib.import_module(new), name)


def test_a_loss_pickled_under_its_old_module_path_still_loads():
    # Learners exported before the move name the loss class `fastai_ls.losses.LabelSmoothingCrossEntropy`.
    import pickle

    from fastai_ls.loss.modules import LabelSmoothingCrossEntropy
    data = pickle.dumps(LabelSmoothingCrossEntropy(eps=0.2), protocol=0)  # text: module names can be replaced
    data = data.replace(b"fastai_ls.loss.modules", b"fastai_ls.losses")
    assert b"fastai_ls.losses" in data
    with pytest.warns(FutureWarning, match="fastai_ls.losses.LabelSmoothingCrossEntropy is deprecated"):
        loss = pickle.loads(data)
    assert type(loss) is LabelSmoothingCrossEntropy and loss.eps == 0.2
