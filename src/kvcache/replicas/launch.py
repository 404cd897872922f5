"""Start (or join) Ray, deploy the engine replicas and the ingress on Ray Serve, serve until stopped."""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from kvcache.replicas.ingress import ENGINE, Ingress
from kvcache.replicas.loopback import local_instance_options
from kvcache.replicas.replica import EngineReplica, ReplicaSpec
from kvcache.replicas.router import KVPrefixRouter
from kvcache.server.state import ServerConfig

APP = "kvcache"
HEALTH_CHECK_PERIOD_S = 2.0  # how soon Serve's controller notices a lost replica and starts another


@dataclass
class ClusterOptions:
    """`kvcache serve --replicas N`: how many replicas, how to route, where to listen."""

    replicas: int
    spec: ReplicaSpec  # each replica's LLM and server settings
    server: ServerConfig  # the ingress's: API key, body cap
    routing: str = "prefix"
    imbalance: int = 8  # prefix routing gives way to the least loaded past this many more requests in flight
    cpus_per_replica: float = 1.0  # Ray's CPU reservation of a replica (its torch threads)
    stats_period_s: float = 1.0  # how often each replica's figures reach the ingress (/metrics)
    host: str = "127.0.0.1"
    port: int = 8000


def start_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Join the Ray cluster at `address`, or start a local one (no dashboard, every service on
    127.0.0.1: `loopback`); True if started here."""
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, **local_instance_options())
    return True


def application(opts: ClusterOptions):
    """The Serve application: the engine deployment (N replicas, our router) behind one ingress replica."""
    seqs = opts.spec.llm.get("max_num_seqs", 64) + max(0, opts.spec.server.max_queue)
    engine = serve.deployment(
        EngineReplica, name=ENGINE, num_replicas=opts.replicas, max_ongoing_requests=seqs + 16,
        ray_actor_options={"num_cpus": opts.cpus_per_replica}, health_check_period_s=HEALTH_CHECK_PERIOD_S,
        request_router_config=RequestRouterConfig(
            request_router_class=KVPrefixRouter,
            request_router_kwargs={"policy": opts.routing, "imbalance": opts.imbalance},
            request_routing_stats_period_s=opts.stats_period_s))
    front = serve.deployment(Ingress, name="ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                             max_ongoing_requests=opts.replicas * (seqs + 16) + 16)
    return front.bind(engine.bind(opts.spec), opts.server, opts.routing)


def deploy(opts: ClusterOptions) -> None:
    """Start Serve's HTTP proxy on host:port and run the application (returns once it is ready)."""
    serve.start(http_options={"host": opts.host, "port": opts.port}, proxy_location="HeadOnly")
    serve.run(application(opts), name=APP, route_prefix="/", blocking=False)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def run(opts: ClusterOptions, address: str | None = None) -> None:
    """`kvcache serve --replicas N`: deploy, print where, wait for Ctrl-C or SIGTERM (what a process
    manager sends), then take it all down: the application, and the Ray instance if started here."""
    started = start_ray(address)
    # after Ray's start, which puts its own SIGTERM handlers in place (they end the process at once)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        deploy(opts)
        print(f"serving {opts.replicas} replicas ({opts.routing} routing) on http://{opts.host}:{opts.port}",
              file=sys.stderr)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the shutdown short
        try:
            serve.shutdown()
            if started:
                ray.shutdown()
        finally:
            signal.signal(signal.SIGTERM, previous)
