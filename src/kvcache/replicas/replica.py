"""One engine replica: an `LLM` and the single server's app, answering what the ingress forwards.

The ingress owns the API key and the body cap; everything else (routes, validation, errors,
admission and its 429, sessions) is the single server's own code, run in-process through
`bridge.exchange`, so a replica answers exactly as `kvcache serve` without `--replicas` does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ray import serve

from kvcache.replicas.bridge import HTTPRequest, exchange
from kvcache.server.app import create_app
from kvcache.server.state import ServerConfig


@dataclass
class ReplicaSpec:
    """What each replica builds: `LLM(**llm)` and the server settings (without the API key)."""

    llm: dict
    server: ServerConfig = field(default_factory=ServerConfig)


class EngineReplica:
    def __init__(self, spec: ReplicaSpec):
        from kvcache import LLM

        self.llm = LLM(**spec.llm)
        engine = self.llm.engine
        engine.storage.zero_blocks(range(engine.config.num_blocks))  # commit the pool up front, as `serve` does
        self.app = create_app(self.llm, spec.server)
        self.state = self.app.state.server
        self.id = serve.get_replica_context().replica_id.unique_id

    async def forward(self, req: HTTPRequest, hashes: list[int] | None = None, pin: str | None = None):
        """The response to `req` (a ResponseStart, then body chunks); `hashes` and `pin` are the router's."""
        async for item in exchange(self.app, req, self.id):
            yield item

    def describe(self) -> dict:
        """What the ingress needs to hash prompts as this replica's prefix cache does."""
        return {"tokenizer": self.llm.tokenizer, "block_size": self.llm.engine.config.block_size,
                "model": self.state.model_name}

    def record_routing_stats(self) -> dict:
        """This replica's engine figures, its id and process id, and its server's counters; Serve polls this
        (`request_routing_stats_period_s`) and hands it to the router, where /metrics reads it."""
        m = self.state.metrics
        m.sample(self.state.stats())
        return {**self.state.stats(), "replica": self.id, "pid": os.getpid(), "in_flight": m.in_flight,
                "tokens_per_second": m.tokens_per_second(), "requests": sum(m.requests.values())}

    def __del__(self):
        state = getattr(self, "state", None)
        if state is not None:
            state.close()
