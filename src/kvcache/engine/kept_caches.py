"""Per-request policy caches kept between the requests of one conversation.

Under a policy that gives each request its own cache (`engine/policy_runner.py`) there is no
prefix cache: blocks there are byte grants, not K/V another request could read, so a chat
turn would compute the whole conversation again. Instead a finished request that names a
`conversation` leaves its cache here, with its grant of blocks (renamed in the block manager,
still counted as used), and the conversation's next request adopts both: the tokens the two
share are not computed again. The cache is cut back to them when it has no selectors and
evicted nothing (else dropped, and the request starts from its first token). A kept cache is idle memory: when a
step cannot get blocks, the oldest one goes before any running request is preempted.
"""

from __future__ import annotations

import torch

from kvcache.cache.manager import KVCacheManager
from kvcache.engine.policy_runner import PolicyRowRunner
from kvcache.engine.request import Request
from kvcache.errors import KVCacheError


def common_prefix_len(a: list[int], b: list[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class KeptCaches:
    """Idle per-request caches by conversation, oldest first, each under the id `kept:<conversation>`."""

    def __init__(self, kv: KVCacheManager, runner: PolicyRowRunner):
        self.kv, self.runner = kv, runner
        self.tokens: dict[str, list[int]] = {}  # conversation -> the tokens its kept cache has seen
        self._adopting: dict[str, tuple[str, list[int]]] = {}  # request id -> (conversation, tokens), one step

    @staticmethod
    def seq_id(conversation: str) -> str:
        return f"kept:{conversation}"

    def keep(self, request: Request) -> None:
        """Keep a request's cache and blocks for the next request of its conversation (it finished)."""
        conversation, rid = request.conversation, request.request_id
        if conversation is None or rid not in self.runner.caches:
            return
        self.drop(conversation)
        kid = self.seq_id(conversation)
        self.kv.rename(rid, kid)
        self.runner.rename(rid, kid)
        self.tokens[conversation] = request.all_token_ids[: self.runner.caches[kid].seen]

    def adopt(self, request: Request) -> int:
        """Hand the conversation's kept cache to `request` as the scheduler admits it; returns
        how many of its first tokens the cache holds (0: none). The scheduler then calls
        `admitted` or, when the request must wait, `give_back`."""
        conversation = request.conversation
        tokens = self.tokens.get(conversation) if conversation is not None and request.use_cache else None
        if tokens is None:
            return 0
        kid = self.seq_id(conversation)
        cache = self.runner.caches[kid]
        n = common_prefix_len(tokens, request.all_token_ids[: request.num_tokens - 1])  # one token left for logits
        if n < cache.seen:  # cut it back, if it can be: nothing evicted, no selector state to cut
            try:
                if n == 0 or cache.selectors:
                    raise KVCacheError("cannot cut back")
                with torch.inference_mode():  # the store is rebuilt from its own tensors
                    cache.truncate(n)
            except KVCacheError:  # it evicted (or moved to a cold tier) what it would need back
                self.drop(conversation)
                return 0
        del self.tokens[conversation]
        self.kv.rename(kid, request.request_id)
        self.runner.rename(kid, request.request_id)
        self._adopting[request.request_id] = (conversation, tokens[:n])
        return n

    def admitted(self, request: Request) -> None:
        self._adopting.pop(request.request_id, None)

    def give_back(self, request: Request) -> None:
        """`request` waits after all: the cache it adopted is kept again (unless its
        conversation kept a newer one meanwhile)."""
        entry = self._adopting.pop(request.request_id, None)
        if entry is None:
            return
        conversation, tokens = entry
        if conversation in self.tokens:
            self.kv.free(request.request_id)
            self.runner.forget(request.request_id)
            return
        kid = self.seq_id(conversation)
        self.kv.rename(request.request_id, kid)
        self.runner.rename(request.request_id, kid)
        self.tokens[conversation] = tokens

    def drop(self, conversation: str) -> None:
        """Free the conversation's kept cache and its blocks (none kept: nothing happens)."""
        if self.tokens.pop(conversation, None) is not None:
            kid = self.seq_id(conversation)
            self.kv.free(kid)
            self.runner.forget(kid)

    def drop_oldest(self) -> bool:
        """Free the oldest kept cache; False when none is kept."""
        if not self.tokens:
            return False
        self.drop(next(iter(self.tokens)))
        return True
