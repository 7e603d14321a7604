"""Runs a multi-node Ray cluster (`ray.cluster_utils.Cluster`) in its own process, driven over stdin.

    python tests/clusterhost.py DASHBOARD_PORT    (env: RAY_AUTH_MODE=token, RAY_AUTH_TOKEN=...)

Prints one JSON line {"dashboard", "gcs"} when ready, then reads commands: `add-worker`, `remove-worker`
(the newest, ungracefully), `stop`. Its own process, because a process reads its Ray auth mode once.
"""

import json
import sys

from ray.cluster_utils import Cluster

MB = 1024 * 1024


def main() -> None:
    port = int(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "include_dashboard": True, "dashboard_port": port, "dashboard_host": "127.0.0.1",
        "object_store_memory": 200 * MB})
    workers = [cluster.add_node(num_cpus=2, object_store_memory=200 * MB)]
    print(json.dumps({"dashboard": f"http://127.0.0.1:{port}", "gcs": cluster.address}), flush=True)
    try:
        for line in sys.stdin:
            cmd = line.strip()
            if cmd == "add-worker":
                workers.append(cluster.add_node(num_cpus=2, object_store_memory=200 * MB))
            elif cmd == "remove-worker" and workers:
                cluster.remove_node(workers.pop(), allow_graceful=False)
            elif cmd == "stop":
                break
            print(json.dumps({"done": cmd, "workers": len(workers)}), flush=True)
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
