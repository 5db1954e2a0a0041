"""How activations go from stage to stage on Ray (actors/transport.py): the choice per hop, the
refusals before any actor starts, Ray Direct Transport computing exactly what the object store
does (gloo, the one direct transport a CPU has), and the fallback when a direct hop fails."""

from __future__ import annotations

import json
import threading

import pytest
from helpers import assert_executors_agree, assert_same_weights, run_to_end, small_config, tweak
from stops import KillStage

from forwardflow.actors import ray_pipeline, transport
from forwardflow.actors.transport import OBJECT_STORE, HandOff, check_transport, may_go_direct, plan_hand_offs
from forwardflow.launch import train
from forwardflow.launch.build import build_run
from forwardflow.pipeline.validation import ConfigError


def where(device: str, gpus: str = "", node: str = "n1") -> dict[str, str]:
    return {"device": device, "gpus": gpus, "node_id": node}


def test_auto_sends_gpu_tensors_directly_and_everything_else_through_the_object_store():
    locations = [
        where("cpu"),
        where("cuda", "0"),  # cpu -> cuda: the object store
        where("cuda", "0"),  # same node, same GPU: CUDA IPC
        where("cuda", "1"),  # another GPU: NCCL
        where("cuda", "1", node="n2"),  # the same GPU number on another node: NCCL
    ]
    chosen = [hand_off.transport for hand_off in plan_hand_offs("auto", locations)]
    assert chosen == [OBJECT_STORE, "cuda-ipc", "nccl", "nccl", OBJECT_STORE]
    # The last stage's predictions always go to the driver through the object store.
    assert plan_hand_offs("gloo", [where("cpu")] * 3)[-1].transport == OBJECT_STORE
    assert [h.transport for h in plan_hand_offs("gloo", [where("cpu")] * 3)[:-1]] == ["gloo", "gloo"]
    assert [h.direct for h in plan_hand_offs("auto", locations)] == [False, True, True, True, False]


def test_only_runs_that_may_go_direct_get_actors_with_direct_transport():
    assert may_go_direct("auto", ["cuda", "cuda"]) and may_go_direct("gloo", ["cpu", "cpu"])
    assert not may_go_direct("auto", ["cpu", "cpu"]) and not may_go_direct("auto", ["cuda", "cpu", "cuda"])
    assert not may_go_direct("object-store", ["cuda", "cuda"]) and not may_go_direct("gloo", ["cpu"])


@pytest.mark.parametrize(
    ("transport", "devices", "stage"),
    [("gloo", ["cpu", "cuda"], 1), ("nccl", ["cuda", "cpu"], 1), ("cuda-ipc", ["cpu", "cuda"], 0)],
)
def test_a_transport_that_cannot_carry_a_stages_tensors_is_refused(transport, devices, stage):
    with pytest.raises(ConfigError, match=f"--transport: {transport} .* stage {stage} runs on"):
        check_transport(transport, devices)
    check_transport("auto", devices)
    check_transport("object-store", devices)


