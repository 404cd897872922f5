"""The Ray Serve request router of the engine replicas (`RequestRouter`, Serve's router API).

It runs in the ingress's process, where the ingress's handle to the replicas lives. Each
request carries its prompt's block hashes (`hashes=`, computed by the ingress) and may name a
replica (`pin=`, the `X-Kvcache-Replica` header); the ranking
itself is `routing.rank_replicas`. Loads are Serve's own counts of requests in flight per replica
(its queue-length cache, probed where missing). Each replica's figures arrive with Serve's
routing stats (`EngineReplica.record_routing_stats`), which /metrics reads from here.
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from kvcache.replicas import routing

# Serve pickles this module by value when it ships the router class, so the registry the ingress
# reads lives in `routing` (imported by reference): module globals here would be copies.


class KVPrefixRouter(RequestRouter):
    """Prefix-aware (or round-robin, or least-loaded) routing over the engine replicas."""

    def initialize_state(self, policy: str = "prefix", imbalance: int = 8, table_blocks: int = 65536) -> None:
        self.policy, self.imbalance = policy, imbalance
        self.table = routing.PrefixTable(table_blocks)
        self.turn = 0
        self._ids: tuple[str, ...] = ()
        self._stats: dict[str, dict] = {}
        routing.ROUTERS[self._deployment_id.name] = self

    def replica_ids(self) -> list[str]:
        return list(self._ids)

    def held_blocks(self) -> dict[str, int]:
        return {r: self.table.blocks(r) for r in self._ids}

    def replica_stats(self) -> dict[str, dict]:
        """Each replica's latest `record_routing_stats()` (Serve polls them every few seconds)."""
        return dict(self._stats)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._ids = tuple(sorted(r.replica_id.unique_id for r in replicas))
        self._stats = {r.replica_id.unique_id: r.routing_stats for r in replicas if r.routing_stats}
        self.table.keep_only(self._ids)

    async def _loads(self, candidates: list[RunningReplica]) -> dict[str, int]:
        loads, missing = {}, []
        for r in candidates:
            n = self._replica_queue_len_cache.get(r.replica_id)
            if n is None:
                missing.append(r)
            else:
                loads[r.replica_id.unique_id] = n
        if missing:
            for r, n in await self._probe_queue_lens(missing, 0):
                loads[r.replica_id.unique_id] = n if n is not None else 1 << 30
        return loads

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        kwargs = pending_request.kwargs if pending_request is not None else {}
        pin = kwargs.get("pin")
        if pin is not None:
            return [[by_id[pin]]] if pin in by_id else []  # a pinned replica that is gone: wait for it
        hashes = list(kwargs.get("hashes") or ())
        ids = sorted(by_id)
        loads = await self._loads(candidate_replicas) if self.policy != "round-robin" else {}
        ranked = routing.rank_replicas(self.policy, ids, loads, hashes, self.table, self.imbalance, self.turn)
        if pending_request is not None:
            self.turn += 1
            if hashes and ranked:
                self.table.record(ranked[0], hashes)
        return [[by_id[r]] for r in ranked]
