"""Checkpoints and --resume: a run stopped at a checkpoint and resumed ends with the weights, the
evaluations and the metrics log of a run never stopped; what a checkpoint holds on disk; which
checkpoint a resumed run takes, and what it refuses."""

from __future__ import annotations

import hashlib
import json
import shutil
import stat
from copy import deepcopy

import pytest
import torch
from helpers import assert_same_weights, run_to_end, small_config, small_sequence_config, tweak
from stops import StopAt, log_counts, resume, train_and_finish
from test_pipeline import DROPOUT_NET

from forwardflow.launch.build import build_run
from forwardflow.launch.cli import parse_config
from forwardflow.launch.resume import resumed_config
from forwardflow.pipeline.checkpoint import MANIFEST, Checkpointer, CheckpointError, complete_checkpoints
from forwardflow.pipeline.config import RuleConfig
from forwardflow.pipeline.data import make_synthetic
from forwardflow.pipeline.messages import ShardInfo
from forwardflow.pipeline.presets import synthetic_small
from forwardflow.pipeline.schedule import MicrobatchSchedule
from forwardflow.pipeline.stage import Stage
from forwardflow.pipeline.validation import ConfigError


def durable_config(out, rule: str = "sigprop", model=None, **output):
    config = small_config(rule=RuleConfig(rule), **({"model": model} if model else {}))
    return tweak(config, schedule={"epochs": 3}, output={"out": str(out), "checkpoint_every": 3, **output})


def interrupted(config, at: int):
    run = build_run(config)
    run.extra_observers.append(StopAt(run, at))
    return train_and_finish(run)


@pytest.mark.parametrize(
    "rule, model", [("sigprop", DROPOUT_NET), ("efp", None), ("ff", None)], ids=["dropout", "efp", "ff"]
)
def test_a_stopped_and_resumed_run_ends_as_if_it_never_stopped(tmp_path, rule, model):
    # Dropout masks and Forward-Forward's negatives come from the stages' own generators; efp's
    # feedback loop holds errors and inputs between microbatches: all of it is in the cut.
    config = durable_config(tmp_path / "run", rule, model)
    reference = run_to_end(tweak(config, output={"out": None, "checkpoint_every": None}))
    stopped = interrupted(config, at=23)
    assert stopped.status == "interrupted" and stopped.checkpoint and stopped.checkpoint.endswith("mb-000000023")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["resume"].endswith(f"--resume {tmp_path / 'run'}")
    assert not (tmp_path / "run" / "weights.pt").exists(), "an interrupted run's weights are in its checkpoint"
    final = resume(tmp_path / "run")
    assert final.status == "completed"
    assert_same_weights(reference.weights, final.weights)
    assert [e.accuracies for e in final.evaluations] == [e.accuracies for e in reference.evaluations]
    counts = log_counts(tmp_path / "run")
    assert counts == sorted(counts), "the metrics log went back: microbatches after the cut were counted twice"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


def test_a_pipelined_run_cut_while_microbatches_are_in_flight_resumes_exactly(ray_cluster, tmp_path):
    # On Ray the driver is a window ahead of the stages when it cuts: efp's loop has attached
    # replays past the cut and not yet received the errors before it. Resumed sequentially.
    config = durable_config(tmp_path / "run", "efp")
    reference = run_to_end(tweak(config, output={"out": None, "checkpoint_every": None}))
    stopped = interrupted(tweak(config, execution={"executor": "ray"}), at=23)
    assert stopped.status == "interrupted"
    # The stop's own cut is the last thing submitted; the one before it was cut with the stream
    # still flowing past it, as every cut but a stop's is. Resume from that one.
    shutil.rmtree(stopped.checkpoint)
    assert_same_weights(reference.weights, resume(tmp_path / "run", executor="sequential").weights)


