"""Replica routing (no Ray): the ingress's block hashes are the prefix cache's, and the ranking
prefers the longest recorded run, gives way to the least loaded, and round-robin rotates."""

from __future__ import annotations

from kvcache.cache.manager import KVCacheManager
from kvcache.replicas.routing import PrefixTable, prompt_block_hashes, rank_replicas

IDS = ["a", "b", "c"]


def test_prompt_hashes_are_the_prefix_caches_keys():
    ids = list(range(3, 40))
    assert prompt_block_hashes(ids, 4) == KVCacheManager(16, 4).block_hashes(ids, len(ids) // 4)
    assert len(prompt_block_hashes(ids, 4)) == 9 and prompt_block_hashes(ids[:3], 4) == []


def test_prefix_goes_to_the_longest_run_unless_it_is_too_busy():
    table = PrefixTable()
    h = prompt_block_hashes(list(range(3, 43)), 4)  # 10 blocks
    table.record("a", h[:3])
    table.record("b", h[:7])
    idle = {r: 0 for r in IDS}
    assert rank_replicas("prefix", IDS, idle, h, table, imbalance=2, turn=0)[0] == "b"
    assert rank_replicas("prefix", IDS, {**idle, "b": 2}, h, table, imbalance=2, turn=0)[0] == "b"
    busy = rank_replicas("prefix", IDS, {"a": 1, "b": 3, "c": 0}, h, table, imbalance=2, turn=0)
    assert busy == ["c", "a", "b"]  # past the threshold: least loaded first
    other = prompt_block_hashes(list(range(50, 90)), 4)
    assert rank_replicas("prefix", IDS, {"a": 1, "b": 1, "c": 0}, other, table, 2, 0)[0] == "c"  # no run anywhere


def test_a_run_counts_leading_blocks_only_and_the_table_is_bounded():
    table = PrefixTable(capacity=4)
    h = prompt_block_hashes(list(range(3, 43)), 4)
    table.record("a", h[1:5])
    assert table.run_length("a", h) == 0 and table.run_length("a", h[1:]) == 4
    table.record("a", h[5:7])
    assert table.blocks("a") == 4 and table.run_length("a", h[1:]) == 0  # the oldest went first
    table.keep_only(["b"])
    assert table.blocks("a") == 0


def test_round_robin_rotates_and_least_loaded_sorts():
    table = PrefixTable()
    assert [rank_replicas("round-robin", IDS, {}, [], table, 0, t)[0] for t in range(4)] == ["a", "b", "c", "a"]
    assert rank_replicas("least-loaded", IDS, {"a": 2, "b": 0, "c": 1}, [], table, 0, 0) == ["b", "c", "a"]


def test_the_ingress_renders_prompts_as_the_replica_does(tiny_llm):
    import json

    from kvcache.replicas.prompt import PromptHasher

    hasher = PromptHasher(tiny_llm.tokenizer, 4)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me about the moon"}]
    chat = json.dumps({"model": "m", "messages": messages}).encode()
    assert hasher.prompt_ids("/v1/chat/completions", chat) == tiny_llm.chat_ids(messages)
    text = json.dumps({"model": "m", "prompt": ["the stars at night", "x"]}).encode()
    assert hasher.prompt_ids("/v1/completions", text) == tiny_llm.encode("the stars at night")
    assert hasher.hashes("/v1/completions", b"{not json") == [] and hasher.hashes("/v1/models", b"") == []
