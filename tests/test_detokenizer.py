"""Incremental detokenizer tests.

References: the `tokenizers` package's own (Rust) decoder for the embedded tokenizer, and a plain search of the fully
decoded text for stop strings. Streams are pushed one token at a time and in random chunkings.
"""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neoserve.detokenizer import DetokenizerDelta, IncrementalDetokenizer
from neoserve.errors import ValidationError
from neoserve.tokenizer import Tokenizer

TEXTS = [
    "Hello world! This is a plain sentence.",
    "🤗🚀 emoji 👩‍👩‍👧‍👦 family, flags 🇫🇷🇯🇵, skin tone 👍🏽 done",
    "日本語のテキスト、中文混合，한국어 텍스트",
    "e\u0301 combining a\u0308\u0301 o\u0302\u0323 zero\u200bwidth\u200d joiner",
    "def f(x):\n    return x ** 2  # 😀\n",
    "Ελληνικά русский עברית العربية हिन्दी 12345",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load(None)


def reference_decode(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = True) -> str:
    """The tokenizers package's own decoder (ByteLevel, Rust's lossy UTF-8), independent of our byte tables."""
    return tok._backend.decode([i for i in ids if i < tok.vocab_size], skip_special_tokens=skip_special_tokens)


def reference_stop(text: str, stops: list[str], include: bool = False) -> tuple[str, str | None]:
    """Truncates the full text at the stop string that is completed first (longest on a tie)."""
    best = None
    for stop in stops:
        i = text.find(stop)
        if i >= 0 and (best is None or (i + len(stop), -len(stop)) < (best[0] + len(best[1]), -len(best[1]))):
            best = (i, stop)
    if best is None:
        return text, None
    i, stop = best
    return text[: i + len(stop)] if include else text[:i], stop


def chunked(ids: list[int], rng: random.Random, max_chunk: int = 5) -> list[list[int]]:
    out, i = [], 0
    while i < len(ids):
        n = rng.randint(0, max_chunk)  # NOTE: empty pushes happen too (a step where the request produced nothing)
        out.append(ids[i : i + n])
        i += n
    return out


def stream(
    tok: Tokenizer, chunks: list[list[int]], **kwargs
) -> tuple[list[DetokenizerDelta], str, IncrementalDetokenizer]:
    detok = IncrementalDetokenizer(tok, **kwargs)
    deltas = [detok.push(chunk) for chunk in chunks]
    tail = detok.flush()
    return deltas, tail, detok


def joined(deltas: list[DetokenizerDelta], tail: str) -> str:
    return "".join(d.text for d in deltas) + tail


# --- streaming equals decoding ------------------------------------------------------------------------------------


def test_one_token_at_a_time_equals_decode(tok):
    for text in TEXTS:
        ids = tok.encode(text)
        deltas, tail, detok = stream(tok, [[i] for i in ids])
        assert joined(deltas, tail) == text == reference_decode(tok, ids)
        assert detok.text == text
        assert tail == ""
        # never a replacement character mid-stream for valid text: partial characters are held back
        assert all("\ufffd" not in d.text for d in deltas)
        assert not any(d.stopped for d in deltas)


def test_multibyte_character_is_held_back_until_complete(tok):
    ids = tok.encode("🤗")
    assert len(ids) == 3  # one character, three byte-level tokens
    detok = IncrementalDetokenizer(tok)
    assert [detok.push([i]).text for i in ids] == ["", "", "🤗"]


def test_random_chunkings_equal_decode(tok):
    rng = random.Random(7)
    for text in TEXTS:
        ids = tok.encode(text)
        for _ in range(20):
            deltas, tail, _ = stream(tok, chunked(ids, rng))
            assert joined(deltas, tail) == text


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(min_value=0, max_value=49152 + 50), max_size=60),
    st.randoms(use_true_random=False),
    st.booleans(),
)
def test_random_ids_equal_reference_decode(tok, ids, rng, skip):
    """Arbitrary ids: invalid UTF-8, special tokens and ids past the vocabulary included."""
    deltas, tail, _ = stream(tok, chunked(ids, rng), skip_special_tokens=skip)
    assert joined(deltas, tail) == reference_decode(tok, ids, skip) == tok.decode(ids, skip_special_tokens=skip)


