"""Every benchmark table the README quotes is the one its benchmark last wrote."""

from __future__ import annotations

from benchmarks.readme import README, RESULTS, quoted_blocks, refreshed, table_rows


def test_every_quoted_table_is_its_result_files_table():
    blocks = quoted_blocks(README.read_text())
    assert len(blocks) >= 10
    for name, quoted in blocks:
        assert quoted == table_rows((RESULTS / name).read_text()), f"run: python -m benchmarks.readme ({name})"


def test_a_refresh_replaces_a_stale_table_and_keeps_the_rest():
    name = quoted_blocks(README.read_text())[0][0]
    stale = f"before\n<!-- results: {name} -->\n| old | row |\n<!-- end results -->\nafter\n"
    fresh = refreshed(stale)
    assert fresh.startswith("before\n") and fresh.endswith("<!-- end results -->\nafter\n")
    assert "| old | row |" not in fresh and table_rows((RESULTS / name).read_text()) in fresh
