"""A pytest plugin that makes transformers' generation tests run on a kvcache.hf cache.

    pytest -p hf_suite_plugin --kv-policy "window:size=4096" ...   (benchmarks/ on sys.path)

With `--kv-policy dynamic` (the default) nothing is patched: transformers' own DynamicCache runs,
the baseline. With any kvcache policy string, the two places where transformers builds a
default cache for a Llama model build `kvcache.hf.PolicyCache(policy)` instead:
- `GenerationMixin._prepare_cache_for_generation`, the cache `generate()` makes when the caller
  gave none (greedy, sampling, beam search, and the main model of assisted decoding);
- `LlamaModel.forward`'s `DynamicCache(config=...)` when called with `use_cache=True` and no cache.
A cache the test builds itself (StaticCache, a DynamicCache passed in) is left alone.

Tests that need the Hugging Face Hub (the run is offline) are reported as skipped, naming it.
"""

from __future__ import annotations

import contextlib
import warnings

import pytest

BASELINE = "dynamic"
active = BASELINE  # the policy in place now

# errors that mean "this test wanted a file from the Hub", which an offline run cannot give
_OFFLINE_MARKERS = ("offline", "huggingface.co", "hf_hub", "connect to", "local_files_only", "cannot find the requested files")


def install(policy: str):
    """Patch transformers so that its default caches are `PolicyCache(policy)`; return a function that
    undoes the patch. `policy` is a kvcache policy string (checked here, so a bad one fails at once)."""
    import transformers.models.llama.modeling_llama as modeling_llama
    from transformers.cache_utils import DynamicCache
    from transformers.generation.utils import GenerationMixin

    import kvcache.hf

    kvcache.hf.PolicyCache(policy, config=_probe_config())  # a bad policy string fails here, not in every test
    prepare = GenerationMixin._prepare_cache_for_generation
    forward_default = modeling_llama.DynamicCache

    def prepare_policy_cache(self, generation_config, model_kwargs, *args, **kwargs):
        prepare(self, generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("cache")
        if type(cache) is DynamicCache and not getattr(cache, "_is_user_defined", False):
            model_kwargs["cache"] = kvcache.hf.PolicyCache(policy, config=self.config.get_text_config(decoder=True))
            if generation_config.is_assistant and hasattr(model_kwargs["cache"], "activate_past_recording"):
                model_kwargs["cache"].activate_past_recording()

    def forward_policy_cache(*args, config=None, **kwargs):
        return kvcache.hf.PolicyCache(policy, config=config)

    global active
    GenerationMixin._prepare_cache_for_generation = prepare_policy_cache
    modeling_llama.DynamicCache = forward_policy_cache
    active = policy

    def undo() -> None:
        global active
        GenerationMixin._prepare_cache_for_generation = prepare
        modeling_llama.DynamicCache = forward_default
        active = BASELINE

    return undo


@contextlib.contextmanager
def patched(policy: str):
    """`install(policy)` for the duration of a with-block (nothing for the baseline)."""
    undo = install(policy) if policy != BASELINE else (lambda: None)
    try:
        yield
    finally:
        undo()


def _probe_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1)


def pytest_addoption(parser):
    parser.addoption("--kv-policy", default=BASELINE,
                     help="kvcache policy string for transformers' default cache ('dynamic': transformers' own)")


def pytest_configure(config):
    config.addinivalue_line("markers", "generate: transformers' GenerationTesterMixin tests")
    policy = config.getoption("--kv-policy")
    if policy != BASELINE:
        from kvcache.errors import KVCacheError

        try:
            config._kv_undo = install(policy)
        except KVCacheError as e:
            raise pytest.UsageError(f"--kv-policy {policy!r}: {e}") from None


def pytest_unconfigure(config):
    undo = getattr(config, "_kv_undo", None)
    if undo is not None:
        undo()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    """Notes a test method that returned a value instead of running (a decorator of the checkout's test
    that the installed transformers spells otherwise): unittest only warns of it."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return (yield)
        finally:
            item._kv_not_run = any("return a value that is not None from a test case" in str(w.message)
                                   for w in caught)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and call.excinfo is not None and _needs_hub(call.excinfo.value):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, "needs a Hugging Face Hub download (offline run)")
    elif call.when == "call" and report.passed and getattr(item, "_kv_not_run", None):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0,
                           "did not run: the test method returned a value instead (its checkout does not match "
                           "the installed transformers)")
    return report


def _needs_hub(exc: BaseException) -> bool:
    text = f"{type(exc).__name__}: {exc}".lower()
    return isinstance(exc, OSError) and any(marker in text for marker in _OFFLINE_MARKERS)