def test_incomplete_character_only_replaced_at_flush(tok):
    ids = tok.encode("ok 🤗")[:-1]  # the emoji's last byte never comes
    deltas, tail, detok = stream(tok, [[i] for i in ids])
    assert "".join(d.text for d in deltas) == "ok "
    assert tail == "\ufffd" == reference_decode(tok, ids)[-1]
    assert detok.text == reference_decode(tok, ids)
    assert detok.flush() == ""  # a second flush has nothing left


def test_special_tokens(tok):
    ids = tok.encode("<|im_start|>assistant\nHi<|im_end|>")
    assert joined(*stream(tok, [[i] for i in ids])[:2]) == "assistant\nHi"
    deltas, tail, _ = stream(tok, [[i] for i in ids], skip_special_tokens=False)
    assert joined(deltas, tail) == "<|im_start|>assistant\nHi<|im_end|>"


def test_bad_ids_render_nothing(tok):
    detok = IncrementalDetokenizer(tok)
    assert detok.push([10**9, -3]).text == ""
    assert detok.push(tok.encode("fine")).text == "fine"


# --- stop strings -------------------------------------------------------------------------------------------------


def test_stop_string_spanning_tokens(tok):
    text = "Hello world, this is the END of it"
    ids = tok.encode(text)
    deltas, tail, detok = stream(tok, [[i] for i in ids], stop=["the END"])
    assert len(tok.encode("the END")) > 1
    assert joined(deltas, tail) == "Hello world, this is "
    assert deltas[-1].stopped and deltas[-1].stop_string == "the END"
    assert detok.stopped and detok.stop_string == "the END"
    assert tail == ""


def test_stop_at_first_token(tok):
    ids = tok.encode("Hello world")
    detok = IncrementalDetokenizer(tok, stop=["Hello"])
    first = detok.push(ids[:1])
    assert first == DetokenizerDelta("", True, "Hello")
    assert detok.push(ids[1:]) == DetokenizerDelta("", True, "Hello")  # nothing after a stop
    assert detok.flush() == ""
    assert detok.text == ""


def test_no_output_after_stop(tok):
    ids = tok.encode("one two three four five")
    detok = IncrementalDetokenizer(tok, stop=["two"])
    out = []
    for i in ids:
        delta = detok.push([i])
        out.append(delta)
    stopped_at = next(k for k, d in enumerate(out) if d.stopped)
    assert all(d.text == "" and d.stopped for d in out[stopped_at + 1 :])
    assert "".join(d.text for d in out) == "one "
    assert detok.flush() == ""


def test_multiple_stop_strings_first_completed_wins(tok):
    cases = [
        ("Hello world", ["world", "Hello"], "", "Hello"),
        ("xabcde", ["abcd", "bc"], "xa", "bc"),  # "bc" is complete before "abcd" is
        ("abcde", ["cd", "bcd"], "a", "bcd"),  # same end: the longer one
        ("the cat sat on the mat", ["mat", "sat", "zzz"], "the cat ", "sat"),
    ]
    rng = random.Random(3)
    for text, stops, expected, stop in cases:
        assert reference_stop(text, stops) == (expected, stop)
        ids = tok.encode(text)
        for chunks in [[ids], [[i] for i in ids]] + [chunked(ids, rng) for _ in range(10)]:
            deltas, tail, detok = stream(tok, chunks, stop=stops)
            assert joined(deltas, tail) == expected
            assert detok.stop_string == stop


def test_include_stop_str_in_output(tok):
    ids = tok.encode("Hello world and more")
    deltas, tail, _ = stream(tok, [[i] for i in ids], stop=["world"], include_stop_str_in_output=True)
    assert joined(deltas, tail) == "Hello world"


def test_partial_stop_is_held_back_then_released(tok):
    ids = tok.encode("Hello wor")
    detok = IncrementalDetokenizer(tok, stop=["world!"])
    emitted = "".join(detok.push([i]).text for i in ids)
    assert emitted == "Hello "  # "wor" might still become "world!"
    assert detok.flush() == "wor"
    assert detok.text == "Hello wor"
    assert not detok.stopped


