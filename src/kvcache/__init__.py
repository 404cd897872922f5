"""kvcache: an LLM inference engine built around an explicit, measurable KV cache."""

from kvcache.api.llm import LLM
from kvcache.engine.outputs import RequestMetrics, RequestOutput
from kvcache.engine.sampling import SamplingParams
from kvcache.errors import KVCacheError

__all__ = ["LLM", "KVCacheError", "RequestMetrics", "RequestOutput", "SamplingParams"]
__version__ = "0.1.0"
