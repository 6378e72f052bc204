"""Ray's ports for one SLURM job on one node, so that jobs sharing a node do not collide.

`cluster/slurm-ray.sbatch` runs `python -m cluster.ports --job-id $SLURM_JOB_ID` on every
node before `ray start` and evaluates what it prints: `NAME=port` lines, and
RAY_PORT_FLAGS, the node's flags for `ray start` (the head adds --port, the dashboard's
and Ray Client's, from the same block). A job's ports
are one block of consecutive ports inside a range that the cluster's firewall can allow
between its nodes: the Ray services (GCS, raylet, object manager, agents, metrics, Ray
Client, dashboard) and then the worker ports. The range is split into blocks; a job starts
looking at block `job id mod blocks` and takes the first block whose ports are all free on
this node. Two jobs on one node thus get different blocks, also when their ids map to the
same one (the second finds it taken), unless both start within the same second or so.

Settings (environment, read on the node): BIHM_RAY_PORT_RANGE (default 20000-32767,
below Linux's ephemeral ports) and BIHM_RAY_WORKER_PORTS (default 512 per job and node:
one per Ray worker process).
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import sys
from collections.abc import Callable

SERVICES = (
    "RAY_PORT",  # the head's GCS: the address every node and the driver connect to
    "NODE_MANAGER_PORT",
    "OBJECT_MANAGER_PORT",
    "AGENT_GRPC_PORT",
    "AGENT_HTTP_PORT",
    "RUNTIME_ENV_AGENT_PORT",
    "METRICS_PORT",
    "CLIENT_SERVER_PORT",
    "DASHBOARD_PORT",
)
DEFAULT_RANGE = "20000-32767"
DEFAULT_WORKER_PORTS = 512


class PortError(ValueError):
    """A bad setting, or no free block: the message names the setting."""


def parse_range(text: str) -> tuple[int, int]:
    """'LO-HI' (inclusive) within 1024..65535."""
    try:
        lo, hi = (int(part) for part in text.split("-"))
    except ValueError:
        raise PortError(f"BIHM_RAY_PORT_RANGE: expected LO-HI, got {text!r}") from None
    if not 1024 <= lo <= hi <= 65535:
        raise PortError(f"BIHM_RAY_PORT_RANGE: {text!r} is not within 1024-65535")
    return lo, hi


def is_free(port: int) -> bool:
    """Whether a TCP port can be bound on every interface of this node now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def choose_ports(
    job_id: int,
    lo: int,
    hi: int,
    worker_ports: int = DEFAULT_WORKER_PORTS,
    free: Callable[[int], bool] = is_free,
) -> dict[str, int]:
    """The job's ports on this node: {service: port, MIN_WORKER_PORT, MAX_WORKER_PORT}."""
    if worker_ports < 1:
        raise PortError(f"BIHM_RAY_WORKER_PORTS: must be >= 1, got {worker_ports}")
    size = len(SERVICES) + worker_ports
    blocks = (hi - lo + 1) // size
    if blocks < 1:
        raise PortError(
            f"BIHM_RAY_PORT_RANGE: {lo}-{hi} holds fewer than the {size} ports of one job "
            f"({len(SERVICES)} Ray services and {worker_ports} worker ports)"
        )
    for k in range(blocks):
        first = lo + (job_id + k) % blocks * size
        if all(free(port) for port in range(first, first + size)):
            ports = {name: first + i for i, name in enumerate(SERVICES)}
            ports["MIN_WORKER_PORT"] = first + len(SERVICES)
            ports["MAX_WORKER_PORT"] = first + size - 1
            return ports
    raise PortError(
        f"BIHM_RAY_PORT_RANGE: no block of {size} free ports left in {lo}-{hi} on "
        f"{socket.gethostname()} ({blocks} blocks, all in use by other jobs)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster.ports", description=__doc__)
    parser.add_argument("--job-id", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        lo, hi = parse_range(os.environ.get("BIHM_RAY_PORT_RANGE") or DEFAULT_RANGE)
        workers = os.environ.get("BIHM_RAY_WORKER_PORTS") or str(DEFAULT_WORKER_PORTS)
        if not workers.isdigit():
            raise PortError(f"BIHM_RAY_WORKER_PORTS: expected a number, got {workers!r}")
        ports = choose_ports(args.job_id, lo, hi, int(workers))
    except PortError as err:
        print(f"bihm submit: error: {err}", file=sys.stderr)
        return 2
    for name, port in ports.items():
        print(f"{name}={port}")
    print(f"RAY_PORT_FLAGS={shlex.quote(' '.join(node_flags(ports)))}")
    return 0


def node_flags(ports: dict[str, int]) -> list[str]:
    """The `ray start` flags of every node's own processes (raylet, object manager, agents,
    metrics exporter, workers); the head's GCS, dashboard and Ray Client are added there."""
    flags = {
        "--node-manager-port": "NODE_MANAGER_PORT",
        "--object-manager-port": "OBJECT_MANAGER_PORT",
        "--dashboard-agent-grpc-port": "AGENT_GRPC_PORT",
        "--dashboard-agent-listen-port": "AGENT_HTTP_PORT",
        "--runtime-env-agent-port": "RUNTIME_ENV_AGENT_PORT",
        "--metrics-export-port": "METRICS_PORT",
        "--min-worker-port": "MIN_WORKER_PORT",
        "--max-worker-port": "MAX_WORKER_PORT",
    }
    return [f"{flag}={ports[name]}" for flag, name in flags.items()]


if __name__ == "__main__":
    sys.exit(main())
