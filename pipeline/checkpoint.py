"""Checkpoints: a consistent cut of a whole run, written shard by shard, completed by a manifest.

Layout, in ``--out``::

    checkpoints/
      mb-000001200/          the cut after the first 1200 microbatches of the stream
        stage-0.pt ...       each stage's shard: module, optimizer, scheduler, RNG state, counters
        driver.pt            the driver's part: stream position and shuffling RNG, the rule's
                             feedback loop (efp), progress, evaluations so far
        manifest.json        written last: the cut, the resolved config, every file's SHA-256

A checkpoint is complete once its manifest exists; every file is written atomically (temporary
file, fsync, rename), the manifest last, so a crash or a full disk during a checkpoint leaves the
previous complete one as it was. The newest ``--keep-checkpoints`` complete ones are kept.

Where the shards are written. By default each stage writes its own shard from its own process
(``--shard-writer stage``): nothing crosses the network and a checkpoint costs every stage only
its own write, whatever the number of nodes; on a cluster ``--out`` must then be storage every
node mounts at the same path (NFS, a cloud file system), and the driver checks that it sees every
shard before it writes the manifest. Without shared storage, ``--shard-writer driver`` sends each
shard with the marker to the driver, which writes it: it works anywhere, at the price of moving
every shard through the object store.

Format: ``torch.save`` of plain state dicts, read back with ``torch.load(weights_only=True)``.
The optimizer's and scheduler's states are nested structures of tensors and Python numbers that
their own ``state_dict()`` produces and ``load_state_dict()`` takes back exactly, so that a
resumed run is bit-identical; safetensors holds flat tensors only (the optimizer state would need
a flattening of our own, with its own bugs), and torch.distributed.checkpoint is built for tensors
sharded across the ranks of a process group and for resharding, which a stage, a whole module in
one process, does not need. ``weights_only=True`` refuses any pickled object other than tensors
and plain containers, so a damaged or planted file cannot run code when it is loaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from forwardflow.pipeline.files import atomic_write_bytes
from forwardflow.pipeline.messages import CheckpointMarker, RunStoppedError, ShardInfo
from forwardflow.pipeline.model import build_stage_blocks

if TYPE_CHECKING:
    from forwardflow.pipeline.stage import StageSetup

CHECKPOINTS = "checkpoints"  # the folder of a run's checkpoints, in --out
MANIFEST, DRIVER = "manifest.json", "driver.pt"
FORMAT = 1


class CheckpointError(RunStoppedError):
    """A checkpoint that cannot be used: missing, damaged, or not visible where it is needed."""


def shard_name(stage: int) -> str:
    return f"stage-{stage}.pt"


def encode(state: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def decode(data: bytes, where: str) -> Any:
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # a damaged file fails in many ways (pickle, zip, torch)
        raise CheckpointError(f"{where} cannot be read ({type(error).__name__}: {error})") from None


def save_shard(marker: CheckpointMarker, stage: int, state: dict[str, Any]) -> ShardInfo:
    """A stage's shard for ``marker``: written into the checkpoint's folder by the stage itself,
    or carried in the marker to the driver."""
    started = time.perf_counter()
    data = encode(state)
    name = shard_name(stage)
    carried = None
    if marker.stages_write:
        atomic_write_bytes(Path(marker.directory) / name, data)
    else:
        carried = data
    digest = hashlib.sha256(data).hexdigest()
    return ShardInfo(stage, name, digest, len(data), time.perf_counter() - started, carried)


def load_shard(shard: ShardInfo) -> dict[str, Any]:
    """A shard's state, its checksum verified (``shard.file`` is a whole path here)."""
    try:
        data = shard.data if shard.data is not None else Path(shard.file).read_bytes()
    except OSError as error:
        raise CheckpointError(f"{shard.file} cannot be read ({error.strerror or error})") from None
    if hashlib.sha256(data).hexdigest() != shard.sha256:
        raise CheckpointError(f"{shard.file} is damaged (its SHA-256 is not the one its manifest recorded)")
    return decode(data, shard.file)


@dataclass
class Manifest:
    """A complete checkpoint: the cut, why it was made, and every file with its checksum."""

    run_id: str
    after: int  # stream index of the last microbatch in the cut
    reason: str  # epoch, interval, minutes, stop
    created: float
    config: dict[str, Any]  # the run's resolved config (config_to_dict)
    shards: list[dict[str, Any]]
    driver: dict[str, Any]
    format: int = FORMAT

    @property
    def microbatches(self) -> int:
        return self.after + 1


def checkpoint_folder(root: Path, after: int) -> Path:
    return root / f"mb-{after + 1:09d}"


