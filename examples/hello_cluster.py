"""A tiny Ray program: run tasks spread over every node and report where they ran."""

import collections
import os
import socket
import time

import ray


@ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
def where() -> tuple[str, str]:
    time.sleep(1)  # long enough that the scheduler really spreads the tasks
    return socket.gethostname(), ray.util.get_node_ip_address()


def main() -> None:
    ray.init()  # RAY_ADDRESS and the auth token come from raybridge
    nodes = [n for n in ray.nodes() if n["Alive"]]
    print(
        f"connected to {os.environ.get('RAY_ADDRESS')}: {len(nodes)} nodes, "
        f"{int(ray.cluster_resources().get('CPU', 0))} CPUs"
    )
    counts = collections.Counter(ray.get([where.remote() for _ in range(4 * len(nodes))]))
    for (host, ip), n in sorted(counts.items()):
        print(f"  {n} tasks ran on {host} ({ip})")


if __name__ == "__main__":
    main()
