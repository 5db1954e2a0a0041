"""Quality gates: lint and format (ruff), types (mypy), the layering of the folders, file sizes, and
the one builder. They run with the rest of the suite, so CI and a developer's test run check the
same things."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "actors", "launch", "monitoring")
SOURCES = (*PACKAGES, "benchmarks", "tests")
BIN = Path(sys.executable).parent


def python_files(*folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (REPO / folder).rglob("*.py"))


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module)
    return modules


def tool(name: str) -> str:
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    if not found:
        pytest.fail(f"{name} is not installed: bash launch/setup.sh installs the test tools")
    return str(found)


def test_ruff_finds_nothing_and_the_code_is_formatted():
    lint = subprocess.run(
        [tool("ruff"), "check", "--output-format", "concise", "."], cwd=REPO, capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    form = subprocess.run([tool("ruff"), "format", "--check", "."], cwd=REPO, capture_output=True, text=True)
    assert form.returncode == 0, "run: ruff format .\n" + form.stdout + form.stderr


def test_mypy_finds_no_type_error(tmp_path):
    # The folders are the packages forwardflow.pipeline, ... (pyproject.toml's package-dir); mypy
    # does not follow setuptools' editable-install finder, so it reads them through links laid out
    # as installed.
    (tmp_path / "forwardflow").mkdir()
    for package in PACKAGES:
        (tmp_path / "forwardflow" / package).symlink_to(REPO / package, target_is_directory=True)
    command = [tool("mypy"), "--config-file", str(REPO / "pyproject.toml"), "--cache-dir", str(tmp_path / "cache")]
    for package in PACKAGES:
        command += ["-p", f"forwardflow.{package}"]
    checked = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


LAYERS = {
    # folder: the first-party packages it must not import
    "pipeline": ("ray", "forwardflow.actors", "forwardflow.launch", "forwardflow.monitoring"),
    "actors": ("forwardflow.launch", "forwardflow.monitoring"),
    "monitoring": ("forwardflow.launch", "forwardflow.actors"),
}


@pytest.mark.parametrize("folder", list(LAYERS))
def test_each_folder_imports_only_the_layers_below_it(folder):
    wrong = []
    for path in python_files(folder):
        for module in imported_modules(path):
            if any(module == banned or module.startswith(banned + ".") for banned in LAYERS[folder]):
                wrong.append(f"{path.relative_to(REPO)} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_project_code_is_imported_under_forwardflow_only():
    # A bare `import pipeline` would load a second copy of the module (or another package of that
    # name) beside forwardflow.pipeline.
    wrong = [
        f"{path.relative_to(REPO)} imports {module}"
        for path in python_files(*SOURCES)
        for module in imported_modules(path)
        if module.split(".")[0] in PACKAGES
    ]
    assert not wrong, "\n".join(wrong)


def test_no_file_is_over_500_lines():
    long = [
        f"{path.relative_to(REPO)}: {n}"
        for path in python_files(*SOURCES)
        if (n := len(path.read_text().splitlines())) > 500
    ]
    assert not long, long


def test_only_the_builder_makes_executors_and_runs_the_training_loop():
    # Everything that trains (launch/train.py, the benchmarks) goes through launch/build.py, which
    # also wires the rule's feedback loop; nothing else may skip it.
    made = {"SequentialRunner", "RayPipeline", "train"}
    wrong = []
    for path in python_files(*PACKAGES, "benchmarks"):
        if path == REPO / "launch" / "build.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in made:
                wrong.append(f"{path.relative_to(REPO)}:{node.lineno} calls {node.func.id}")
    assert not wrong, "\n".join(wrong)
