"""Mutation testing of the local losses and the learning rules (mutmut), with the fast unit tests.

    python -m benchmarks.mutation            # about 30 min on 2 cores; writes benchmarks/results/mutation.md

mutmut (in the test extra: ``pip install -e '.[test]'``) copies the sources into ``mutants/`` and
imports them from there. Run in the checkout, the tests would import the *originals*: the
editable install maps ``forwardflow.pipeline`` to ``pipeline/``, and mutmut names mutants after
file paths (``pipeline.losses``) that the tests never import. So this script lays the packages out
as they are imported, ``src/forwardflow/pipeline/...``, with a copy of the tests, in a scratch
directory, and runs mutmut there: ``src/forwardflow`` is then a regular package early on
``sys.path``, which Python finds before the editable finder (consulted last).

Before trusting a score it checks that layout: with a known mutant written into the staged copy
(the Signal Propagation default temperature sqrt(C) -> 1), the tests must fail, and the module
they import must be the staged one. The score is mutmut's: (killed + timed out) / all mutants;
mutants no test reaches count as survivors.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import machine, today

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PACKAGES = ("pipeline", "actors", "launch", "monitoring")
MUTATED = ("src/forwardflow/pipeline/losses.py", "src/forwardflow/pipeline/rules/*")
# The fast tests: each rule and loss by hand, and the rules through the builder and the sequential
# runner. Left out: the Ray run, the benchmark-path test (it needs benchmarks/), and the two that
# train whole runs (every rule's conv form, efp with and without its loop), which would multiply
# the time per surviving mutant.
TESTS = (
    "tests/test_losses.py",
    "tests/test_rules.py",
    "tests/test_rule_parts.py",
    "tests/test_ff_parts.py",
    "tests/test_rules_pipeline.py",
)
DESELECT = "not ray_pipeline and not benchmark_path and not conv_form and not learns_from_the_feedback_loop"
KNOWN_MUTANT = (
    "src/forwardflow/pipeline/losses.py",
    "return float(h.shape[1]) ** 0.5",
    "return 1.0",
)
KILLED = ("killed", "timeout")


def pyproject() -> str:
    def toml_list(values):
        return "[" + ", ".join(f'"{value}"' for value in values) + "]"

    return (
        "[tool.mutmut]\n"
        'source_paths = ["src"]\n'
        f"only_mutate = {toml_list(MUTATED)}\n"
        f"pytest_add_cli_args_test_selection = {toml_list([*TESTS, '-k', DESELECT])}\n"
        'also_copy = ["tests"]\n'
        # torch is not fork-safe once it has run: every mutant is forked from a clean server.
        'process_isolation = "forkserver"\n'
        "\n[tool.pytest.ini_options]\n"
        'testpaths = ["tests"]\n'
    )


def stage(work: Path) -> None:
    """The packages as imported (src/forwardflow/...), the tests, and mutmut's configuration."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    package = work / "src" / "forwardflow"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in PACKAGES:
        shutil.copytree(REPO / name, package / name, ignore=ignore)
    shutil.copytree(REPO / "tests", work / "tests", ignore=ignore)
    (work / "pyproject.toml").write_text(pyproject())


def check_known_mutant(work: Path) -> None:
    """The staged tests must import the staged code, and fail on a mutant that matters."""
    path, original, mutant = KNOWN_MUTANT
    source = work / path
    text = source.read_text()
    assert original in text, f"{path} no longer has {original!r}: update KNOWN_MUTANT"
    env = dict(os.environ, PYTHONPATH=str(work / "src"))
    where = subprocess.run(
        [sys.executable, "-c", "import forwardflow.pipeline.losses as m; print(m.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if Path(where).resolve() != source.resolve():
        sys.exit(f"mutation: the tests would import {where}, not the staged {source}: no score")
    source.write_text(text.replace(original, mutant))
    try:
        tests = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *TESTS, "-k", DESELECT],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
        )
    finally:
        source.write_text(text)
    if tests.returncode == 0:
        sys.exit(f"mutation: the known mutant ({original!r} -> {mutant!r}) survived the tests: no score")
    print(f"mutation: known mutant killed ({original!r} -> {mutant!r}); the tests import {where}")


def mutmut(work: Path, *args: str, check: bool = True) -> str:
    done = subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=work, capture_output=True, text=True)
    if check and done.returncode != 0:
        sys.exit(f"mutation: mutmut {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return done.stdout


def statuses(work: Path) -> dict[str, str]:
    found = re.findall(r"^\s+(\S+): (.+)$", mutmut(work, "results", "--all", "true"), re.M)
    return {name: status.strip() for name, status in found}


def module_of(name: str) -> str:
    return name.split(".x", maxsplit=1)[0].removeprefix("forwardflow.")


def report(status: dict[str, str], diffs: dict[str, str], command: str) -> str:
    per_module: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for name, value in status.items():
        per_module[module_of(name)][value] += 1
    total = sum(status_count for counts in per_module.values() for status_count in counts.values())
    killed = sum(counts[k] for counts in per_module.values() for k in KILLED)
    lines = [
        f"# Mutation score of the losses and the rules ({today()})",
        "",
        f"Machine: {machine()}. Command: `{command}` (mutmut; tests: {', '.join(TESTS)}, `-k '{DESELECT}'`).",
        "",
        f"**{killed} / {total} mutants killed ({100 * killed / total:.1f}%)** (timed-out mutants count as "
        "killed, mutants that no test reaches as survivors).",
        "",
        "| module | mutants | killed | timed out | survived | no test reaches it |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for module, counts in sorted(per_module.items()):
        lines.append(
            f"| {module} | {sum(counts.values())} | {counts['killed']} | {counts['timeout']} | "
            f"{counts['survived']} | {counts['no tests']} |"
        )
    lines += ["", "## Surviving mutants", ""]
    for name, diff in diffs.items():
        lines += [f"`{name}` ({status[name]})", "", "```diff", diff.strip(), "```", ""]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mutation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(RESULTS / "mutation.md"))
    parser.add_argument("--work", help="stage here and keep it (default: a temporary directory, removed)")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="forwardflow-mutation-"))
    try:
        if work.exists() and any(work.iterdir()):
            sys.exit(f"mutation: {work} is not empty")
        stage(work)
        check_known_mutant(work)
        mutmut(work, "run", "--max-children", str(args.max_children), check=False)
        status = statuses(work)
        if not status:
            sys.exit("mutation: mutmut reported no mutants")
        diffs = {
            name: "\n".join(line for line in mutmut(work, "show", name).splitlines() if line[:2] in ("- ", "+ "))
            for name, value in status.items()
            if value not in KILLED
        }
        command = "python -m benchmarks.mutation " + " ".join(sys.argv[1:] if argv is None else argv)
        text = report(status, diffs, command.strip())
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(text.split("## Surviving")[0])
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
