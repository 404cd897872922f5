"""What a tier backend is: bytes by key, nothing about blocks or models.

`get_many` returns the values of consecutive keys (None where a key is absent), stopping
early at the first absent one or when `deadline` (a `time.monotonic()` instant) has passed;
`put` stores one value. A backend that cannot answer raises `TierUnavailable` with a `kind`
(`unreachable`, `timeout`, `io`, `server`), which the tier counts and treats as a miss.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["TierBackend", "TierUnavailable"]


class TierUnavailable(Exception):
    """The backend could not answer (down, too slow, an I/O error)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class TierBackend(Protocol):
    url: str

    def get_many(self, keys: Sequence[str], deadline: float) -> list[bytes | None]: ...

    def put(self, key: str, value: bytes) -> None: ...

    def stored_bytes(self) -> int | None:
        """Bytes the backend holds for us now, where it can tell cheaply (else None)."""
        ...

    def close(self) -> None: ...
