"""The torch-free single-user runtime (`kvcache.solo`) against the engine's model on the same GGUF."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from kvcache.cache.dense import KVCache
from kvcache.errors import KVCacheError, ModelFormatError
from kvcache.models.config import LlamaConfig
from kvcache.models.gguf_weights import gguf_state_dict
from kvcache.models.llama import LlamaModel
from kvcache.engine.sampling_params import SamplingParams
from kvcache.native import build
from kvcache.solo import SoloGenerator, SoloModel, load_solo
from tests.helpers import PACKED_SHAPE, feed
from tests.helpers import write_tiny_packed_gguf as write_packed_gguf

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(not build.wanted() or build.load() is None, reason="no native kernels")

H, I, V, HEADS, KV_HEADS, D = PACKED_SHAPE
CONFIG = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=I, num_layers=2, num_heads=HEADS,
                     num_kv_heads=KV_HEADS, head_dim=D, max_position_embeddings=128, rms_norm_eps=1e-5,
                     rope_theta=10000.0, tie_word_embeddings=True)


def engine_model(path, config) -> LlamaModel:
    """The engine's model (quantization="gguf", float32) on the same file."""
    return LlamaModel.from_state_dict(config, gguf_state_dict(path, config.num_heads, config.num_kv_heads),
                                      torch.float32, "cpu", quantization="gguf")


def engine_logits(path, config, ids: list[int], chunk: int) -> torch.Tensor:
    """The engine's logits (T, V) for every position."""
    cache = KVCache(config.num_layers, 1, config.num_kv_heads, config.head_dim, capacity=64, dtype=torch.float32)
    return feed(engine_model(path, config), cache, ids, chunk)


def solo_model(path, config=CONFIG, **kw) -> SoloModel:
    """The runtime on the same file, with the engine's RoPE tables: the activations' int8 rounding
    turns a last-place difference in a table into a different code now and then, and the checks
    below compare everything else exactly (the tables themselves: `test_rope_tables_...`)."""
    solo = SoloModel.from_gguf(path, config, **kw)
    rope = engine_model(path, config).rope
    rope.slice(0, solo.max_len)  # grown to the runtime's context
    solo.cos, solo.sin = rope.cos[:solo.max_len].numpy().copy(), rope.sin[:solo.max_len].numpy().copy()
    return solo


def test_rope_tables_equal_the_engines_to_the_last_place():
    from kvcache.models.rope import RotaryTable
    from kvcache.solo.model import rope_tables

    for d, theta in ((64, 100000.0), (16, 10000.0), (128, 500000.0)):
        ref = RotaryTable(d, theta, None, 4096, "cpu", torch.float32)
        cos, sin = rope_tables(d, theta, 4096)
        for ours, theirs in ((cos, ref.cos), (sin, ref.sin)):
            ulp = np.spacing(np.abs(theirs.numpy()))
            assert (np.abs(ours - theirs.numpy()) <= ulp).all() and (ours == theirs.numpy()).mean() > 0.9


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("matrix_type", ["Q4_1", "Q4_0", "Q8_0"])
def test_solo_logits_match_the_engine_on_the_same_gguf(tmp_path, matrix_type, tied):
    path = write_packed_gguf(tmp_path / "m.gguf", matrix_type, tied)
    config = LlamaConfig(**{**CONFIG.__dict__, "tie_word_embeddings": tied})
    ids = [int(i) for i in np.random.default_rng(1).integers(0, V, 40)]
    ref = engine_logits(path, config, ids, chunk=8)  # (T, V)
    solo = solo_model(path, config)
    prompt = solo.forward(ids[:30])  # a prompt chunk, then decode steps one token each
    torch.testing.assert_close(torch.from_numpy(prompt), ref[29], rtol=1e-3, atol=1e-3)
    for t in range(30, 40):
        torch.testing.assert_close(torch.from_numpy(solo.forward([ids[t]])), ref[t], rtol=1e-3, atol=1e-3)
    assert solo.length == 40


def test_a_prompt_chunk_equals_its_tokens_one_at_a_time(tmp_path):
    path = write_packed_gguf(tmp_path / "m.gguf")
    ids = [int(i) for i in np.random.default_rng(2).integers(0, V, 25)]
    whole = SoloModel.from_gguf(path, CONFIG)
    chunked = whole.forward(ids)
    single = SoloModel.from_gguf(path, CONFIG)
    for t in ids:
        one = single.forward([t])
    np.testing.assert_allclose(chunked, one, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(whole.k[:, :, :25], single.k[:, :, :25], rtol=1e-5, atol=1e-5)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kw)


class _Tokens:
    """A tokenizer stand-in: token i is the character chr(97 + i % 26); token 0 ends a reply."""

    end_ids = frozenset({0})

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + i % 26) for i in ids)