def test_a_checkpoint_is_shards_a_driver_part_and_a_manifest_with_checksums(tmp_path):
    result = train_and_finish(build_run(durable_config(tmp_path / "run", keep_checkpoints=2)))
    found = complete_checkpoints(tmp_path / "run" / "checkpoints")
    assert [folder.name for folder, _ in found] == ["mb-000000051", "mb-000000054"]  # the newest 2 kept
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) == 2
    folder, manifest = found[-1]
    assert manifest.reason == "epoch" and manifest.microbatches == 54 and result.checkpoint == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [MANIFEST, "driver.pt", "stage-0.pt", "stage-1.pt", "stage-2.pt"]
    )
    for entry in [*manifest.shards, manifest.driver]:
        data = (folder / entry["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"] and len(data) == entry["size"]
        assert stat.S_IMODE((folder / entry["file"]).stat().st_mode) == 0o644
    shard = torch.load(folder / "stage-1.pt", weights_only=True)
    assert shard["last_index"] == 53 and {"blocks", "optimizer", "generators", "stats"} <= shard.keys()
    assert torch.equal(shard["blocks"]["0.weight"], result.weights[1]["blocks.0.weight"])
    assert (
        manifest.config["optim"]["lr"] == 2e-3
        and manifest.run_id == json.loads((tmp_path / "run" / "summary.json").read_text())["run_id"]
    )


def test_without_a_manifest_a_checkpoint_does_not_count_and_a_damaged_one_is_refused(tmp_path):
    out = tmp_path / "run"
    interrupted(durable_config(out), at=26)
    (newest, _), (older, _) = reversed(complete_checkpoints(out / "checkpoints")[-2:])
    manifest = json.loads((newest / MANIFEST).read_text())
    del manifest["shards"][0]["file"]  # a manifest damaged by hand counts as none
    (newest / MANIFEST).write_text(json.dumps(manifest))
    assert [folder for folder, _ in complete_checkpoints(out / "checkpoints")][-1] == older
    (newest / MANIFEST).unlink()  # a crash before the manifest was written
    config = resumed_config(str(out), synthetic_small())
    assert build_run(config).resume[0] == older
    shard = older / "stage-1.pt"
    data = shard.read_bytes()
    shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # same size, one bit flipped
    with pytest.raises(ConfigError, match=f"--resume: {shard} is damaged"):
        build_run(config)


def test_a_resumed_run_keeps_the_settings_it_was_trained_with(tmp_path):
    out = tmp_path / "run"
    interrupted(durable_config(out), at=11)
    config = resumed_config(str(out), synthetic_small())
    with pytest.raises(ConfigError, match=r"--lr: the run in .* was trained with 0.002 \(given: 0.01\)"):
        build_run(tweak(config, optim={"lr": 0.01}))
    with pytest.raises(ConfigError, match="--positives: the run in"):
        build_run(tweak(config, rule={"options": type(config.rule.options)(positives="one")}))
    build_run(tweak(config, execution={"executor": "ray", "threads": 2}))  # how it runs may change
    build_run(tweak(config, data={"placement": "host"}))  # and where the first stage keeps the data


def test_a_stage_resumed_on_another_kind_of_device_reseeds_its_dropout_from_the_checkpoint():
    # A CUDA generator's state (16 bytes) cannot be loaded into a CPU generator (5,056) nor the
    # other way round: a checkpoint written on a GPU and resumed with --device cpu.
    run = build_run(small_config(model=DROPOUT_NET))
    train = [run.schedule.read(plan) for plan in run.schedule if plan.phase == "train"][:6]
    stage = Stage(run.setups[0])
    for mb in train[:3]:
        stage.step(mb)
    state = stage.checkpoint_state()
    assert state["generator_devices"] == ["cpu"]
    from_a_gpu = {**state, "generators": [torch.zeros(16, dtype=torch.uint8)], "generator_devices": ["cuda"]}
    resumed = [Stage(run.setups[0]) for _ in range(3)]
    # Each from its own copy, as from its own file: a restored optimizer takes the state's tensors.
    for copy, saved in zip(resumed, [state, from_a_gpu, from_a_gpu]):
        copy.restore(deepcopy(saved))
    for mb in train[3:]:
        for copy in resumed:
            copy.step(mb)
    same_device, *reseeded = [copy.state_dict() for copy in resumed]
    assert_same_weights([reseeded[0]], [reseeded[1]])  # the new seed is the checkpoint's, not chance's
    assert any(not torch.equal(same_device[name], reseeded[0][name]) for name in same_device), "other masks"


def test_a_run_trained_on_ray_with_ray_only_settings_resumes_sequentially(ray_cluster, tmp_path):
    out = tmp_path / "run"
    ray_only = {"cpus_per_stage": 0.5, "microbatches_per_call": 2, "transport": "object-store", "max_restarts": 1}
    interrupted(tweak(durable_config(out), execution={"executor": "ray", **ray_only}), at=11)
    config = parse_config(["--resume", str(out), "--executor", "sequential"])
    assert all(getattr(config.execution, name) is None for name in ray_only)
    assert train_and_finish(build_run(config)).status == "completed"


def test_an_interrupted_run_without_checkpoints_offers_no_resume_command(tmp_path):
    out = tmp_path / "run"
    stopped = interrupted(tweak(durable_config(out), output={"checkpoints": False, "checkpoint_every": None}), at=11)
    summary = json.loads((out / "summary.json").read_text())
    assert stopped.status == summary["status"] == "interrupted" and summary["resume"] is None


def test_a_finished_run_or_a_run_without_checkpoints_is_not_resumed(tmp_path):
    train_and_finish(build_run(durable_config(tmp_path / "done")))
    with pytest.raises(ConfigError, match="has finished"):
        resumed_config(str(tmp_path / "done"), synthetic_small())
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="holds no complete checkpoint"):
        resumed_config(str(tmp_path / "empty"), synthetic_small())


