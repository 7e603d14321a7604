"""Runs a multi-node Ray cluster (`ray.cluster_utils.Cluster`) in its own process, driven over stdin.

    python tests/clusterhost.py DASHBOARD_PORT    (env: RAY_AUTH_MODE=token, RAY_AUTH_TOKEN=...)

Prints one JSON line {"dashboard", "gcs", "head", "workers"} (node ids) when ready, then reads commands:
`add-worker`, `remove-worker` (the newest, ungracefully), `stop`; answers each with {"done", "node", "workers"}. Its own process, because a process reads its Ray auth mode once.
"""

import json
import socket
import sys

from ray.cluster_utils import Cluster

MB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(cluster):
    # Each node's dashboard agent on a free port: the default (52365) is taken when another Ray runs on this
    # machine (the suite's own session), and a node whose agent cannot listen takes no job submissions.
    return cluster.add_node(num_cpus=2, object_store_memory=200 * MB, dashboard_agent_listen_port=_free_port())


def main() -> None:
    port = int(sys.argv[1])
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "include_dashboard": True,
            "dashboard_port": port,
            "dashboard_host": "127.0.0.1",
            "dashboard_agent_listen_port": _free_port(),
            "object_store_memory": 200 * MB,
        },
    )
    workers = [_worker(cluster)]
    print(
        json.dumps(
            {
                "dashboard": f"http://127.0.0.1:{port}",
                "gcs": cluster.address,
                "head": cluster.head_node.node_id,
                "workers": [w.node_id for w in workers],
            }
        ),
        flush=True,
    )
    try:
        for line in sys.stdin:
            cmd, node = line.strip(), None
            if cmd == "add-worker":
                workers.append(_worker(cluster))
                node = workers[-1].node_id
            elif cmd == "remove-worker" and workers:
                gone = workers.pop()
                node = gone.node_id
                cluster.remove_node(gone, allow_graceful=False)
            elif cmd == "stop":
                break
            print(json.dumps({"done": cmd, "node": node, "workers": [w.node_id for w in workers]}), flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
