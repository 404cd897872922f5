"""IncrementalDetokenizer: safe text deltas, stop strings, held-back partial characters."""

from __future__ import annotations

import pytest

from kvcache.engine.detokenizer import IncrementalDetokenizer


class PieceTokenizer:
    """Each id is a fixed piece of text; id 0 is a special token dropped when skipping."""

    def __init__(self, pieces: list[str]):
        self.pieces = ["<special>"] + pieces

    def ids(self, *pieces: str) -> list[int]:
        return [self.pieces.index(p) for p in pieces]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(self.pieces[i] for i in ids if not (skip_special_tokens and i == 0))


class ByteTokenizer:
    """One id per byte; decoding replaces incomplete UTF-8 with U+FFFD like HF byte-level BPE."""

    @staticmethod
    def encode(text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens=True):
        return bytes(ids).decode("utf-8", errors="replace")


def run(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    """Feed ids until the detokenizer stops; return the deltas (flush included, last)."""
    deltas = []
    for i in ids:
        deltas.append(detok.add(i))
        if detok.stopped:
            break
    deltas.append(detok.flush())
    return deltas


# ----------------------------------------------------------------------------- without stop strings


def test_deltas_concatenate_to_full_text_pieces():
    tok = PieceTokenizer(["Hel", "lo", ",", " wor", "ld", "!"])
    ids = tok.ids("Hel", "lo", ",", " wor", "ld", "!")
    detok = IncrementalDetokenizer(tok)
    deltas = run(detok, ids)
    assert deltas[:-1] == ["Hel", "lo", ",", " wor", "ld", "!"]  # nothing to hold back: emitted at once
    assert "".join(deltas) == detok.text == "Hello, world!"
    assert not detok.stopped


def test_special_tokens_are_skipped():
    tok = PieceTokenizer(["a", "b"])
    detok = IncrementalDetokenizer(tok)
    assert "".join(run(detok, [1, 0, 2, 0])) == "ab"


@pytest.mark.parametrize("text", ["Café au lait", "東京 and 北京", "rocket 🚀🙂 end", "é", "🙂"])
def test_incomplete_utf8_is_held_back(text):
    tok = ByteTokenizer()
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    deltas = run(detok, ids)
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)  # a partial character is never shown
    assert deltas[-1] == ""  # nothing was left for the end: every character completed


def test_incomplete_utf8_at_the_end_is_flushed():
    tok = ByteTokenizer()
    ids = tok.encode("ok 🙂")[:-1]  # generation stopped mid-character
    detok = IncrementalDetokenizer(tok)
    deltas = run(detok, ids)
    assert "".join(deltas[:-1]) == "ok "
    assert "".join(deltas) == tok.decode(ids) == "ok \ufffd"


def test_invalid_byte_in_the_middle_is_emitted_once_followed():
    tok = ByteTokenizer()
    ids = [ord("a"), 0xFF, ord("b")]
    detok = IncrementalDetokenizer(tok)
    deltas = run(detok, ids)
    assert deltas[:3] == ["a", "", "\ufffdb"]
    assert "".join(deltas) == tok.decode(ids)


def test_tiny_tokenizer_round_trip(tiny_tokenizer):
    text = "Hello, how are you? Café, naïve, 東京 🙂 🚀 crème brûlée."
    ids = tiny_tokenizer(text)["input_ids"]
    # the byte-level tokenizer really splits some character across ids here
    assert any(tiny_tokenizer.decode(ids[:n]).endswith("\ufffd") for n in range(1, len(ids)))
    detok = IncrementalDetokenizer(tiny_tokenizer)
    deltas = run(detok, ids)
    assert "".join(deltas) == tiny_tokenizer.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in d for d in deltas)


# ----------------------------------------------------------------------------- stop strings


def check_stream(tok, ids, stop, expected):
    detok = IncrementalDetokenizer(tok, stop)
    shown = ""
    for i in ids:
        shown += detok.add(i)
        assert expected.startswith(shown), f"leaked {shown!r}, expected a prefix of {expected!r}"
        if detok.stopped:
            break
    shown += detok.flush()
    assert shown == detok.text == expected
    return detok


def test_stop_string_split_across_tokens():
    tok = PieceTokenizer(["Hello", " wor", "ld.", " ST", "OP", " more"])
    detok = check_stream(tok, tok.ids("Hello", " wor", "ld.", " ST", "OP", " more"), ["STOP"], "Hello world. ")
    assert detok.stopped


