"""Sequence data through the pipeline: the recurrent blocks, the tasks, the stream of time steps,
Signal Propagation learning at every step with a state that carries no graph, bit-identical
sequential and Ray runs, and bad input."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from helpers import assert_executors_agree, small_config, small_sequence_config, tweak

import forwardflow.actors.cluster
from forwardflow.launch.build import build_run
from forwardflow.launch.train import main
from forwardflow.pipeline.config import ScheduleConfig
from forwardflow.pipeline.messages import EVAL, TRAIN
from forwardflow.pipeline.recurrent import GRUCell, recurrent_blocks
from forwardflow.pipeline.sequence import SequenceDataset, SequenceSchedule, as_sequences, make_adding
from forwardflow.pipeline.stage import Stage


def test_the_gru_cell_computes_what_torch_gru_cell_computes():
    torch.manual_seed(0)
    ours, theirs = GRUCell(5, 7), torch.nn.GRUCell(5, 7)
    with torch.no_grad():
        theirs.weight_ih.copy_(ours.input.weight)
        theirs.bias_ih.copy_(ours.input.bias)
        theirs.weight_hh.copy_(ours.recurrent.weight)
        theirs.bias_hh.copy_(ours.recurrent.bias)
    x, h = torch.randn(3, 5), torch.randn(3, 7)
    assert torch.allclose(ours(x, h), theirs(x, h), atol=1e-6)


def test_images_read_as_rows_and_pixels_and_the_adding_problem():
    run = build_run(small_config())
    images = run.dataset  # synthetic: (N, 1, 8, 8)
    rows = as_sequences(images, "rows")
    assert rows.length == 8 and rows.input_shape == (8,)
    assert torch.equal(rows.train_x[3, 5], images.train_x[3, 0, 5])
    pixels = as_sequences(images, "pixels")
    assert pixels.length == 64 and pixels.input_shape == (1,)
    assert torch.equal(pixels.train_x[3, 8 * 5 + 2, 0], images.train_x[3, 0, 5, 2])
    permuted, again = as_sequences(images, "pixels", permute=True), as_sequences(images, "pixels", permute=True)
    assert torch.equal(permuted.train_x, again.train_x), "one fixed order, the same in every run"
    assert not torch.equal(permuted.train_x, pixels.train_x)
    assert torch.equal(permuted.train_x.sort(1).values, pixels.train_x.sort(1).values)
    task = make_adding(seed=0, length=10, train=4000, test=10)
    numbers, markers = task.train_x[..., 0], task.train_x[..., 1]
    assert (markers.sum(1) == 2).all() and (markers[:, :5].sum(1) == 1).all()
    assert torch.allclose(task.train_y, (numbers * markers).sum(1))
    baseline = (task.train_y - 1.0).pow(2).mean()  # always predicting 1.0
    assert abs(baseline - 1 / 6) < 0.01


def test_the_stream_carries_one_time_step_of_a_batch_per_microbatch():
    task = make_adding(seed=0, length=5, train=10, test=4)
    schedule = SequenceSchedule(task, ScheduleConfig(epochs=1, batch_size=4, eval_batch_size=4, update_every=2), 0)
    stream = list(schedule.microbatches())
    assert len(stream) == len(schedule) == (3 + 1) * 5
    assert [mb.index for mb in stream] == list(range(len(stream)))
    assert [mb.time.step for mb in stream] == list(range(5)) * 4
    assert [mb.phase for mb in stream] == [TRAIN] * 15 + [EVAL] * 5
    first = stream[:5]
    assert all(torch.equal(mb.labels, first[0].labels) for mb in first), "many-to-one: the label at every step"
    assert [mb.time.scored for mb in first] == [False] * 4 + [True]
    assert [mb.time.supervised for mb in first] == [True] * 5  # --loss-steps every
    assert [mb.time.update for mb in first] == [False, True, False, True, True]  # every 2 steps, and the last
    assert [mb.size for mb in stream[::5]] == [4, 4, 2, 4]
    last_only = SequenceSchedule(task, ScheduleConfig(batch_size=4, loss_steps="last"), 0)
    assert [mb.time.supervised for mb in list(last_only)[:5]] == [False] * 4 + [True]
    assert schedule.scored_eval_samples == 4 and schedule.total_train_microbatches == 15
    # Many-to-many: a label per step, scored at every step.
    per_step = SequenceDataset("steps", task.train_x, torch.zeros(10, 5), task.test_x, torch.ones(4, 5), 2)
    steps = list(SequenceSchedule(per_step, ScheduleConfig(batch_size=4), 0))
    assert all(mb.time.scored and mb.time.supervised for mb in steps)
    assert SequenceSchedule(per_step, ScheduleConfig(), 0).scored_eval_samples == 4 * 5


def first_sequence(run):
    stream = run.schedule.microbatches()
    return [next(stream) for _ in range(run.schedule.length)]


@pytest.mark.parametrize("rule, first_update", [("sigprop", 1), ("local", 1), ("bptt", 8), ("tbptt", 1)])
def test_when_a_stage_first_updates_in_a_sequence(rule, first_update):
    run = build_run(small_sequence_config(rule=rule))
    stage = Stage(run.setups[0])
    before = stage.state_dict()
    for mb in first_sequence(run):
        stage.step(mb)
        changed = any(not torch.equal(before[name], value) for name, value in stage.state_dict().items())
        assert changed == (mb.time.step + 1 >= first_update), f"step {mb.time.step + 1}"
    assert stage.stats.first_update_step == first_update
    assert stage.stats.updates == 8 - first_update + 1 and stage.stats.samples == 32


class Held:
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class SavedForBackward:
    """Live bytes of the tensors that autograd graphs keep for their backward pass, and the peak."""

    def __init__(self):
        self.live = self.peak = 0

    def _free(self, size: int) -> None:
        self.live -= size

    def pack(self, tensor: torch.Tensor):
        size = tensor.numel() * tensor.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        held = Held(tensor)  # freed when the graph that saved it is
        weakref.finalize(held, self._free, size)
        return held

    @staticmethod
    def unpack(held: Held) -> torch.Tensor:
        return held.tensor


def saved_bytes_over_a_sequence(rule: str, length: int) -> int:
    config = small_sequence_config(dataset="adding", rule=rule)
    run = build_run(tweak(config, data={"sequence_length": length}))
    stage = Stage(run.setups[0])
    saved = SavedForBackward()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, saved.unpack):
        for mb in first_sequence(run):
            stage.step(mb)
            for block in recurrent_blocks(stage.blocks):
                assert block.state is None or (block.state.grad_fn is None and not block.state.requires_grad)
    return saved.peak


def test_the_state_carries_no_graph_between_steps_so_memory_is_flat_over_time():
    # Signal Propagation: the graph of a step ends at that step, whatever the sequence's length.
    assert saved_bytes_over_a_sequence("sigprop", 32) == saved_bytes_over_a_sequence("sigprop", 4) > 0
    # Backpropagation through time keeps every step's activations until the sequence's end.
    assert saved_bytes_over_a_sequence("bptt", 32) > 6 * saved_bytes_over_a_sequence("bptt", 4)


@pytest.mark.parametrize("rule", ["sigprop", "tbptt"])
def test_pipelined_and_sequential_runs_of_a_recurrent_net_agree_bit_for_bit(ray_cluster, rule):
    config = small_sequence_config(rule=rule)
    sequential = assert_executors_agree(config)
    assert sequential.evaluations and all(s.updates > 0 for s in sequential.stages)


def test_a_regression_task_reports_its_mean_squared_error(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--preset", "adding", "--sequence-length", "6", "--train-limit", "128", "--test-limit", "64"]
    assert main([*argv, "--epochs", "1", "--executor", "sequential", "--no-progress", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "mse" and "test_accuracy" not in summary
    assert summary["test_mse"] == summary["test_mses"]["nearest_target"] > 0
    assert "test MSE" in capsys.readouterr().out


@pytest.fixture
def config_file(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "model.toml"
        path.write_text(text)
        return str(path)

    return write


FC_MODEL = '[model]\nname = "fc"\nblocks = [{kind = "flatten"}, {kind = "linear", width = 16}]\n'
GRU_MODEL = '[model]\nname = "gru"\nblocks = [{kind = "gru", width = 16}]\n'
BAD_SEQUENCE_INPUTS = [
    (["--preset", "mnist-rows", "--config", FC_MODEL], "--config", "has no recurrent block"),
    (["--preset", "synthetic", "--config", GRU_MODEL], "--config", "--sequence rows or pixels"),
    (["--preset", "mnist-fc", "--sequence", "rows"], "model.blocks", "has no recurrent block"),
    (["--preset", "adding", "--rule", "tbptt", "--k1", "0"], "--k1", "between 1 and"),
    (["--preset", "adding", "--rule", "tbptt", "--k2", "0"], "--k2", "between 1 and"),
    (["--preset", "adding", "--rule", "tbptt", "--k1", "4", "--k2", "2"], "--k2", "at least --k1"),
    (["--preset", "adding", "--k1", "2"], "--k1", "applies to --rule tbptt only"),
    (["--preset", "adding", "--rule", "rtrl"], "--rule", "would need 4.6 GiB"),
    (["--preset", "adding", "--rule", "ff"], "--rule", "does not learn from sequence data"),
    (["--preset", "adding", "--rule", "bp"], "--rule", "--rule bptt"),
    (["--preset", "synthetic", "--rule", "bptt"], "--rule", "needs sequence data"),
    (["--preset", "mnist-rows", "--permute"], "--permute", "--sequence pixels"),
    (["--preset", "adding", "--sequence", "rows"], "--sequence", "is a sequence already"),
    (["--preset", "adding", "--update-every", "0"], "--update-every", "between 1 and"),
]


@pytest.mark.parametrize(
    "argv, field, allowed", BAD_SEQUENCE_INPUTS, ids=[" ".join(case[0]) for case in BAD_SEQUENCE_INPUTS]
)
def test_bad_sequence_input_exits_2_with_one_line(argv, field, allowed, tmp_path, capsys, monkeypatch, config_file):
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray must not start for bad input")

    monkeypatch.setattr(forwardflow.actors.cluster, "connect", no_ray)
    argv = [config_file(arg) if arg.startswith("[model]") else arg for arg in argv]
    out = tmp_path / "run"
    assert main(argv + ["--out", str(out), "--no-progress"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"forwardflow: error: {field}") and allowed in lines[0], lines[0]
    assert not out.exists()
