"""`EngineConfig` and its sizing: a KV byte budget -> paged blocks, from the model shape and the policy.

A token's bytes in the pool are what the policy's store class declares: on paged blocks its
`paged_token_bytes` (the model dtype's for float blocks, a quantized format's for
`quantized:...,key_axis=token,residual=0`), and for policies paged blocks cannot hold the
packed rate of its per-request cache (`Policy.footprint`, composed by `cache.row_policy.policy_footprint`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from kvcache.cache.paged_evict import PagedEvict
from kvcache.cache.paged_plan import paged_plan
from kvcache.cache.paged_quant import TokenQuantFormat
from kvcache.cache.policies.grammar import PolicySpec
from kvcache.cache.policies.registry import POLICIES
from kvcache.cache.row_policy import PolicyFootprint, policy_footprint
from kvcache.cache.spec import parse_size
from kvcache.errors import KVCacheError
from kvcache.models.config import LlamaConfig


@dataclass
class EngineConfig:
    """Sizes of the paged cache and the batch."""

    num_blocks: int
    block_size: int = 16
    enable_prefix_caching: bool = True
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    sliding_window: int | None = None  # keep only the last N tokens' blocks (policy `window:size=N`)
    sink_tokens: int | None = None  # with sliding_window: keep the first N tokens too (policy `sinks`)
    evict: PagedEvict | None = None  # compress each prompt once it is prefilled (policy `evict`, decode=false)
    quant_format: TokenQuantFormat | None = None  # blocks hold quantized K/V (policy `quantized:...,key_axis=token`)
    # a policy paged blocks cannot hold: each request gets its own SequenceCache (`cache.row_policy`)
    row_policy: PolicySpec | None = None
    prefill_piece: int | None = None  # with row_policy: prompts are computed in pieces of this (default: budget / 2)
    mixed_steps: bool = True  # a step's decode rows and prompt chunks in one forward pass (`cache.mixed_step`)

    @classmethod
    def from_budget(cls, policy: PolicySpec, config: LlamaConfig, dtype: torch.dtype, device: torch.device,
                    max_model_len: int, memory: str | int | None = None, fraction: float | None = None,
                    block_size: int = 16, enable_prefix_caching: bool = True, max_num_seqs: int = 64,
                    max_num_batched_tokens: int = 512) -> EngineConfig:
        """The engine for a model under `policy`, its pool holding as many blocks as fit `memory`
        bytes (a size such as "2GiB" or a count), else `fraction` (default 0.25) of the device's
        available memory capped at what `max_num_seqs` full-length sequences could use."""
        max_batched = max_num_batched_tokens
        if block_size <= 0 or max_num_seqs <= 0 or max_batched <= 0:
            raise KVCacheError("block_size, max_num_seqs and max_num_batched_tokens must be positive.")
        if memory is not None and fraction is not None:
            raise KVCacheError("Give kv_cache_memory or kv_cache_fraction, not both.")
        available = available_memory_bytes(device)
        if memory is not None:
            budget = parse_size(memory) if isinstance(memory, str) else int(memory)
            if budget > available:
                raise KVCacheError(f"kv_cache_memory {budget} bytes is more than the {available} bytes available.")
        elif fraction is not None and not 0 < fraction <= 0.9:
            raise KVCacheError(f"kv_cache_fraction must be in (0, 0.9], got {fraction}.")
        per_token = bytes_per_token(policy, config, dtype)
        plan = paged_plan(policy)  # None: per-request stores
        if memory is None:
            budget = int(available * (fraction if fraction is not None else 0.25))
            # no point reserving more than every sequence at full length needs (a window or sinks
            # policy gives blocks back: a sequence then holds at most sinks + window + a chunk)
            per_seq = max_model_len + block_size
            n_sink, window = plan.sinks if plan and plan.sinks else (0, plan.window if plan else None)
            if window:
                per_seq = min(per_seq, windowed_live_tokens(window, n_sink, block_size, max_batched))
            footprint = row_footprint(policy, config, dtype, max_batched)
            if footprint is not None:  # a per-request cache: its exact part, its selector's bound
                per_seq = footprint.slots(max_model_len + block_size)
            budget = min(budget, max_num_seqs * per_seq * per_token)
        blocks = blocks_for_budget(budget, block_size, per_token)
        if blocks < 1:
            raise KVCacheError(f"A KV cache budget of {budget} bytes holds no {block_size}-token block.")
        return cls(blocks, block_size, enable_prefix_caching, max_num_seqs, max_batched,
                   sliding_window=plan.window if plan else None,
                   sink_tokens=plan.sinks[0] if plan and plan.sinks else None,
                   quant_format=quant_format(policy, config.head_dim),
                   evict=PagedEvict.from_part(plan.evict) if plan and plan.evict else None,
                   row_policy=None if plan else policy)


def row_footprint(policy: PolicySpec, config: LlamaConfig, dtype: torch.dtype,
                  max_num_batched_tokens: int = 512) -> PolicyFootprint | None:
    """The byte bound of a per-request cache under a policy paged blocks cannot hold, with the
    engine's default prompt pieces; None for the policies paged blocks hold."""
    if paged_plan(policy) is not None:
        return None
    return policy_footprint(policy, config, dtype, default_prefill_piece(max_num_batched_tokens))


def quant_format(policy: PolicySpec, head_dim: int) -> TokenQuantFormat | None:
    """The paged blocks' quantized format under a policy (its store's `paged_format`), or None
    (float blocks, or a policy paged blocks cannot hold)."""
    if paged_plan(policy) is None:
        return None
    return POLICIES[policy.store.name].paged_format(policy.store, head_dim)


def dense_bytes_per_token(config: LlamaConfig, dtype: torch.dtype) -> int:
    """Bytes a token's K and V take over all layers in the model dtype."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * torch.empty(0, dtype=dtype).element_size()


def bytes_per_token(policy: PolicySpec, config: LlamaConfig, dtype: torch.dtype) -> int:
    """Bytes a token takes in the paged engine's blocks under a policy."""
    footprint = row_footprint(policy, config, dtype)
    if footprint is not None:
        return footprint.rate
    return POLICIES[policy.store.name].paged_token_bytes(policy.store, config, dtype)


def default_prefill_piece(max_num_batched_tokens: int) -> int:
    """The prompt pieces of per-request policy caches: half the token budget, so a piece fits
    a step that also decodes or prefills others."""
    return max(1, max_num_batched_tokens // 2)


def windowed_live_tokens(window: int, sink_tokens: int, block_size: int, chunk: int) -> int:
    """The most tokens a `window` / `sinks` sequence holds in blocks at once, however long it
    runs: its sink blocks, the window, a prefill chunk and the partly filled blocks around them."""
    return -(-sink_tokens // block_size) * block_size + window + chunk + 3 * block_size


def blocks_for_budget(budget_bytes: int, block_size: int, bytes_per_token: int) -> int:
    """Whole blocks a byte budget holds."""
    return budget_bytes // (block_size * bytes_per_token)


def available_memory_bytes(device: torch.device) -> int:
    """Free memory of the device the cache lives on (RAM on CPU, free GPU memory on CUDA)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
