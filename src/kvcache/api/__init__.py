"""The Python facade: `LLM` (load, generate, stream, chat), `ChatSession` and `AsyncEngine`."""