def test_greedy_generation_matches_the_engines_argmax_and_a_second_turn_reuses_the_prefix(tmp_path):
    path = write_packed_gguf(tmp_path / "m.gguf")
    prompt = [int(i) for i in np.random.default_rng(3).integers(1, V, 12)]
    gen = SoloGenerator(solo_model(path), _Tokens())
    out = gen.generate(prompt, greedy(6))
    ids = list(prompt)
    for _ in range(len(out.token_ids)):  # the engine's greedy continuation, recomputed from scratch
        ids.append(int(engine_logits(path, CONFIG, ids, chunk=len(ids))[-1].argmax()))
    assert out.token_ids == ids[len(prompt):] and out.finish_reason in ("length", "stop")
    assert out.cached_prompt_tokens == 0 and out.prompt_tokens == 12

    follow = prompt + out.token_ids[:3] + [5, 6]  # shares the first 15 tokens with what the model holds
    again = gen.generate(follow, greedy(4))
    fresh = SoloGenerator(SoloModel.from_gguf(path, CONFIG), _Tokens()).generate(follow, greedy(4))
    assert again.cached_prompt_tokens == 15 and again.token_ids == fresh.token_ids


def test_sampling_top_k_or_top_p_narrowed_to_one_is_greedy_and_a_seed_repeats(tmp_path):
    gen = SoloGenerator(SoloModel.from_gguf(write_packed_gguf(tmp_path / "m.gguf"), CONFIG), _Tokens())
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    argmax = gen.generate(prompt, greedy(8)).token_ids
    assert gen.generate(prompt, SamplingParams(max_tokens=8, temperature=0.8, top_k=1, seed=0)).token_ids == argmax
    assert gen.generate(prompt, SamplingParams(max_tokens=8, temperature=0.8, top_p=1e-6, seed=0)).token_ids == argmax
    a = gen.generate(prompt, SamplingParams(max_tokens=8, temperature=1.5, seed=7)).token_ids
    b = gen.generate(prompt, SamplingParams(max_tokens=8, temperature=1.5, seed=7)).token_ids
    c = gen.generate(prompt, SamplingParams(max_tokens=8, temperature=1.5, seed=8)).token_ids
    assert a == b and a != c


