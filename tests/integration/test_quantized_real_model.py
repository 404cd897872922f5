"""The real default model with its GGUF's quantized formats kept (quantization="gguf")."""

from __future__ import annotations

import pytest
import torch

from kvcache import LLM, SamplingParams
from kvcache.eval.corpus import corpus_token_ids
from kvcache.eval.perplexity import perplexity
from kvcache.models.gguf_weights import tensor_index
from kvcache.models.loader import DEFAULT_MODEL, load_model, packaged_gguf

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def llms():
    torch.set_num_threads(2)
    return {q: LLM(DEFAULT_MODEL, dtype="float32", progress=False, quantization=q) for q in ("none", "gguf")}


def test_gguf_holds_the_files_quantized_bytes_and_the_same_weights(llms):
    gguf = llms["gguf"].model
    index = tensor_index(packaged_gguf(DEFAULT_MODEL))
    file_bytes = sum(int(torch.tensor(e.shape).prod()) // 32 * {"Q4_1": 20, "Q8_0": 34}[e.type_name]
                     for e in index if e.type_name in ("Q4_1", "Q8_0"))
    norms = sum(e.shape[0] * 4 for e in index if e.type_name == "F32")
    assert gguf.weight_bytes == file_bytes + norms  # 16-row tiles hold exactly the file's blocks here
    assert {lin.formats for lw in gguf.layers for lin in lw.linears()} == {"Q4_1"}
    assert gguf.lm_head.formats == "Q8_0" and gguf.lm_head is gguf.embed
    float_sd = load_model(DEFAULT_MODEL, progress=False).state_dict
    qkv = gguf.layers[3].qkv.dequantize(torch.float32)  # repacking is lossless, Q/K rows in HF order
    want = torch.cat([float_sd[f"model.layers.3.self_attn.{n}_proj.weight"] for n in "qkv"])
    assert torch.equal(qkv, want)
    assert torch.equal(gguf.embed_tokens(torch.tensor([[0, 49151]]))[0], float_sd["model.embed_tokens.weight"][[0, -1]])


def test_gguf_perplexity_is_within_one_percent_of_the_float_weights(llms):
    ids = corpus_token_ids(llms["none"].tokenizer, 256)
    ppl = {q: perplexity(llm, ids, 256) for q, llm in llms.items()}
    assert abs(ppl["gguf"] / ppl["none"] - 1) < 0.01, ppl


def test_gguf_chat_reply_and_stats(llms):
    llm = llms["gguf"]
    out = llm.chat([{"role": "user", "content": "Name three primary colors."}],
                   SamplingParams(max_tokens=24, temperature=0.0))
    assert "Red" in out.text and "Blue" in out.text
    assert llm.stats()["quantization"] == "gguf"


def test_the_default_model_runs_its_gguf_formats_by_default():
    from kvcache.models.quantization import resolve_quantization

    path = packaged_gguf(DEFAULT_MODEL)
    for dtype in (torch.float32, torch.bfloat16):
        assert resolve_quantization("auto", path, dtype, torch.device("cpu")) == "gguf"
    assert resolve_quantization("auto", path, torch.float16, torch.device("cpu")) == "none"


def test_the_fused_decode_step_gives_the_layer_by_layer_tokens_and_logprobs(llms):
    """The default model's decode steps run every layer in one native call (`models.fused_decode`):
    the same bits as the layer-by-layer path, over a batch of three requests."""
    llm = llms["gguf"]
    fused = llm.model.fused_layers
    assert fused is not None
    prompts = [llm.tokenizer.encode(p) for p in ("The capital of France is", "def fib(n):", "Once upon a time")]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=1)

    def run():
        return [(o.token_ids, [lp.logprob for lp in o.logprobs]) for o in llm.generate(prompts, params)]

    with_fused = run()
    llm.model.fused_layers = None
    try:
        layer_by_layer = run()
    finally:
        llm.model.fused_layers = fused
    assert with_fused == layer_by_layer
