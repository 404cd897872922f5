"""Evaluating KV policies: perplexity, needle in a haystack, decode speed, sweeps (`kvcache eval`).

    from kvcache import LLM
    from kvcache.eval import perplexity
    llm = LLM("smollm2-135m-instruct")
    perplexity(llm, text, context_len=2048, kv_policy="sinks:n_sink=4,window=1020")
"""

from kvcache.eval.perplexity import TokenLosses, perplexity, token_losses

__all__ = ["TokenLosses", "perplexity", "token_losses"]
