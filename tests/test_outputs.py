"""The output directory: checked before anything starts (creatable, writable, room for the run, no
other run in it unless --resume or --overwrite), files written whole or not at all, mode 0644."""

from __future__ import annotations

import json
import resource
import signal
import stat
from collections import namedtuple

import pytest

import forwardflow.actors.cluster
import forwardflow.launch.outputs
from forwardflow.launch.train import main
from forwardflow.pipeline.files import atomic_write_bytes
from forwardflow.pipeline.messages import WriteError

SHORT = ["--preset", "synthetic", "--executor", "sequential", "--epochs", "1", "--no-progress"]


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray must not start for bad input")

    monkeypatch.setattr(forwardflow.actors.cluster, "connect", refuse)


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    "where, message",
    [
        ("file/run", "cannot be created: {tmp}/file is a file"),
        ("/proc/forwardflow-run", "cannot be created or written"),
        ("/sys/forwardflow-run", "cannot be created or written"),
    ],
    ids=["under a file", "proc", "read-only sys"],
)
def test_an_out_that_cannot_be_written_is_refused_before_ray(tmp_path, capsys, no_ray, where, message):
    (tmp_path / "file").write_text("keep me")
    out = where if where.startswith("/") else str(tmp_path / where)
    assert main([*SHORT, "--executor", "ray", "--out", out]) == 2
    line = one_error_line(capsys)
    assert line.startswith("forwardflow: error: --out: ") and message.format(tmp=tmp_path) in line, line
    assert (tmp_path / "file").read_text() == "keep me"


def test_an_out_without_room_for_the_checkpoints_is_refused(tmp_path, capsys, no_ray, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(forwardflow.launch.outputs.shutil, "disk_usage", lambda path: usage(1, 1, 2**20))
    assert main([*SHORT, "--executor", "ray", "--out", str(tmp_path / "run")]) == 2
    line = one_error_line(capsys)
    assert "has 1 MiB free; this run needs about" in line and "--keep-checkpoints" in line, line
    assert not (tmp_path / "run").exists()


def test_a_directory_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*SHORT, "--out", str(out)]) == 0
    first = json.loads((out / "summary.json").read_text())
    capsys.readouterr()
    assert main([*SHORT, "--out", str(out)]) == 2
    line = one_error_line(capsys)
    assert f"{out} holds another run" in line and f"--resume {out}" in line and "--overwrite" in line, line
    assert json.loads((out / "summary.json").read_text()) == first, "a refused run touches nothing"
    assert main([*SHORT, "--out", str(out), "--overwrite", "--seed", "5"]) == 0
    second = json.loads((out / "summary.json").read_text())
    assert second["run_id"] != first["run_id"] and second["config"]["seed"] == 5
    runs = {json.loads(line)["run_id"] for line in (out / "metrics.jsonl").read_text().splitlines()}
    assert runs == {second["run_id"]}, "the old run's metrics log went with it"


def test_overwrite_keeps_the_old_run_when_the_new_one_is_refused(ray_cluster, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*SHORT, "--out", str(out)]) == 0
    before = sorted(path.relative_to(out) for path in out.rglob("*"))
    capsys.readouterr()
    # Checked against the cluster only once Ray is up: more CPUs per stage than the cluster has.
    refused = ["--executor", "ray", "--cpus-per-stage", "3", "--out", str(out), "--overwrite"]
    assert main([*SHORT, *refused]) == 2
    assert one_error_line(capsys).startswith("forwardflow: error: --cpus-per-stage: 2 stages of 3 CPU each do not fit")
    assert sorted(path.relative_to(out) for path in out.rglob("*")) == before


def test_output_files_are_0644_and_no_temporary_file_is_left(tmp_path):
    out = tmp_path / "run"
    assert main([*SHORT, "--out", str(out)]) == 0
    for name in ("summary.json", "weights.pt", "metrics.jsonl"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    assert not [path.name for path in out.rglob(".*")], "no temporary files left behind"


def test_a_failed_write_raises_one_error_naming_the_file_and_keeps_the_old_one(tmp_path):
    path = tmp_path / "weights.pt"
    path.write_bytes(b"old")
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a core dump
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, limits[1]))  # a file system with 1 KiB left
    try:
        with pytest.raises(WriteError) as caught:
            atomic_write_bytes(path, bytes(4096))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, previous)
    assert caught.value.path == str(path) and "too large" in caught.value.reason
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["weights.pt"]


def test_a_new_nested_out_is_created(tmp_path):
    assert main([*SHORT, "--out", str(tmp_path / "a" / "b" / "run")]) == 0
    assert (tmp_path / "a" / "b" / "run" / "summary.json").is_file()
