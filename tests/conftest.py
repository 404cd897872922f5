"""Shared fixtures: a tiny random-weight Llama written as a complete Hugging Face folder.

Everything is built in-process (no network): a byte-level BPE tokenizer trained on the
text below, a ChatML chat template, and a 2-layer GQA Llama with seeded random weights.
"""

from __future__ import annotations

import pytest
import torch

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TINY_VOCAB = 400
TINY_SEED = 1234

CORPUS = """
The quick brown fox jumps over the lazy dog while the small cat sleeps in the warm sun.
A key value cache stores the keys and values of every token so that the model does not
compute them again at each step of generation. Memory grows with the number of layers,
the number of heads, the size of each head and the length of the sequence. When the
cache is full the engine must either stop, drop old tokens or move them somewhere else.
Once upon a time there was a little robot who loved to read books about the stars, the
moon and the deep blue sea. Every morning the robot walked to the library, said hello to
the librarian and asked for a new story. The librarian smiled and gave the robot a book
about dragons, castles, brave knights and clever queens who solved hard puzzles.
Numbers are fun too: one, two, three, four, five, six, seven, eight, nine and ten.
Programs in Python use functions, classes, lists, dictionaries and loops; a test checks
that the code does what it should do, and a good test can fail when the code is wrong.
The weather today is sunny with a light breeze from the west, and tomorrow it may rain.
Hello, how are you? I am fine, thank you. What is your name? My name is Tiny Model.
Please tell me a joke about a computer. Why did the computer go to the doctor? Because
it had a virus! Can you write a short poem about the ocean? Waves roll in, waves roll
out, the sea sings softly all about. What is the capital of France? Paris is the capital.
Explain attention in one sentence: each token looks at the tokens before it and mixes
their values by how well its query matches their keys. Rotary embeddings turn the query
and key vectors by an angle that depends on the position, so attention sees distance.
Café, naïve, déjà vu, jalapeño and crème brûlée are words with accents; 東京 and 北京 are
cities, and emoji like 🙂 or 🚀 take four bytes each in UTF-8.
""" * 3


def build_tokenizer():
    """A byte-level BPE tokenizer trained here, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
    )


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A complete HF model folder: config.json, model.safetensors, tokenizer files."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_tokenizer.save_pretrained(folder)
    eos = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    pad = tiny_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = LlamaConfig(
        vocab_size=len(tiny_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        initializer_range=0.2,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,
    )
    torch.manual_seed(TINY_SEED)
    model = LlamaForCausalLM(config).eval()
    # Random norms (around 1) so that layers differ and logits are spread out, not near-ties.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir):
    import kvcache

    return kvcache.LLM(str(tiny_model_dir), dtype="float32", device="cpu", progress=False)


@pytest.fixture(scope="session")
def hf_tiny(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def one_torch_thread():
    """The tiny model is fastest on one thread, which also keeps it immune to a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A redis-server on a free 127.0.0.1 port for the session (maxmemory + allkeys-lru, no
    persistence), stopped at the end; the test skips, saying why, when redis-server is absent."""
    from kvcache.bench.redis_server import RedisServer, redis_server_binary
    from tests.redis_server import SKIP_REASON

    if redis_server_binary() is None:
        pytest.skip(SKIP_REASON)
    pytest.importorskip("redis", reason="the redis client is not installed (pip install -e '.[test]')")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """The session's Redis server, emptied for this test."""
    redis_server.client().flushall()
    return redis_server.url