def test_false_alarm_is_released_when_decided(tok):
    detok = IncrementalDetokenizer(tok, stop=["world!"])
    out = [detok.push([i]).text for i in tok.encode("Hello world?")]
    assert "".join(out) == "Hello world?"  # decided at "?" without waiting for flush


def test_stop_inside_multibyte_text(tok):
    ids = tok.encode("日本語です")
    deltas, tail, detok = stream(tok, [[i] for i in ids], stop=["本"])
    assert joined(deltas, tail) == "日"
    assert detok.stop_string == "本"


def test_stop_on_special_token_text(tok):
    ids = tok.encode("Answer<|im_end|>junk")
    deltas, tail, _ = stream(tok, [[i] for i in ids], stop=["<|im_end|>"], skip_special_tokens=False)
    assert joined(deltas, tail) == "Answer"
    # skipped special tokens render nothing, so they cannot match
    deltas, tail, _ = stream(tok, [[i] for i in ids], stop=["<|im_end|>"])
    assert joined(deltas, tail) == "Answerjunk"


def test_empty_stop_string_rejected(tok):
    with pytest.raises(ValidationError):
        IncrementalDetokenizer(tok, stop=[""])


@settings(max_examples=300, deadline=None)
@given(
    st.text(alphabet=st.sampled_from(list("ab c\n日本🤗é")), max_size=40),
    st.lists(st.text(alphabet=st.sampled_from(list("ab c日🤗")), min_size=1, max_size=4), max_size=4),
    st.randoms(use_true_random=False),
    st.booleans(),
)
def test_stop_strings_match_reference_for_any_chunking(tok, text, stops, rng, include):
    ids = tok.encode(text)
    deltas, tail, detok = stream(tok, chunked(ids, rng, 4), stop=stops, include_stop_str_in_output=include)
    expected, stop = reference_stop(text, stops, include)
    assert joined(deltas, tail) == expected
    assert detok.stop_string == stop
    # never emits text it later takes back: every emitted prefix is a prefix of the final text
    so_far = ""
    for d in deltas:
        so_far += d.text
        assert expected.startswith(so_far)


# --- SentencePiece-style leading-space stripping -----------------------------------------------------------------


@pytest.mark.parametrize("style", ["sequence", "metaspace"])
def test_sentencepiece_style_streaming(tmp_path, style):
    from tests.test_tokenizer import build_sentencepiece_dir
    from tokenizers import Tokenizer as Backend

    folder = build_sentencepiece_dir(tmp_path / style, style)
    sp = Tokenizer.from_pretrained_dir(folder)
    reference = Backend.from_file(str(folder / "tokenizer.json"))
    rng = random.Random(5)
    for text in ["Hello world", "  two spaces", "naïve 日本 🤗 ok", "The quick fox."]:
        ids = reference.encode(text, add_special_tokens=True).ids
        for skip in (True, False):
            expected = reference.decode(ids, skip_special_tokens=skip)
            for chunks in [[[i] for i in ids]] + [chunked(ids, rng) for _ in range(5)]:
                deltas, tail, _ = stream(sp, chunks, skip_special_tokens=skip)
                assert joined(deltas, tail) == expected


# --- cost per push ------------------------------------------------------------------------------------------------


def test_push_cost_does_not_grow_with_history(tok):
    """O(new tokens) per push: pushing after 50k tokens of history costs about what it costs at the start."""
    ids = tok.encode(" ".join(TEXTS)) * 50
    probe = ids[:500]

    def cost(history: int, stops: list[str]) -> float:
        detok = IncrementalDetokenizer(tok, stop=stops)
        for k in range(0, history, 1000):
            detok.push(ids[:1000] if k + 1000 <= history else ids[: history - k])
        best = float("inf")
        for _ in range(3):
            start = time.perf_counter()
            for i in probe:
                detok.push([i])
            best = min(best, time.perf_counter() - start)
        return best

    for stops in ([], ["never appears", "zzz"]):
        early, late = cost(0, stops), cost(50_000, stops)
        assert late < 3 * early + 1e-3, (early, late)
