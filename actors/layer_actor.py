"""One Ray actor per stage. It drives the same ``pipeline.stage.Stage`` as the sequential runner;
Ray only decides where it runs and carries the microbatches."""

from __future__ import annotations

import os
import socket

import ray
import torch

from pipeline.messages import Microbatch, Prediction, StageStats
from pipeline.stage import Stage, StageSetup, resolve_device


# max_task_retries=0 and max_restarts=0: Ray guarantees that a synchronous actor runs the tasks
# of one submitter in submission order only while no task is retried. A retried or restarted
# stage would also have lost its weights, so a failure stops the run instead.
@ray.remote(max_restarts=0, max_task_retries=0)
class LayerActor:
    def __init__(self, setup: StageSetup, device: str, torch_threads: int):
        # One intra-op thread per stage: several stages share the cores, and more threads per
        # actor made every stage slower through oversubscription.
        torch.set_num_threads(torch_threads)
        self.stage = Stage(setup, resolve_device(device))

    def step(self, mb: Microbatch) -> Microbatch | Prediction:
        result = self.stage.step(mb)
        # The object store lives in host memory: hand on CPU tensors, and let the next stage copy
        # them to its own device (which may be another GPU on another node).
        return result if isinstance(result, Prediction) else result.to("cpu")

    def snapshot(self) -> StageStats:
        return self.stage.snapshot()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.stage.state_dict()

    def location(self) -> dict[str, str]:
        return {"node": socket.gethostname(), "pid": str(os.getpid()), "device": str(self.stage.device),
                "gpus": ",".join(str(g) for g in ray.get_gpu_ids())}
