"""`LLM`: the synchronous Python facade (load once, then generate / stream / chat)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence

import torch

from kvcache.engine.config import EngineConfig, bytes_per_token, dense_bytes_per_token, row_footprint
from kvcache.engine.history import check_messages
from kvcache.engine.length_rule import check_length
from kvcache.engine.outputs import RequestOutput
from kvcache.engine.sampling import SamplingParams
from kvcache.errors import KVCacheError
from kvcache.models.calibrated_int8 import calibration_ids, rounding_tag
from kvcache.models.linear import slow_dtype_reason
from kvcache.models.llama import LlamaModel
from kvcache.models.heap import return_freed_memory
from kvcache.models.loader import DEFAULT_MODEL, gguf_file, load_model
from kvcache.models.quantization import check_device, resolve_quantization

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}
TRUNCATION_MODES = ("error", "left")


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """torch dtype for 'float32' / 'bfloat16' / 'float16' (or their short names)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise KVCacheError(f"Unknown dtype '{dtype}'; use float32, bfloat16 or float16.") from None


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The device to run on: "cpu" (the default), "cuda" or "cuda:N"; a CUDA device torch
    cannot see is `KVCacheError`, one sentence."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise KVCacheError(f"Unknown device '{device}'; use cpu, cuda or cuda:N.")
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise KVCacheError(f"Device '{device}' was asked for, but this torch sees no CUDA GPU; use --device cpu.")
        if dev.index is not None and dev.index >= count:
            raise KVCacheError(f"Device '{device}' does not exist: this machine has {count} CUDA GPU(s).")
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on a GPU, float32 on the CPU (where bf16 is fast only with bf16 matmul hardware)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def chat_template_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of a conversation rendered with `tokenizer`'s chat template, ready for the reply
    (`tools`: OpenAI tool specs, for a template that renders them)."""
    check_messages(messages)
    extra = {"tools": tools} if tools else {}
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **extra)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


class LLM:
    """A loaded model plus its tokenizer, ready to generate.

    >>> llm = LLM("smollm2-135m-instruct", dtype="float32")
    >>> llm.generate(["Hello"], SamplingParams(max_tokens=8, temperature=0.0))[0].text

    `device`: "cpu" (default) or "cuda[:N]" (attention by Triton kernels over the paged blocks
    when Triton is installed, torch ops otherwise). `dtype`: default bfloat16 on CUDA, float32
    on the CPU.
    """

    def __init__(self, model: str = DEFAULT_MODEL, dtype: str | torch.dtype | None = None,
                 max_model_len: int | None = None, truncation: str = "error", threads: int | None = None,
                 device: str | torch.device | None = None, kernels: str = "auto", progress: bool = True,
                 kv_cache_memory: str | int | None = None, kv_cache_fraction: float | None = None,
                 block_size: int = 16, enable_prefix_caching: bool = True, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, kv_policy: str | None = None, quantization: str = "auto",
                 kv_tier: str | None = None, kv_tier_timeout_ms: float = 250, kv_tier_max_bytes: str | int | None = None,
                 kv_tier_queue: int = 256):
        """`kv_tier`: share full KV blocks with other engines through ``redis://HOST:PORT`` or
        ``disk:PATH`` (written through asynchronously, fetched on a prefix-cache miss within
        `kv_tier_timeout_ms`; see `kvcache.cache.tier`). `kv_tier_max_bytes` bounds a disk tier
        (LRU); `kv_tier_queue` is the write queue's length in blocks (a full queue drops writes)."""
        if truncation not in TRUNCATION_MODES:
            raise KVCacheError(f"truncation must be one of {', '.join(TRUNCATION_MODES)}, got '{truncation}'.")
        if threads is not None:
            if threads <= 0:
                raise KVCacheError(f"threads must be a positive integer, got {threads}.")
            torch.set_num_threads(threads)
        self.device = resolve_device(device)
        self.dtype = default_dtype(self.device) if dtype is None else parse_dtype(dtype)
        slow = slow_dtype_reason(self.dtype, self.device)
        if slow:
            warnings.warn(slow, RuntimeWarning, stacklevel=2)
        self.quantization = resolve_quantization(quantization, gguf_file(model), self.dtype, self.device)
        check_device(self.quantization, self.dtype, self.device)
        loaded = load_model(model, progress=progress, quantization=self.quantization)
        self.name, self.model_dir, self.config = model, loaded.model_dir, loaded.config
        self.tokenizer = loaded.tokenizer
        calibration = calibration_ids(self.tokenizer) if self.quantization == "int8" else None
        self.weights_key = rounding_tag(self.quantization, calibration)  # what K/V kept elsewhere is keyed by
        self.model = LlamaModel.from_state_dict(loaded.config, loaded.state_dict, self.dtype, self.device, kernels,
                                                quantization=self.quantization, consume=True,
                                                calibration_ids=calibration, progress=progress)
        del loaded.state_dict
        return_freed_memory()
        native = self.config.max_position_embeddings
        if max_model_len is not None and max_model_len <= 1:
            raise KVCacheError(f"max_model_len must be at least 2, got {max_model_len}.")
        self.max_model_len = max_model_len or native
        self.truncation = truncation
        eos = set(self.config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos
        from kvcache.cache.paged_plan import paged_plan
        from kvcache.cache.policies.grammar import parse_policy

        self.kv_policy = parse_policy(kv_policy)  # bad policy strings fail here, before any work
        self.paged_plan = paged_plan(self.kv_policy)  # how the paged engine runs it (None: per-request stores)
        self._engine_args = EngineConfig.from_budget(
            self.kv_policy, self.config, self.dtype, self.device, self.max_model_len, kv_cache_memory,
            kv_cache_fraction, block_size, enable_prefix_caching, max_num_seqs, max_num_batched_tokens)
        self.kv_tier = None
        if kv_tier is not None:
            self.kv_tier = self._open_tier(kv_tier, kv_tier_timeout_ms, kv_tier_max_bytes, kv_tier_queue,
                                           loaded.model_dir, kernels)
        self._engine = None

    def _open_tier(self, url: str, timeout_ms: float, max_bytes, queue_blocks: int, model_dir, kernels: str):
        """The shared KV tier for this model's blocks, after checking the engine can use one."""
        import dataclasses
        import json

        from kvcache.cache.spec import parse_size
        from kvcache.cache.tier import KVTier, open_backend
        from kvcache.cache.tier.fingerprint import tier_fingerprint, weights_digest
        from kvcache.models.linear import resolve_kernels

        args = self._engine_args
        if self.paged_plan is None or args.quant_format is not None:
            raise KVCacheError(f"A KV tier holds float paged blocks; the policy '{self.kv_policy.canonical}' keeps "
                               "its K/V in another form.")
        if not args.enable_prefix_caching:
            raise KVCacheError("A KV tier needs prefix caching, which is off.")
        if isinstance(timeout_ms, bool) or not isinstance(timeout_ms, (int, float)) or not timeout_ms > 0:
            raise KVCacheError(f"kv_tier_timeout_ms must be a positive number, got {timeout_ms!r}.")
        if isinstance(queue_blocks, bool) or not isinstance(queue_blocks, int) or queue_blocks < 1:
            raise KVCacheError(f"kv_tier_queue must be a positive number of blocks, got {queue_blocks!r}.")
        bound = parse_size(max_bytes) if max_bytes is not None else None
        backend = open_backend(url, timeout_ms / 1000, bound)
        c = self.config
        shape = (c.num_layers, c.num_kv_heads, args.block_size, c.head_dim)
        fp = tier_fingerprint(
            weights_digest(sorted(model_dir.glob("*.safetensors"))),
            json.dumps(dataclasses.asdict(c), sort_keys=True, default=str), str(self.dtype).removeprefix("torch."),
            self.weights_key, resolve_kernels(kernels, self.dtype, self.device), self.kv_policy.canonical, shape)
        return KVTier(backend, fp, shape, self.dtype, timeout_ms / 1000, queue_blocks)

    # -- the paged engine ---------------------------------------------------------------
    def policy_footprint(self, max_num_batched_tokens: int = 512):
        """The byte bound of a per-request cache (`cache.row_policy.PolicyFootprint`) under a policy
        paged blocks cannot hold, with the engine's default prompt pieces; None for the others."""
        return row_footprint(self.kv_policy, self.config, self.dtype, max_num_batched_tokens)

    @property
    def engine_bytes_per_token(self) -> int:
        """Bytes a token takes in the paged engine's blocks: the model dtype's, the paged
        quantized format's (`quantized:...,key_axis=token,residual=0`), or for per-request
        policy caches their packed rate (`cache.row_policy`)."""
        return bytes_per_token(self.kv_policy, self.config, self.dtype)

    @property
    def engine(self):
        """The continuous-batching engine over the paged KV pool (created on first use)."""
        if self._engine is None:
            from kvcache.engine.engine import LLMEngine

            self._engine = LLMEngine(self.model, self.tokenizer, self.eos_ids, self.max_model_len, self._engine_args,
                                     tier=self.kv_tier)
        return self._engine

    def stats(self) -> dict:
        """Engine figures: KV blocks total/used/cached/free, prefix hit rate, running/waiting, preemptions;
        the weights' quantization and their bytes as held."""
        return {**self.engine.stats(), "quantization": self.quantization, "weight_bytes": self.model.weight_bytes}

    # -- prompts ----------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt given as text or as ids (validated)."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt)["input_ids"]
        else:
            ids = list(prompt)
            vocab = self.config.vocab_size
            if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise KVCacheError(f"Token ids must be integers in [0, {vocab}).")
        if not ids:
            raise KVCacheError("The prompt is empty.")
        return ids

    def fit_prompt(self, ids: list[int], max_tokens: int) -> list[int]:
        """Apply the length rule (prompt + max_tokens <= max_model_len): a `ValueError` in one
        sentence, or with truncation 'left' keep the prompt's last tokens that leave room."""
        check_length(max_tokens, self.max_model_len, len(ids), self.truncation)
        return ids[-(self.max_model_len - max_tokens):]

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of a conversation rendered with the model's chat template, ready for the reply
        (`tools`: OpenAI tool specs, for a template that renders them)."""
        return chat_template_ids(self.tokenizer, messages, tools)

    # -- generation -------------------------------------------------------------------
    def _params(self, params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams() for _ in range(n)]
        if isinstance(params, SamplingParams):
            return [params] * n
        params = list(params)
        if len(params) != n:
            raise KVCacheError(f"Got {len(params)} SamplingParams for {n} prompts.")
        return params

    def preprocess(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None,
                   ) -> tuple[list[list[int]], list[SamplingParams]]:
        """Validated token ids (fitted to max_model_len) and one SamplingParams per prompt, for a
        prompt or a list of prompts (text or token ids); bad input raises `KVCacheError`."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if not prompts:
            raise KVCacheError("No prompts given.")
        plist = self._params(params, len(prompts))
        for sp in plist:
            if sp.structured:  # a schema that does not compile fails here, before any work
                self.engine.grammars.compile(sp)
        ids = [self.fit_prompt(self.encode(p), sp.max_tokens) for p, sp in zip(prompts, plist)]
        return ids, plist

    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_cache: bool = True) -> list[RequestOutput]:
        """Generate for a list of prompts (strings or token-id lists), in the order given.

        All prompts go through the continuous-batching scheduler over the paged KV pool
        (policies blocks cannot hold run on per-request caches in the same batch).
        `use_cache=False` recomputes the whole sequence at every step. `SamplingParams(n=k)`:
        each output carries k samples in `completions` (sample i seeded seed + i); on paged
        blocks their prompt is computed once and its blocks are shared.
        """
        ids, plist = self.preprocess(prompts, params)
        engine = self.engine
        requests = [engine.add_request(p, sp, eos_ids=self.eos_ids, use_cache=use_cache) for p, sp in zip(ids, plist)]
        engine.run_to_completion([s for r in requests for s in r.group])
        return [r.group_output() for r in requests]

    def stream(self, prompt, params: SamplingParams | None = None, use_cache: bool = True) -> Iterator[str]:
        """Yield text pieces of one prompt's completion as they are produced (one sample: n=1)."""
        ids, plist = self.preprocess([prompt], params)
        if plist[0].n > 1:
            raise KVCacheError("Streaming follows one sample; use n=1 (or generate for n > 1).")
        engine = self.engine
        yield from engine.stream(engine.add_request(ids[0], plist[0], eos_ids=self.eos_ids, use_cache=use_cache))

    def new_policy_cache(self, kv_policy: str | None = None):
        """An empty one-sequence `SequenceCache` under `kv_policy` (default: this LLM's policy)."""
        from kvcache.cache.policies.cache import SequenceCache

        return SequenceCache(self.model, self.kv_policy if kv_policy is None else kv_policy)

    def chat(self, messages: list[dict], params: SamplingParams | None = None) -> RequestOutput:
        """One reply to a conversation (list of {'role', 'content'}), no state kept."""
        return self.generate([self.chat_ids(messages)], params)[0]

    def session(self, system: str | None = None, overflow: str = "truncate", max_history_tokens: int | None = None):
        """A multi-turn `ChatSession` whose turns reuse the K/V of the turns before (the engine's prefix cache).

        overflow: "truncate" | "summarize" | "error" when the history would pass
        `max_history_tokens` (default max_model_len)."""
        from kvcache.api.session import ChatSession

        return ChatSession(self, system=system, overflow=overflow, max_history_tokens=max_history_tokens)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes the dense cache spends per token in this model's dtype."""
        return dense_bytes_per_token(self.config, self.dtype)