def read_manifest(folder: Path) -> Manifest | None:
    """The folder's manifest if the checkpoint is complete (every file there, of its size)."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
        manifest = Manifest(**data)
    except (OSError, ValueError, TypeError):
        return None
    if manifest.format != FORMAT:
        return None
    for entry in [*manifest.shards, manifest.driver]:
        # A manifest edited by hand (or by another program) counts as none, as unreadable JSON does.
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str) or "size" not in entry:
            return None
        path = folder / entry["file"]
        if not path.is_file() or path.stat().st_size != entry["size"]:
            return None
    return manifest


def complete_checkpoints(root: Path) -> list[tuple[Path, Manifest]]:
    """Every complete checkpoint under ``root``, oldest first."""
    found = []
    for folder in sorted(root.glob("mb-*")) if root.is_dir() else []:
        manifest = read_manifest(folder)
        if manifest is not None:
            found.append((folder, manifest))
    return sorted(found, key=lambda item: item[1].after)


class Checkpointer:
    """The driver's side of checkpoints: makes the markers, completes each cut with the driver's
    state and the manifest, keeps the newest ``keep``, and reads them back."""

    def __init__(self, root: Path, run_id: str, config: dict[str, Any], keep: int, stages_write: bool):
        self.root, self.run_id, self.config = Path(root), run_id, config
        self.keep, self.stages_write = keep, stages_write

    def marker(self, after: int) -> CheckpointMarker:
        folder = checkpoint_folder(self.root, after)
        if folder.exists():  # what a failed attempt at this cut left (no manifest: never used)
            shutil.rmtree(folder, ignore_errors=True)
        if self.stages_write:
            try:
                folder.mkdir(parents=True)
            except OSError as error:
                raise CheckpointError(f"cannot create {folder} ({error.strerror or error})") from None
        return CheckpointMarker(after=after, directory=str(folder.absolute()), stages_write=self.stages_write)

    def complete(self, marker: CheckpointMarker, driver_state: dict[str, Any], reason: str) -> Manifest:
        """Write the driver's part and the manifest (last), then drop what is no longer kept."""
        folder = Path(marker.directory)
        shards = []
        for shard in marker.shards:
            path = folder / shard.file
            if shard.data is not None:
                atomic_write_bytes(path, shard.data)
            elif not path.is_file() or path.stat().st_size != shard.size:
                raise CheckpointError(
                    f"stage {shard.stage}'s shard is not at {path} as the driver sees it: on a cluster, --out must be "
                    "storage every node mounts at that path, or use --shard-writer driver"
                )
            shards.append(asdict(replace(shard, data=None)))
        data = encode(driver_state)
        atomic_write_bytes(folder / DRIVER, data)
        driver = {"file": DRIVER, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        manifest = Manifest(self.run_id, marker.after, reason, time.time(), self.config, shards, driver)
        atomic_write_bytes(folder / MANIFEST, (json.dumps(asdict(manifest), indent=1) + "\n").encode())
        self.prune()
        return manifest

    def prune(self) -> None:
        """Keep the newest ``keep`` complete checkpoints; remove older ones and abandoned attempts
        older than the newest (a later folder may be a cut still in flight)."""
        complete = complete_checkpoints(self.root)
        if not complete:
            return
        kept = {folder for folder, _ in complete[-self.keep :]}
        newest = complete[-1][1].after
        for folder in self.root.glob("mb-*"):
            cut = folder.name[3:]
            if folder not in kept and cut.isdigit() and int(cut) - 1 <= newest:
                shutil.rmtree(folder, ignore_errors=True)

    def latest(self) -> tuple[Path, Manifest] | None:
        complete = complete_checkpoints(self.root)
        return complete[-1] if complete else None


def restore_shards(folder: Path, manifest: Manifest, stages_write: bool) -> list[ShardInfo]:
    """The shards of a checkpoint as the stages are restored from them: whole paths (each stage
    reads its own), or the data itself when the driver writes and reads the shards."""
    shards = []
    for entry in manifest.shards:
        shard = ShardInfo(**{**entry, "file": str((folder / entry["file"]).absolute())})
        if not stages_write:
            shard.data = Path(shard.file).read_bytes()
        shards.append(shard)
    return shards


def read_driver_state(folder: Path, manifest: Manifest) -> dict[str, Any]:
    entry = manifest.driver
    return load_shard(ShardInfo(-1, str(folder / entry["file"]), entry["sha256"], entry["size"]))


def verify(folder: Path, manifest: Manifest) -> None:
    """Every file of a checkpoint is there and has the checksum its manifest recorded."""
    for entry in [*manifest.shards, manifest.driver]:
        path = folder / entry["file"]
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as error:
            raise CheckpointError(f"{path} cannot be read ({error.strerror or error})") from None
        if digest != entry["sha256"]:
            raise CheckpointError(f"{path} is damaged (its SHA-256 is not the one {folder / MANIFEST} recorded)")


def estimate_checkpoint_bytes(setups: list[StageSetup]) -> int:
    """About the size of one checkpoint: every stage's parameters and its optimizer's state (Adam:
    two moments per parameter), counted on the meta device (nothing allocated)."""
    total = 0
    for setup in setups:
        with torch.device("meta"):
            blocks = build_stage_blocks(setup.spec)
        parameters = sum(p.numel() * p.element_size() for p in blocks.parameters())
        total += parameters * (3 if setup.optim.name == "adam" else 2)
    return int(total * 1.1) + 64 * 1024 * len(setups)  # the rules' own parameters, RNG and counters
