"""A Ray cluster of several nodes on this machine, for tests that need more than the shared one-node
instance: ``python tests/local_cluster.py --nodes 2 --cpus 1``.

It prints one JSON line ({"address": ..., "nodes": [...]}) once every node is up, then keeps the
cluster until its stdin closes, and stops it. Every node is a raylet of its own (with its own
resources) on 127.0.0.2: loopback only, and an address Ray does not rewrite (Ray replaces 127.0.0.1
in an address by the machine's outward IP). Run it with RAY_TMPDIR set to a private directory, so
that the cluster's address file and session directories stay out of /tmp/ray, where a plain
``ray.init()`` elsewhere on the machine would find the cluster and join it. Its Ray processes are
its own children and end with it (Ray's reaper kills them if it dies).
"""

from __future__ import annotations

import argparse
import json
import sys

from ray.cluster_utils import Cluster

NODE_IP = "127.0.0.2"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus", type=float, default=1)
    parser.add_argument("--gpus", type=float, default=0, help="advertised GPUs per node (a resource only)")
    args = parser.parse_args()
    node = {
        "num_cpus": args.cpus,
        "num_gpus": args.gpus,
        "node_ip_address": NODE_IP,
        "object_store_memory": 96 * 2**20,
    }
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        for _ in range(args.nodes - 1):
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        nodes = [n.node_id for n in cluster.list_all_nodes()]
        print(json.dumps({"address": cluster.address, "nodes": nodes}), flush=True)
        sys.stdin.read()  # until the test closes our stdin
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
