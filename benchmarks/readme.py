"""The README quotes each benchmark's tables from its file in benchmarks/results/, between markers:

    <!-- results: overhead.md -->
    | ... the table rows of benchmarks/results/overhead.md, in order ... |
    <!-- end results -->

    python -m benchmarks.readme          # copies every quoted file's current tables into README.md

so a figure in the README is always the one its benchmark last wrote (tests/test_readme.py checks it).
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- results: (?P<name>\S+) -->\n)(?P<body>.*?)(<!-- end results -->)", re.DOTALL)


def table_rows(text: str) -> str:
    """The table rows of a markdown text, tables separated by one blank line."""
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append("\n".join(current))
            current = []
    if current:
        tables.append("\n".join(current))
    return "\n\n".join(tables) + "\n"


def quoted_blocks(readme: str) -> list[tuple[str, str]]:
    """(result file name, table rows quoted in the README) for every block."""
    return [(match["name"], table_rows(match["body"])) for match in BLOCK.finditer(readme)]


def refreshed(readme: str) -> str:
    def replace(match: re.Match) -> str:
        rows = table_rows((RESULTS / match["name"]).read_text())
        return match.group(1) + rows + match.group(4)

    return BLOCK.sub(replace, readme)


def main() -> None:
    text = README.read_text()
    new = refreshed(text)
    README.write_text(new)
    print(f"{len(quoted_blocks(new))} result blocks in {README.name}" + (" (updated)" if new != text else ""))


if __name__ == "__main__":
    main()
