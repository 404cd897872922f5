"""The OpenAI-compatible HTTP server (`kvcache serve`): FastAPI app over the `AsyncEngine`.

app.py (factory, guard, `serve`), state.py (shared state, limits), schemas.py (OpenAI bodies),
routes.py (completions, models, health, metrics), sessions.py (save/restore KV), metrics.py
(counters, Prometheus text), dashboard.py (+ static/dashboard.html: the live cache view),
errors.py (OpenAI-style error bodies).
"""

from kvcache.server.app import create_app, serve
from kvcache.server.state import ServerConfig

__all__ = ["ServerConfig", "create_app", "serve"]
