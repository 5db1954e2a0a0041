"""The benchmarks run (with tiny budgets): their figures are measured on an idle machine, but the
scripts that produce them must not rot."""

from __future__ import annotations

from benchmarks import overhead


def test_overhead_benchmark_compares_the_executors_with_the_plain_loop(ray_cluster, tmp_path):
    output = tmp_path / "overhead.md"
    assert overhead.main(["--stages", "2", "--epochs", "1", "--repeats", "1", "--output", str(output)]) == 0
    text = output.read_text()
    for name in (overhead.PLAIN, overhead.SEQUENTIAL, overhead.RAY):
        assert f"| 2 | {name} |" in text
    assert ray_cluster.is_initialized(), "the benchmark must leave a Ray it did not start running"
