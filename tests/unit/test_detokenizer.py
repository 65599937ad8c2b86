"""Incremental detokenization (UTF-8 split across byte tokens) and stop-string handling."""

from __future__ import annotations

import pytest

from pdserve.engine.engine import _TextState
from pdserve.engine.loader.tokenizer import IncrementalDetokenizer, TextTokenizer
from tests.support.tiny_models import byte_tokenizer

MULTIBYTE = "naïve café 🙂👍🏽 中文字 ok"


@pytest.fixture(scope="module")
def byte_tok() -> TextTokenizer:
    """Every byte is one token: any non-ASCII character is split across tokens."""
    return TextTokenizer(byte_tokenizer(320), special_ids=frozenset({0, 1}))


@pytest.fixture(scope="module")
def bundled_tok() -> TextTokenizer:
    """The bundled model's byte-level BPE, read from its GGUF (~2 s)."""
    gguf = pytest.importorskip("gguf")
    from pdserve.engine.loader import ModelNotFound, resolve_model
    from pdserve.engine.loader.gguf_loader import read_tokenizer

    try:
        path = resolve_model(None).path
    except ModelNotFound as exc:
        pytest.skip(str(exc))
    return read_tokenizer(gguf.GGUFReader(str(path)))


def byte_char(b: int) -> str:
    """GPT-2 byte-level alphabet: the character that stands for byte b in the vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    if b in printable:
        return chr(b)
    return chr(256 + [x for x in range(256) if x not in printable].index(b))


def stream(tok: TextTokenizer, prompt: list[int], output: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt)
    deltas = [detok.push(t) for t in output]
    assert "".join(deltas) == detok.text
    return deltas


@pytest.mark.parametrize("text", [MULTIBYTE, "🙂", "é", "a\nb\tc  d", "中"])
def test_byte_tokens_stream_to_the_full_text_without_replacement_chars(byte_tok, text):
    output = byte_tok.encode(text, add_special=False)
    assert len(output) == len(text.encode())  # really one token per byte
    deltas = stream(byte_tok, byte_tok.encode("prompt: "), output)
    assert "".join(deltas) == byte_tok.decode(output) == text
    assert not any("\ufffd" in d for d in deltas)


def test_an_incomplete_character_waits_for_its_last_byte(byte_tok):
    emoji = byte_tok.encode("🙂", add_special=False)  # 4 bytes
    deltas = stream(byte_tok, byte_tok.encode("x"), emoji + byte_tok.encode("!", add_special=False))
    assert deltas == ["", "", "", "🙂", "!"]


def test_output_right_after_a_multibyte_prompt(byte_tok):
    prompt = byte_tok.encode("中文", add_special=False)
    output = byte_tok.encode("字é", add_special=False)
    assert "".join(stream(byte_tok, prompt, output)) == "字é"


@pytest.mark.parametrize("text", [MULTIBYTE, " Hello, world! It's 12:30 — fine.",
                                  "def f(x):\n    return x ** 2\n", "日本語のテキスト 🎉🎉"])
def test_bundled_tokenizer_streams_exactly_what_decode_gives(bundled_tok, text):
    prompt = bundled_tok.encode("Some prompt text")
    output = bundled_tok.encode(text, add_special=False)
    deltas = stream(bundled_tok, prompt, output)
    assert "".join(deltas) == bundled_tok.decode(output) == text
    assert not any("\ufffd" in d for d in deltas)


def test_bundled_tokenizer_bytes_of_one_emoji_one_by_one(bundled_tok):
    """Byte-fallback tokens (one per UTF-8 byte) for a rare character."""
    byte_ids = [bundled_tok.tokenizer.token_to_id(byte_char(b)) for b in "😊".encode()]
    assert None not in byte_ids and bundled_tok.decode(byte_ids) == "😊"
    deltas = stream(bundled_tok, bundled_tok.encode("Hi"), byte_ids)
    assert deltas == ["", "", "", "😊"]


# ---- stop strings (_TextState, the engine's output side) ---------------------------------

class ChunkDetok:
    """A stand-in detokenizer: token i appends chunks[i] to the text."""

    def __init__(self, chunks: list[str]) -> None:
        self.chunks = chunks
        self.text = ""

    def push(self, token_id: int) -> str:
        self.text += self.chunks[token_id]
        return self.chunks[token_id]


def run_stops(chunks: list[str], stops: tuple[str, ...]) -> tuple[list[str], bool]:
    """Stream chunks through _TextState as the engine does; returns deltas, stopped."""
    state = _TextState(ChunkDetok(chunks), stops)
    deltas = []
    for i in range(len(chunks)):
        stopped = state.push(i)
        deltas.append(state.take(final=stopped or i == len(chunks) - 1))
        if stopped:
            return deltas, True
    return deltas, False


def test_stop_string_is_cut_and_never_streamed():
    chunks = list("Hello STOP and more")
    deltas, stopped = run_stops(chunks, ("STOP",))
    assert stopped and "".join(deltas) == "Hello "
    assert not any("S" in d for d in deltas)  # even the partial "S", "ST" were held back


def test_text_that_only_looks_like_a_stop_is_released():
    deltas, stopped = run_stops(list("a STAR is born"), ("STOP",))
    assert not stopped and "".join(deltas) == "a STAR is born"


def test_held_text_is_never_more_than_the_longest_stop_minus_one():
    state = _TextState(ChunkDetok(list("abcdefghij")), ("xyz", "q"))
    streamed = ""
    for i in range(10):
        state.push(i)
        streamed += state.take(final=False)
        assert len(state.detok.text) - len(streamed) <= 2


def test_stop_spanning_several_tokens():
    deltas, stopped = run_stops(["The answer", " is 4", "2.\n\nQ", "uestion: next"], ("\n\nQuestion",))
    assert stopped and "".join(deltas) == "The answer is 42."


def test_stop_inside_one_token_cuts_in_the_middle():
    deltas, stopped = run_stops(["one", " two</s>three"], ("</s>",))
    assert stopped and "".join(deltas) == "one two"


def test_earliest_of_several_stops_wins():
    # both stops arrive in one token: the text ends before the first of them
    deltas, stopped = run_stops(["intro ", "x END y STOP z"], ("STOP", "END"))
    assert stopped and "".join(deltas) == "intro x "


def test_no_stops_streams_everything_at_once():
    state = _TextState(ChunkDetok(["ab", "cd"]), ())
    state.push(0)
    assert state.take(final=False) == "ab"
    state.push(1)
    assert state.take(final=False) == "cd"
