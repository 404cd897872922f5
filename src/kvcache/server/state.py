"""What every route shares: the model, the async engine, counters, the session store, limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvcache.api.async_engine import AsyncEngine
from kvcache.engine.persist import SessionStore, default_sessions_dir
from kvcache.server.errors import APIError
from kvcache.server.metrics import ServerMetrics


@dataclass
class ServerConfig:
    """Server settings (the engine's live on the `LLM`)."""

    model_name: str | None = None  # the id clients send and /v1/models lists (default: the LLM's name)
    api_key: str | None = None  # requests to /v1/* and /metrics need `Authorization: Bearer <key>`
    max_queue: int = 256  # requests allowed to wait beyond the engine's max_num_seqs; then 429
    max_body_bytes: int = 4 * 1024 * 1024  # larger request bodies get 413
    sessions_dir: str | Path | None = None  # where saved sessions go (default ~/.cache/kvcache/sessions)
    retry_after_s: int = 1  # Retry-After of a 429


class ServerState:
    """Shared by the routes; `close()` stops the engine thread."""

    def __init__(self, llm, config: ServerConfig):
        self.llm, self.config = llm, config
        self.model_name = config.model_name or str(llm.name)
        self.engine = AsyncEngine(llm)
        self.metrics = ServerMetrics()
        self.store = SessionStore(config.sessions_dir or default_sessions_dir(), llm)
        self.max_in_flight = llm.engine.config.max_num_seqs + max(0, config.max_queue)

    def check_model(self, model: str | None, param: str = "model") -> None:
        """404 (as OpenAI answers) for a model this server does not serve."""
        if model is not None and model != self.model_name:
            raise APIError(404, f"The model '{model}' does not exist; this server serves '{self.model_name}'.",
                           param, "model_not_found")

    def admit(self) -> None:
        """Count one more generation in flight, or 429 when the queue is full."""
        if self.metrics.in_flight >= self.max_in_flight:
            raise APIError(429, f"The server is at capacity ({self.metrics.in_flight} requests in flight); "
                           "retry shortly.", code="queue_full", headers={"Retry-After": str(self.config.retry_after_s)})
        self.metrics.in_flight += 1

    def release(self) -> None:
        self.metrics.in_flight -= 1

    def stats(self) -> dict:
        """The engine's figures and the weights' quantization and bytes."""
        return {**self.engine.stats(), "quantization": self.llm.quantization,
                "weight_bytes": self.llm.model.weight_bytes}

    def close(self) -> None:
        self.engine.shutdown()
