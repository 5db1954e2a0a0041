"""The output directory (``--out``), checked before anything starts: it can be created and written,
it has room for the run's checkpoints and weights, and it does not hold another run unless the
user says what to do with it (``--resume`` continues that run, ``--overwrite`` replaces it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from forwardflow.monitoring.records import LOG_NAME
from forwardflow.pipeline.checkpoint import CHECKPOINTS
from forwardflow.pipeline.config import OutputConfig
from forwardflow.pipeline.validation import ConfigError

SUMMARY, WEIGHTS = "summary.json", "weights.pt"
RUN_FILES = (SUMMARY, WEIGHTS, LOG_NAME, CHECKPOINTS)  # what marks a directory as holding a run
SLACK_BYTES = 16 * 2**20  # the metrics log, the summary, temporary files


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def held_run(out: Path) -> list[str]:
    """The files of a run already in ``out``."""
    return [name for name in RUN_FILES if (out / name).exists()]


def check_out(output: OutputConfig) -> None:
    """``--out`` can be created and written, and holds no other run (unless --resume/--overwrite).
    Writes nothing: creatability is probed with a temporary directory, removed at once."""
    if not output.out:
        return
    out = Path(output.out)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} exists and is not a directory")
    existing = _nearest_existing(out.absolute())
    if not existing.is_dir():
        raise ConfigError("--out", f"{out} cannot be created: {existing} is a file")
    try:
        probe = tempfile.mkdtemp(prefix=".forwardflow-probe-", dir=existing)
    except OSError as error:
        raise ConfigError("--out", f"{out} cannot be created or written ({error.strerror or error})") from None
    os.rmdir(probe)
    if output.resume is None and not output.overwrite and out.is_dir() and (found := held_run(out)):
        raise ConfigError(
            "--out",
            f"{out} holds another run ({', '.join(found)}): continue it with --resume {out}, "
            "replace it with --overwrite, or choose another --out",
        )


def check_free_space(output: OutputConfig, checkpoint_bytes: int) -> None:
    """Room for the checkpoints kept (one more while the next is written) and the final weights."""
    if not output.out:
        return
    checkpoints = (output.checkpoints_kept + 1) * checkpoint_bytes if output.checkpoints else 0
    needed = checkpoints + checkpoint_bytes + SLACK_BYTES
    free = shutil.disk_usage(_nearest_existing(Path(output.out).absolute())).free
    if free < needed:
        raise ConfigError(
            "--out",
            f"{output.out} has {free / 2**20:.0f} MiB free; this run needs about {needed / 2**20:.0f} MiB "
            f"({output.checkpoints_kept if output.checkpoints else 0} checkpoints of {checkpoint_bytes / 2**20:.1f} "
            "MiB kept, the weights and the log): free some space, keep fewer (--keep-checkpoints) or use another --out",
        )


def clear_run(out: Path) -> None:
    """--overwrite: remove the previous run's files (after every check passed, before training)."""
    from forwardflow.monitoring.report import PLOT_NAMES  # matplotlib: only when it is needed

    for name in (*RUN_FILES, *PLOT_NAMES):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
