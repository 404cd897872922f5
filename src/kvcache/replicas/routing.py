"""Which replica a request goes to; pure logic that the Serve router (router.py) feeds.

`prefix`: the replica that was sent the longest run of the prompt's leading block hashes (the
prefix cache's chained keys, so a run of n means the first n blocks match), unless none was or
its load exceeds the least loaded replica's by more than `imbalance`: then the least loaded.
`round-robin`: each replica in turn. `least-loaded`: the fewest requests in flight.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

from kvcache.cache.prefix import hash_block

ROUTING = ("prefix", "round-robin", "least-loaded")
ROUTERS: dict[str, object] = {}  # deployment name -> its Serve router in this process (router.py registers)


def replica_ids(deployment: str) -> list[str]:
    """The replicas the router of `deployment` in this process routes to (sorted ids)."""
    router = ROUTERS.get(deployment)
    return router.replica_ids() if router is not None else []


def replica_stats(deployment: str) -> dict[str, dict]:
    """Per replica, its latest figures as the router of `deployment` received them."""
    router = ROUTERS.get(deployment)
    return router.replica_stats() if router is not None else {}


def routed_blocks(deployment: str) -> dict[str, int]:
    """Per replica, the block hashes the router of `deployment` has recorded."""
    router = ROUTERS.get(deployment)
    return router.held_blocks() if router is not None else {}


def prompt_block_hashes(token_ids: Sequence[int], block_size: int) -> list[int]:
    """The chained hashes of the prompt's full blocks, as the prefix cache computes them."""
    out: list[int] = []
    parent = None
    for i in range(len(token_ids) // block_size):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out


class PrefixTable:
    """Per replica, the block hashes routed to it, least recently used first, at most `capacity` each.

    It records what each replica was sent, not what it still holds: a replica that evicted
    a block recomputes it, which costs time, never a wrong token."""

    def __init__(self, capacity: int = 65536):
        self.capacity = capacity
        self._held: dict[str, OrderedDict[int, None]] = {}

    def record(self, replica: str, hashes: Iterable[int]) -> None:
        held = self._held.setdefault(replica, OrderedDict())
        for h in hashes:
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.capacity:
            held.popitem(last=False)

    def run_length(self, replica: str, hashes: Sequence[int]) -> int:
        """Leading hashes of `hashes` recorded for `replica`."""
        held = self._held.get(replica, {})
        n = 0
        for h in hashes:
            if h not in held:
                break
            n += 1
        return n

    def keep_only(self, replicas: Iterable[str]) -> None:
        """Forget replicas that are gone."""
        alive = set(replicas)
        for r in [r for r in self._held if r not in alive]:
            del self._held[r]

    def blocks(self, replica: str) -> int:
        return len(self._held.get(replica, ()))


def rank_replicas(routing: str, replicas: Sequence[str], loads: Mapping[str, int], hashes: Sequence[int],
                  table: PrefixTable, imbalance: int, turn: int) -> list[str]:
    """`replicas` (ids, in a stable order) best first under `routing`; `loads` are requests in flight,
    `turn` counts requests routed so far (round-robin's position and the tie-breaker)."""
    if not replicas:
        return []
    n = len(replicas)
    rotated = [replicas[(turn + i) % n] for i in range(n)]
    if routing == "round-robin":
        return rotated
    by_load = sorted(rotated, key=lambda r: loads.get(r, 0))  # stable: ties keep the rotation
    if routing == "least-loaded" or not hashes:
        return by_load
    if routing != "prefix":
        raise ValueError(f"routing must be one of {', '.join(ROUTING)}, got '{routing}'")
    runs = {r: table.run_length(r, hashes) for r in replicas}
    best = max(by_load, key=lambda r: runs[r])  # the least loaded of the longest runs
    lightest = loads.get(by_load[0], 0)
    if runs[best] == 0 or loads.get(best, 0) - lightest > imbalance:
        return by_load
    return [best] + [r for r in by_load if r != best]