def test_top_p_draws_only_from_the_smallest_set_reaching_it():
    from kvcache.solo.runner import token_picker

    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    pick = token_picker(SamplingParams(temperature=1.0, top_p=0.75, seed=1), None)
    drawn = {pick(logits) for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.75; 0.5 alone does not


def test_stop_strings_cut_the_reply_and_are_never_streamed(tmp_path):
    gen = SoloGenerator(SoloModel.from_gguf(write_packed_gguf(tmp_path / "m.gguf"), CONFIG), _Tokens())
    full = gen.generate([7, 8, 9], greedy(8))
    stop = full.text[3:5]
    pieces = list(gen.stream([7, 8, 9], greedy(8, stop=[stop])))
    cut = pieces[-1]
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
    assert "".join(pieces[:-1]) == cut.text  # the stop string's first characters were held back
    assert gen.generate([7, 8, 9], greedy(8, stop=[""])).text == full.text  # an empty stop string is none


def test_sampling_options_it_does_not_run_are_one_sentence(tmp_path):
    gen = SoloGenerator(SoloModel.from_gguf(write_packed_gguf(tmp_path / "m.gguf"), CONFIG), _Tokens())
    for kw in ({"repetition_penalty": 1.2}, {"logprobs": 2}, {"n": 2}, {"json_object": True}):
        with pytest.raises(KVCacheError, match="the solo runtime does not run"):
            gen.generate([1, 2], greedy(4, **kw))
    with pytest.raises(KVCacheError, match="the context is 128, so at most 28 can be generated"):
        gen.generate([1] * 100, greedy(29))


def test_the_runtime_imports_no_torch(tmp_path):
    path = write_packed_gguf(tmp_path / "m.gguf")
    code = ("import sys; from pathlib import Path; from kvcache.models.config import LlamaConfig; "
            "from kvcache.solo import SoloModel; "
            f"m = SoloModel.from_gguf(Path({str(path)!r}), LlamaConfig(**{CONFIG.__dict__!r})); "
            "print(m.argmax(m.forward([1, 2, 3])), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[1] == "False" and 0 <= int(out[0]) < V


def test_what_it_cannot_run_is_one_sentence(tmp_path):
    path = write_packed_gguf(tmp_path / "f16.gguf", up_type="F16")
    with pytest.raises(ModelFormatError, match="stores blk.0.ffn_up.weight as F16; the solo runtime runs"):
        SoloModel.from_gguf(path, CONFIG)
    mixed = write_packed_gguf(tmp_path / "mixed.gguf", up_type="Q4_0")  # gate Q8_0 beside up Q4_0
    with pytest.raises(ModelFormatError, match="gate and up into one packed matrix"):
        SoloModel.from_gguf(mixed, CONFIG)
    with pytest.raises(KVCacheError, match="runs a GGUF file"):
        load_solo(str(tmp_path))
    solo = SoloModel.from_gguf(write_packed_gguf(tmp_path / "m.gguf"), CONFIG, max_len=8)
    with pytest.raises(KVCacheError, match="past the context of 8"):
        solo.forward(list(range(9)))
    with pytest.raises(KVCacheError, match="token ids must be in 0..299"):
        solo.forward([300])


def test_every_positions_logits_equal_the_last_ones_step_by_step(tmp_path):
    path = write_packed_gguf(tmp_path / "m.gguf")
    ids = [int(i) for i in np.random.default_rng(4).integers(0, V, 20)]
    every = SoloModel.from_gguf(path, CONFIG).forward(ids, every=True)  # (T, V)
    steps = SoloModel.from_gguf(path, CONFIG)
    last = np.stack([steps.forward([t]) for t in ids])
    assert every.shape == (20, V)
    np.testing.assert_allclose(every, last, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("flags,named", [(["--kv-policy", "window:size=64"], "--kv-policy"),
                                         (["--quantization", "int8"], "--quantization"),
                                         (["--device", "cuda"], "--device"),
                                         (["--repetition-penalty", "1.2"], "--repetition-penalty")])
def test_flags_the_solo_runtime_cannot_honour_exit_2_naming_them(capsys, flags, named):
    from kvcache.cli import main

    assert main(["chat", "--solo", "--message", "hi", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --solo runs") and f"; {named} needs the engine (drop --solo)." in err
    assert len(err.strip().splitlines()) == 1


def test_token_losses_are_the_log_softmax_of_every_positions_logits(tmp_path, monkeypatch):
    path = write_packed_gguf(tmp_path / "m.gguf")
    ids = [int(i) for i in np.random.default_rng(6).integers(0, V, 30)]
    logits = torch.from_numpy(SoloModel.from_gguf(path, CONFIG).forward(ids, every=True)).double()  # (T, V)
    expected = -torch.log_softmax(logits[:-1], -1)[torch.arange(29), torch.tensor(ids[1:])]
    from kvcache.solo import model as solo_model_module

    monkeypatch.setattr(solo_model_module, "PROMPT_CHUNK", 8)  # chunk borders inside the prompt
    losses = SoloModel.from_gguf(path, CONFIG).token_losses(ids)
    assert losses.shape == (29,)
    np.testing.assert_allclose(losses, expected.numpy(), rtol=1e-4, atol=1e-4)


def test_files_the_runtime_cannot_run_safely_are_refused_before_any_kernel_runs(tmp_path):
    path = write_packed_gguf(tmp_path / "m.gguf")
    wide = LlamaConfig(**{**CONFIG.__dict__, "num_heads": 64, "num_kv_heads": 2})  # 32 query heads per KV head
    with pytest.raises(ModelFormatError, match="query heads per KV head; the native attention takes at most 256 and 16"):
        SoloModel.from_gguf(path, wide)
    other = LlamaConfig(**{**CONFIG.__dict__, "intermediate_size": 128})
    with pytest.raises(ModelFormatError, match=r"holds blk.0.ffn_gate.weight as \(96, 64\), but its config makes it"):
        SoloModel.from_gguf(path, other)
    truncated = tmp_path / "short.gguf"
    truncated.write_bytes(path.read_bytes()[:-4096])
    with pytest.raises(ModelFormatError, match="unreadable tensor"):
        SoloModel.from_gguf(truncated, CONFIG)


def test_a_file_with_rope_frequency_factors_is_refused(tmp_path):
    path = write_packed_gguf(tmp_path / "scaled.gguf", extra={"rope_freqs.weight": (np.ones(D // 2, np.float32), "F32")})
    with pytest.raises(ModelFormatError, match="scales its RoPE by frequency factors"):
        SoloModel.from_gguf(path, CONFIG)


def test_large_matrices_repack_by_blocks_of_rows_as_in_one_piece(monkeypatch):
    from kvcache.models import packed_tiles
    from kvcache.models.gguf_file import block_tiles

    rows = np.random.default_rng(7).integers(0, 256, (100, 3 * 20), dtype=np.uint8)  # 100 rows of Q4_1 blocks
    whole = block_tiles(rows, "Q4_1")
    monkeypatch.setattr(packed_tiles, "ROWS_AT_ONCE", 32)  # 32, 32, 32 and 4 rows
    parts = block_tiles(rows, "Q4_1")
    assert whole[0] == parts[0] == "q4" and whole[1].shape == (7, 3 * 320) and np.array_equal(whole[1], parts[1])


def test_token_losses_need_two_tokens(tmp_path):
    with pytest.raises(KVCacheError, match="at least two tokens"):
        SoloModel.from_gguf(write_packed_gguf(tmp_path / "m.gguf"), CONFIG).token_losses([5])
