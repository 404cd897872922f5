"""The solo runtime's text side on a tiny word-level tokenizer: chat templates rendered as
transformers renders them, a conversation's turns reusing the K/V before them, the history fitted
to its budget; and the interactive loop without sessions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kvcache.engine.sampling_params import SamplingParams
from kvcache.errors import KVCacheError, PromptTooLongError
from kvcache.native import build
from kvcache.solo import SoloChat, SoloGenerator, SoloModel
from kvcache.solo.text import SoloTokenizer
from tests.helpers import write_tiny_packed_gguf as write_packed_gguf
from tests.unit.test_solo import CONFIG, V

pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")
pytestmark = pytest.mark.skipif(not build.wanted() or build.load() is None, reason="no native kernels")

SPECIAL = ["<unk>", "<s>", "</s>", "system", "user", "assistant"]
# loop controls, the transformers-style tojson and a {% generation %} block, as real templates use them
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'tool' %}{% continue %}{% endif %}"
            "<s> {{ m['role'] }} {% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
            "{% else %}{{ m['content'] }}{% endif %} </s> {% endfor %}"
            "{% if add_generation_prompt %}<s> assistant {% endif %}")


@pytest.fixture
def folder(tmp_path):
    """A converted-model folder: tokenizer.json (words w0.. and the specials), its config, a template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(SPECIAL)} | {f"w{i}": i + len(SPECIAL) for i in range(V - len(SPECIAL))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(["<s>", "</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                 "chat_template": TEMPLATE}))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": vocab["</s>"]}))
    return tmp_path


def words(n: int, start: int = 0) -> str:
    return " ".join(f"w{(start + i) % 200}" for i in range(n))


def test_templates_render_the_ids_transformers_renders(folder):
    from transformers import PreTrainedTokenizerFast

    ours = SoloTokenizer(folder)
    theirs = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<s>", eos_token="</s>")
    theirs.chat_template = TEMPLATE
    for messages in ([{"role": "user", "content": words(3)}],
                     [{"role": "system", "content": words(2)}, {"role": "user", "content": words(4, 5)},
                      {"role": "tool", "content": "skipped"}, {"role": "assistant", "content": words(3, 9)},
                      {"role": "user", "content": words(1, 30)}]):
        expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected
        assert ours.chat_ids(messages) == list(expected)
    assert ours.end_ids == {SPECIAL.index("</s>")}
    with pytest.raises(KVCacheError, match="'role' and a string 'content'"):
        ours.chat_ids([{"role": "user"}])


def test_a_template_error_is_one_sentence(folder):
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{{ raise_exception('only user turns') }}"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(KVCacheError, match="could not render the conversation \\(only user turns\\)"):
        SoloTokenizer(folder).chat_ids([{"role": "user", "content": "w1"}])


def chat(tmp_path, folder, **kw) -> SoloChat:
    model = SoloModel.from_gguf(write_packed_gguf(tmp_path / "m.gguf"), CONFIG)
    return SoloChat(SoloGenerator(model, SoloTokenizer(folder)), **kw)


def test_a_second_turn_reuses_the_first_and_equals_a_fresh_conversation(tmp_path, folder):
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    talk = chat(tmp_path, folder, system=words(2))
    first = talk.send(words(3), params)
    second = talk.send(words(2, 40), params)
    assert first.cached_prompt_tokens == 0 and first.prompt_tokens > 0
    # what the model held: the first prompt and its reply but the last token (sampled, never run)
    assert second.cached_prompt_tokens == first.prompt_tokens + len(first.token_ids) - 1
    fresh = chat(tmp_path, folder, system=words(2))
    fresh.messages = talk.messages[:3]  # system, the first turn and its reply: the same history, nothing cached
    assert fresh.send(words(2, 40), params).token_ids == second.token_ids
    stats = talk.stats()
    assert stats["turns"] == 2 and stats["cached_tokens"] == talk.generator.model.length


def test_the_history_is_truncated_or_refused_at_its_budget(tmp_path, folder):
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    talk = chat(tmp_path, folder, max_history_tokens=40)
    for i in range(4):
        out = talk.send(words(6, 10 * i), params)
        assert out.prompt_tokens + params.max_tokens <= 40
    assert talk.truncations > 0 and talk.messages[0]["role"] == "user"
    strict = chat(tmp_path, folder, overflow="error", max_history_tokens=40)
    strict.send(words(6), params)
    strict.send(words(6, 10), params)
    with pytest.raises(PromptTooLongError, match="more than the budget of 40"):
        strict.send(words(6, 20), params)
    with pytest.raises(KVCacheError, match="truncate or error"):
        chat(tmp_path, folder, overflow="summarize")


def test_the_loop_without_sessions_says_so(tmp_path, folder, monkeypatch, capsys):
    from kvcache.cli_chat import repl

    lines = iter(["/save x", "/nope", "exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert repl(chat(tmp_path, folder), SamplingParams(max_tokens=2, temperature=0.0), saves=False) == 0
    out = capsys.readouterr()
    assert "--solo keeps no sessions on disk" in out.out and "/save" not in out.err
    assert "unknown command /nope; commands: /reset" in out.out and "/load" not in out.out.split("unknown")[1]