def test_stop_string_inside_one_token_cuts_the_token():
    tok = PieceTokenizer(["abc", "xySTOPz", "tail"])
    detok = check_stream(tok, tok.ids("abc", "xySTOPz", "tail"), ["STOP"], "abcxy")
    assert detok.stopped


def test_stop_string_at_the_very_start():
    tok = PieceTokenizer(["STOP", "x"])
    detok = IncrementalDetokenizer(tok, ["STOP"])
    assert detok.add(1) == ""
    assert detok.stopped and detok.text == "" and detok.flush() == ""


def test_partial_stop_prefix_is_held_then_released():
    tok = PieceTokenizer(["say ", "ST", "AR", "T", "!"])
    ids = tok.ids("say ", "ST", "AR", "T", "!")
    detok = IncrementalDetokenizer(tok, ["STOP"])
    shown = detok.add(ids[0]) + detok.add(ids[1])
    assert "say ".startswith(shown)  # "ST" could still become "STOP": not shown yet
    for i in ids[2:]:
        shown += detok.add(i)
    shown += detok.flush()
    assert shown == detok.text == "say START!" and not detok.stopped


def test_several_stop_strings():
    tok = PieceTokenizer(["one", "\n", "two", "EN", "D", "\n\n"])
    ids = tok.ids("one", "\n", "two", "EN", "D", "\n\n")
    check_stream(tok, ids, ["\n\n", "END"], "one\ntwo")
    check_stream(tok, ids, ["\n\n"], "one\ntwoEND")
    check_stream(tok, ids, ["nope"], "one\ntwoEND\n\n")


def test_stop_string_with_multibyte_characters():
    tok = ByteTokenizer()
    text = "le café est très bon"
    check_stream(tok, tok.encode(text), ["très"], "le café est ")
    check_stream(tok, tok.encode(text), ["é"], "le caf")


@pytest.mark.parametrize("stop", ["a", "ab", "abc", "b", "xyz"])
def test_stop_equivalent_to_cutting_the_full_text(stop):
    """For every split of a text into tokens, the output is the text up to the first stop."""
    text = "zzabxabcaby"
    expected = text[: text.find(stop)] if stop in text else text
    tok = PieceTokenizer(list(text))
    for size in (1, 2, 3, 4):
        chunks = [text[i : i + size] for i in range(0, len(text), size)]
        ptok = PieceTokenizer(sorted(set(chunks)))
        check_stream(ptok, ptok.ids(*chunks), [stop], expected)
    check_stream(tok, [tok.pieces.index(c) for c in text], [stop], expected)


# ----------------------------------------------------------------------------- cost per token


class CountingTokenizer(ByteTokenizer):
    """A ByteTokenizer that records how many ids each decode call was given."""

    def __init__(self):
        self.sizes: list[int] = []

    def decode(self, ids, skip_special_tokens=True):
        self.sizes.append(len(ids))
        return super().decode(ids, skip_special_tokens)


def test_each_token_decodes_a_short_window_not_the_whole_output():
    tok = CountingTokenizer()
    text = "a long answer, é 東京 🙂, " * 40  # ~1,000 bytes, multibyte characters split across ids
    deltas = run(IncrementalDetokenizer(tok), tok.encode(text))
    assert "".join(deltas) == text
    assert max(tok.sizes) <= 8  # a 4-byte character and its context, however long the output


def test_random_ids_match_a_full_decode(tiny_tokenizer):
    import random

    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(tiny_tokenizer)) for _ in range(rng.randrange(1, 60))]
        detok = IncrementalDetokenizer(tiny_tokenizer)
        deltas = run(detok, ids)
        assert "".join(deltas) == detok.text == tiny_tokenizer.decode(ids, skip_special_tokens=True)


class CleanupTokenizer(PieceTokenizer):
    """Joins pieces, then drops a space before punctuation (clean_up_tokenization_spaces):
    a piece can change how the text before it decodes."""

    def decode(self, ids, skip_special_tokens=True):
        return super().decode(ids, skip_special_tokens).replace(" ,", ",").replace(" .", ".")


def test_context_that_decodes_differently_with_the_new_id_falls_back_to_a_full_decode():
    tok = CleanupTokenizer(["Hi", " ", ",", "you", "."])
    ids = tok.ids("Hi", " ", ",", " ", "you", " ", ".")
    detok = IncrementalDetokenizer(tok)
    run(detok, ids)
    assert detok.text == tok.decode(ids) == "Hi, you."
