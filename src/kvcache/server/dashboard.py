"""The live cache view: `GET /dashboard` (static HTML + JS) polls `GET /v1/cache/blocks`.

The JSON has one cell per KV block: -1 free, -2 cached (free, still holding a reusable
prefix), k >= 0 used by `owners[k]` (the first sequence whose block table holds it; a
block shared by several is listed in `shared`). The map is read on the engine thread, so
it is one consistent moment of the pool.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from kvcache.cache.spec import format_bytes
from kvcache.server.routes import ERRORS, state_of

router = APIRouter(tags=["dashboard"])
FREE, CACHED = -1, -2


def block_map(engine) -> dict:
    """Cells, owners and shared blocks of the pool (call on the engine thread)."""
    owners = engine.kv.block_owners()
    index: dict[str, int] = {}
    counts: list[int] = []
    cells: list[int] = []
    for block in engine.kv.pool.blocks:
        holders = owners.get(block.block_id)
        if holders:
            k = index.setdefault(holders[0], len(index))
            if k == len(counts):
                counts.append(0)
            counts[k] += 1
            cells.append(k)
        else:
            cells.append(CACHED if block.block_hash is not None else FREE)
    shared = sorted(b for b, h in owners.items() if len(h) > 1)
    return {"cells": cells, "owners": [{"id": rid, "blocks": n} for rid, n in zip(index, counts)], "shared": shared}


def summary_line(stats: dict, tok_s: float) -> str:
    """One line a person (or a test reading the page's DOM) can check."""
    return (f"blocks used {stats['blocks_used']} / {stats['blocks_total']}, cached {stats['blocks_cached']}, "
            f"free {stats['blocks_free']}; KV in use {format_bytes(stats['kv_bytes_used'])} of "
            f"{format_bytes(stats['kv_bytes_total'])}; prefix hit rate {100 * stats['prefix_hit_rate']:.1f}%; "
            f"running {stats['running']}, waiting {stats['waiting']}; {tok_s:.1f} tok/s")


@router.get("/v1/cache/blocks", responses=ERRORS)
async def cache_blocks(request: Request) -> dict:
    """The block pool right now (one cell per block), engine figures and their recent history."""
    state = state_of(request)
    blocks = await state.engine.call(block_map)
    stats = state.stats()
    state.metrics.sample(stats)
    tok_s = state.metrics.tokens_per_second()
    history = [{"t": s.t, "kv_bytes_used": s.kv_bytes_used, "blocks_used": s.blocks_used,
                "blocks_cached": s.blocks_cached, "prefix_hit_rate": s.prefix_hit_rate}
               for s in list(state.metrics.history)]
    return {"model": state.model_name, "block_size": stats["block_size"], "blocks_total": stats["blocks_total"],
            **blocks, "stats": {**stats, "tokens_per_second": tok_s, "in_flight": state.metrics.in_flight},
            "history": history, "summary": summary_line(stats, tok_s)}


@router.get("/dashboard", response_class=HTMLResponse, include_in_schema=False)
async def dashboard() -> HTMLResponse:
    """The live cache view (no build step: one HTML file with inline JS)."""
    html = resources.files("kvcache.server").joinpath("static/dashboard.html").read_text(encoding="utf-8")
    return HTMLResponse(html)