def test_the_stream_continues_from_any_position_microbatch_for_microbatch():
    # Augmentation draws from the same generator as the shuffle: both are in the position.
    schedule = MicrobatchSchedule(
        make_synthetic(0, shape=(3, 8, 8), train=300, test=70),
        small_config().schedule.__class__(epochs=2, batch_size=64, eval_batch_size=32),
        seed=3,
        augment=True,
    )
    whole = list(schedule.microbatches())
    for cut in range(len(whole)):
        stream = schedule.stream()
        for _ in range(cut):
            next(stream)
        rest = list(schedule.microbatches(stream.position()))
        assert [mb.index for mb in rest] == [mb.index for mb in whole[cut:]]
        assert all(
            torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels) for a, b in zip(rest, whole[cut:])
        )


def test_the_driver_can_write_the_shards_and_cuts_can_follow_the_clock(tmp_path):
    # --shard-writer driver: the shards travel in the marker (no storage shared with the stages);
    # --checkpoint-minutes: a cut whenever that much time has passed (here: after every microbatch).
    out = tmp_path / "run"
    config = durable_config(out, shard_writer="driver", checkpoint_every=None, checkpoint_minutes=1e-9)
    reference = run_to_end(tweak(config, output={"out": None, "shard_writer": None, "checkpoint_minutes": None}))
    interrupted(config, at=7)
    found = complete_checkpoints(out / "checkpoints")
    assert [manifest.reason for _, manifest in found] == ["minutes", "minutes"]  # the stop fell on a cut
    assert found[-1][1].microbatches == 7
    assert_same_weights(reference.weights, resume(out).weights)


def test_a_shard_the_driver_cannot_see_is_an_error_that_says_why(tmp_path):
    checkpointer = Checkpointer(tmp_path, "run", {}, keep=2, stages_write=True)
    marker = checkpointer.marker(after=4)
    marker.shards.append(ShardInfo(stage=0, file="stage-0.pt", sha256="0" * 64, size=10))
    with pytest.raises(CheckpointError, match="as the driver sees it: on a cluster, --out must be storage every node"):
        checkpointer.complete(marker, {}, "interval")
    assert not complete_checkpoints(tmp_path)


def test_a_recurrent_run_stopped_inside_a_sequence_is_cut_at_the_next_sequence_and_resumes_exactly(tmp_path):
    # A stage's recurrent state is not part of a cut: the stop waits for the end of the batch of
    # sequences in flight, where every stage starts afresh, and the stream goes on from there.
    config = small_sequence_config(rule="sigprop")
    config = tweak(config, output={"out": str(tmp_path / "run"), "checkpoint_every": 5})
    length = build_run(config).schedule.length
    reference = run_to_end(tweak(config, output={"out": None, "checkpoint_every": None}))
    stopped = interrupted(config, at=length + 2)  # two steps into the second batch
    assert stopped.status == "interrupted" and stopped.checkpoint.endswith(
        f"mb-{2 * length:09d}"
    )  # named by microbatches done
    final = resume(tmp_path / "run")
    assert_same_weights(reference.weights, final.weights)
    assert [e.scores for e in final.evaluations] == [e.scores for e in reference.evaluations]


def test_the_sequence_stream_continues_from_every_batch_boundary():
    schedule = build_run(small_sequence_config()).schedule
    whole = list(schedule.microbatches())
    stream = schedule.stream()
    for taken in range(len(whole)):
        if stream.can_cut:
            rest = list(schedule.microbatches(stream.position()))
            assert [(mb.index, mb.time) for mb in rest] == [(mb.index, mb.time) for mb in whole[taken:]]
            assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(rest, whole[taken:]))
        next(stream)
