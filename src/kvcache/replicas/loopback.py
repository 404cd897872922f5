"""A local Ray instance that listens on 127.0.0.1 only.

Ray 2.60 binds its services to every interface unless the node's address is loopback, and it
takes loopback as the node's address only when `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` is "0" (read
once, at import: meant for a laptop's single-node instance). With it, GCS, raylet, workers and
agents listen on 127.0.0.1. Serve's replicas still open their inter-deployment gRPC server on
`[::]` (hard-coded in Serve 2.60's replica), so every worker of the instance runs
`bind_serve_replicas_to_loopback` first (Ray's `worker_process_setup_hook`).
"""

from __future__ import annotations

import os

SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def local_instance_options() -> dict:
    """Set this process (and the Ray processes it starts) to loopback; `ray.init`'s extra arguments."""
    from ray._private import ray_constants

    os.environ[SINGLE_NODE_ENV] = "0"  # Ray's own processes, started by ray.init, read it
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process imported Ray before it was set
    return {"runtime_env": {"worker_process_setup_hook": f"{__name__}.bind_serve_replicas_to_loopback"}}


def bind_serve_replicas_to_loopback() -> None:
    """In a Ray worker: a Serve replica's gRPC server opened on `[::]:PORT` opens on 127.0.0.1:PORT."""
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server
    if getattr(bind, "loopback", False):
        return

    def on_loopback(server, address: str):
        if address.startswith("[::]:"):
            address = "127.0.0.1:" + address[len("[::]:"):]
        return bind(server, address)

    on_loopback.loopback = True
    replica.add_port_to_grpc_server = on_loopback