def test_transport_flags_that_cannot_work_exit_2_in_one_line(capsys):
    assert train.main(["--device", "cpu", "--transport", "nccl", "--no-progress"]) == 2
    assert train.main(["--executor", "sequential", "--transport", "gloo", "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "forwardflow: error: --transport: nccl carries GPU tensors, not cpu ones; use auto or object-store",
        "forwardflow: error: --transport: applies to --executor ray only (the executor is sequential)",
    ]


def test_direct_transport_computes_what_the_sequential_run_computes(ray_cluster):
    config = tweak(small_config(), execution={"threads": 1})
    assert_executors_agree(config, transport="gloo")
    # And the hops did go direct: the calls' results are RDT objects, the predictions are not.
    run = build_run(tweak(config, execution={"executor": "ray", "transport": "gloo", "window": 4}))
    with run:
        assert [location.hand_off for location in run.locations] == ["gloo", "gloo", OBJECT_STORE]
        for plan in list(run.schedule)[:4]:
            run.executor.submit(plan)
        refs = run.executor._calls[0].refs
        assert [ref.tensor_transport() for ref in refs[:-1]] == ["GLOO", "GLOO"]
        assert refs[-1].tensor_transport() in (None, "OBJECT_STORE")
        run.executor.completed(wait=True)


def test_a_direct_hop_that_fails_at_the_start_falls_back_to_the_object_store(
    ray_cluster, monkeypatch, tmp_path, capsys
):
    # NCCL on CPU actors: creating its group fails, as a broken GPU transport would. With auto the
    # run goes on through the object store and says why; named, the transport stops the run.
    def nccl_everywhere(requested, locations):
        return [HandOff("nccl", "test")] * (len(locations) - 1) + [HandOff(OBJECT_STORE, "predictions")]

    monkeypatch.setattr(ray_pipeline, "plan_hand_offs", nccl_everywhere)
    monkeypatch.setattr(ray_pipeline, "check_transport", lambda requested, devices: None)
    config = tweak(small_config("ray"), schedule={"epochs": 1}, output={"out": str(tmp_path / "auto")})
    with build_run(config) as run:
        result = run.train()
        data = run.finish(result)
    assert result.status == "completed"
    assert [s["hand_off"] for s in data["stages"]] == [OBJECT_STORE] * 3
    assert "direct transport failed at the start (ValueError: Backend NCCL not registered)" in json.dumps(
        data["stages"][0]
    )
    named = tweak(config, execution={"transport": "nccl", "device": "auto"}, output={"out": str(tmp_path / "named")})
    with pytest.raises(ray_pipeline.TransportError, match="--transport nccl: stage 0 could not hand on to stage 1"):
        build_run(named).start()
    # From the command line: one line and the fault exit status, no traceback.
    capsys.readouterr()
    assert train.main(["--preset", "synthetic", "--transport", "nccl", "--no-progress"]) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "forwardflow: error: --transport nccl: stage 0 could not hand on to stage 1 "
        "(ValueError: Backend NCCL not registered)"
    ]


def test_a_group_that_never_forms_is_given_up_and_the_stages_are_made_anew(ray_cluster, monkeypatch, tmp_path):
    # Ray's create_collective_group waits for its members without a limit; one that never returns
    # stands for members that cannot reach each other. Past the timeout the run goes on through
    # the object store with fresh actors (the old ones could be stuck inside the set-up), and
    # computes what the sequential run computes.
    from ray.experimental import collective

    released = threading.Event()
    monkeypatch.setattr(collective, "create_collective_group", lambda actors, backend: released.wait(30))
    monkeypatch.setattr(transport, "GROUP_TIMEOUT_S", 0.5)
    made = []
    make_actor = ray_pipeline.RayPipeline._make_actor
    monkeypatch.setattr(
        ray_pipeline.RayPipeline, "_make_actor", lambda self, stage: made.append(stage) or make_actor(self, stage)
    )
    config = tweak(small_config("ray"), schedule={"epochs": 1}, execution={"transport": "gloo"})
    try:
        with pytest.raises(
            ray_pipeline.TransportError, match=r"the gloo group of stages 0, 1, 2 did not form within 0.5 s"
        ):
            build_run(config).start()
        made.clear()
        monkeypatch.setattr(
            ray_pipeline,
            "plan_hand_offs",
            lambda requested, locations: [HandOff("nccl", "test")] * 2 + [HandOff(OBJECT_STORE, "predictions")],
        )
        auto = tweak(config, execution={"transport": "auto"}, output={"out": str(tmp_path)})
        with build_run(auto) as run:
            result = run.train()
            data = run.finish(result)
    finally:
        released.set()
    assert made == [0, 1, 2, 0, 1, 2]
    assert [s["hand_off"] for s in data["stages"]] == [OBJECT_STORE] * 3
    assert "the nccl group of stages 0, 1, 2 did not form within 0.5 s" in data["stages"][0]["hand_off_reason"]
    reference = run_to_end(tweak(small_config("sequential"), schedule={"epochs": 1}))
    assert_same_weights(reference.weights, result.weights)


def test_a_stage_lost_on_a_direct_hop_is_recreated_and_its_groups_are_made_again(ray_cluster, tmp_path):
    config = tweak(small_config("ray"), schedule={"epochs": 2}, output={"out": str(tmp_path), "checkpoint_every": 4})
    reference = run_to_end(
        tweak(config, execution={"executor": "sequential"}, output={"out": None, "checkpoint_every": None})
    )
    run = build_run(tweak(config, execution={"transport": "gloo"}))
    killer = KillStage(run, stage=1, count=10)
    run.extra_observers.append(killer)
    with run:
        result = run.train()
        assert [location.hand_off for location in run.locations] == ["gloo", "gloo", OBJECT_STORE]
    assert result.restarts == 1 and killer.killed, killer.rewinds
    assert_same_weights(reference.weights, result.weights)
