"""A Ray cluster of several nodes on this one machine, to try --placement spread (and to test and
benchmark it): ``python -m forwardflow.launch.local_cluster --nodes 2 --cpus 1``.

It prints one JSON line ({"address": ..., "nodes": [node ids, the head first]}) once every node is
up, keeps the cluster until its stdin closes (Ctrl-D), then stops it; pass the address to
``launch/train.py --address``. Every node is a raylet of its own, with its own resources, on
127.0.0.2: loopback only, and an address Ray does not rewrite (Ray replaces 127.0.0.1 in an address
by the machine's outward IP). Set RAY_TMPDIR to a private directory: the cluster's address file
and session directories then stay out of /tmp/ray, where a plain ``ray.init()`` elsewhere on the
machine would find this cluster and join it. The Ray processes are this process's children and
end with it (Ray's reaper kills them if it dies). ``--gpus`` only advertises GPUs (a resource
count for placement), it gives the nodes none.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

NODE_IP = "127.0.0.2"
START_TIMEOUT_S = 120


def main() -> None:
    from ray.cluster_utils import Cluster  # imported here: the helpers below need no Ray

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus", type=float, default=1)
    parser.add_argument("--gpus", type=float, default=0, help="advertised GPUs per node (a resource count only)")
    parser.add_argument(
        "--object-store-mib",
        type=int,
        default=512,
        help="each node's object store (shared memory, used as needed): it holds the dataset for the first "
        "stage as well as the microbatches in flight, and a store too small for them spills to disk on every call",
    )
    args = parser.parse_args()
    node = {
        "num_cpus": args.cpus,
        "num_gpus": args.gpus,
        "node_ip_address": NODE_IP,
        "object_store_memory": args.object_store_mib * 2**20,
    }
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        nodes = [n.node_id for n in cluster.list_all_nodes()]
        print(json.dumps({"address": cluster.address, "nodes": nodes}), flush=True)
        sys.stdin.read()  # until our stdin closes
    finally:
        cluster.shutdown()


@dataclass
class LocalCluster:
    address: str
    nodes: list[str]  # node ids, the head first
    env: dict[str, str]  # the environment for processes that use the cluster


def processes_under(directory: str) -> list[int]:
    """PIDs of the processes whose command line names ``directory`` (a cluster's Ray processes name
    its session directory)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and directory.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:  # ended meanwhile
            pass
    return found


@contextmanager
def local_cluster(nodes: int, cpus: float, gpus: float = 0) -> Iterator[LocalCluster]:
    """Run this module in a process of its own and yield the cluster; at the end stop that process
    (by PID) and make sure nothing of the cluster is left (RuntimeError otherwise)."""
    # A short private directory: Ray's socket paths under it must stay within 107 characters.
    ray_tmp = tempfile.mkdtemp(prefix="ffc", dir="/tmp")
    env = {key: value for key, value in os.environ.items() if key not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["RAY_TMPDIR"] = ray_tmp
    log = Path(ray_tmp) / "cluster.log"
    command = [sys.executable, "-m", "forwardflow.launch.local_cluster", "--nodes", str(nodes), "--cpus", str(cpus)]
    with log.open("w") as stderr:  # the child keeps its own copy of the descriptor
        cluster = subprocess.Popen(
            command + ["--gpus", str(gpus)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
            text=True,
        )
    assert cluster.stdin is not None and cluster.stdout is not None
    try:
        ready, _, _ = select.select([cluster.stdout], [], [], START_TIMEOUT_S)
        line = cluster.stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(f"the local cluster did not start within {START_TIMEOUT_S} s: {log.read_text()[-2000:]}")
        info = json.loads(line)
        yield LocalCluster(address=info["address"], nodes=info["nodes"], env=env)
    finally:
        cluster.stdin.close()
        try:
            cluster.wait(timeout=60)
        except subprocess.TimeoutExpired:
            cluster.kill()
            cluster.wait()
        deadline = time.monotonic() + 30
        while (left := processes_under(ray_tmp)) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        if left:
            raise RuntimeError(f"the local cluster left processes behind (killed): {left}")


if __name__ == "__main__":
    main()
