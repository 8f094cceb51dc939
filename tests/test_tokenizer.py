"""Tokenizer tests: llama.cpp's ids (oracle file), transformers' GGUF tokenizer and chat templates as references."""

from __future__ import annotations

import copy
import hashlib
import json
import random
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from neoserve.errors import ModelLoadError, ValidationError
from neoserve.model_files import embedded_model_path
from neoserve.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]


# NOTE: vendored (tests/data/README.md: provenance and checksum), so the tests pass from a clone made anywhere.
ORACLE = Path(__file__).resolve().parent / "data" / "smollm2_tokenizer_llamacpp.jsonl"
ORACLE_SHA256 = "552c8660e2af704220dfe83b52eeaf0fd63fefa8105236ad259f03d109e0fddd"


def test_oracle_is_vendored_unchanged():
    """The oracle is read from the repository only, and is the file its README describes."""
    assert ORACLE.is_relative_to(REPO)
    assert hashlib.sha256(ORACLE.read_bytes()).hexdigest() == ORACLE_SHA256
    assert ORACLE_SHA256 in (ORACLE.parent / "README.md").read_text()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.load(None)


@pytest.fixture(scope="module")
def oracle() -> list[dict]:
    with open(ORACLE, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def hf():
    """transformers' own tokenizer for the embedded GGUF (independent reference; lacks SmolLM's digit rule)."""
    from transformers import AutoTokenizer

    path = embedded_model_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def gguf_tokenizer_fields() -> dict:
    import gguf

    reader = gguf.GGUFReader(embedded_model_path())
    keys = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.chat_template")
    return {key: reader.fields[key].contents() for key in keys}


def write_gguf(path: Path, fields: dict, pre: str | None, model: str = "gpt2", add_bos: bool | None = None) -> Path:
    """A metadata-only GGUF holding the given tokenizer (no tensors)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    if pre is not None:
        writer.add_tokenizer_pre(pre)
    writer.add_token_list(fields["tokenizer.ggml.tokens"])
    if fields.get("tokenizer.ggml.merges") is not None:
        writer.add_token_merges(fields["tokenizer.ggml.merges"])
    if fields.get("tokenizer.ggml.token_type") is not None:
        writer.add_token_types(fields["tokenizer.ggml.token_type"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    if fields.get("tokenizer.chat_template"):
        writer.add_chat_template(fields["tokenizer.chat_template"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def digit_rule_may_matter(text: str) -> bool:
    """Where SmolLM's digit rule can change the split: a number character after whitespace or another number.

    transformers' GPT-2 regex keeps a space and a run of digits together (" ?\\p{N}+"); llama.cpp cuts every digit
    out first. The vocabulary has no merges for ASCII digit runs, but it has some for a space and a digit of other
    scripts, and a run of whitespace before a digit ("a  1") is split differently.
    """

    def is_number(ch: str) -> bool:
        return unicodedata.category(ch).startswith("N")

    return any(is_number(text[i]) and (text[i - 1].isspace() or is_number(text[i - 1])) for i in range(1, len(text)))


TRICKY = [
    "Hello world",
    "  leading and trailing  ",
    "naïve café résumé Ωmega ß",
    "日本語のテキストと中文混合",
    "한국어 텍스트",
    "🤗🚀 emoji 👩‍👩‍👧‍👦 family, flags 🇫🇷🇯🇵, skin 👍🏽",
    "e\u0301 combining a\u0308\u0301 zero\u200bwidth\u200d joiner\ufeffbom",
    "def f(x):\n    return x ** 2  # comment\n\tif x != y: pass\r\n",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more<repo_name>x<file_sep>",
    "<|im_start|<|im_end|> partial markers <|im_star",
    "It's they're we've I'm you'll he'd",
    "12345 3.14159 1,000,000 x=42",
    "\n\n\n   \t\t  \u00a0\u3000",
    "{\"json\": [1, 2, {\"k\": null}]}",
    "mixed Ελληνικά русский עברית العربية हिन्दी",
    "",
]


# --- llama.cpp oracle --------------------------------------------------------------------------------------------


def test_oracle_all_strings_match_llamacpp(tok, oracle):
    assert len(oracle) == 609
    mismatches = [(row["text"], tok.encode(row["text"]), row["ids"]) for row in oracle]
    mismatches = [m for m in mismatches if m[1] != m[2]]
    assert mismatches == []


def test_digit_rule_examples(tok):
    assert tok.encode("a  1") == [81, 256, 33]
    assert tok.encode("x   99") == [104, 333, 41, 41]


def test_oracle_round_trip(tok, oracle):
    for row in oracle:
        assert tok.decode(row["ids"]) == row["text"]
        assert tok.decode(tok.encode(row["text"])) == row["text"]


# NOTE: the SmolLM2 vocabulary has no token for a few bytes (some ASCII control characters, and the UTF-8 lead bytes
# of the unassigned planes 4-11); llama.cpp and transformers drop those bytes, so such text cannot round-trip.
ROUND_TRIP_CHARS = st.characters(blacklist_categories=("Cs", "Cn", "Co", "Cc")) | st.sampled_from("\t\n\r")


@settings(max_examples=300, deadline=None)
@given(st.text(ROUND_TRIP_CHARS, max_size=80))
def test_round_trip_any_text(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=20))
def test_encode_never_raises(tok, text):
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)


FRAGMENTS = ["a", " ", "  ", "1", "<|im_end|>", "日", "🤗", "\n", "'s", "é", "\u0301"]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(FRAGMENTS), max_size=30))
def test_round_trip_fragments(tok, parts):
    text = "".join(parts)
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens_and_ids(tok):
    assert tok.vocab_size == 49152
    assert tok.bos_token_id == 1
    assert tok.eos_token_id == 2
    assert tok.eos_token_ids == [2]  # <|im_end|> is both EOS and the template's end of turn
    assert tok.encode("<|im_start|>user") == [1, 4093]
    assert tok.encode("hi", add_special_tokens=True) == tok.encode("hi")  # the GGUF says add_bos_token = False
    assert tok.decode([1, 4093, 2], skip_special_tokens=True) == "user"
    assert tok.decode([1, 4093, 2]) == "<|im_start|>user<|im_end|>"


def test_decode_tolerates_any_int_list(tok):
    hello = tok.encode("Hello world")
    assert tok.decode([]) == ""
    assert tok.decode([49152, 10**12, -1, -49152]) == ""
    assert tok.decode([-1] + hello + [49152, 2**63]) == "Hello world"
    assert tok.decode([True, 10**30]) == tok.decode([1])
    assert tok.decode(np.array(hello + [70000], dtype=np.int64)) == "Hello world"
    assert tok.decode(i for i in hello) == "Hello world"
    assert tok.decode([1.5, None, "x"] + hello) == "Hello world"  # type: ignore[list-item]
    # an incomplete UTF-8 sequence decodes to U+FFFD, as tokenizers' own decoder does
    emoji = tok.encode("🤗")
    assert len(emoji) > 1
    assert tok.decode(emoji[:-1]) == tok._backend.decode(emoji[:-1])
    assert "\ufffd" in tok.decode(emoji[:-1])


def test_encode_rejects_non_text(tok):
    with pytest.raises(ValidationError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


# --- transformers' GGUF tokenizer ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_matches_transformers_where_digit_rule_does_not_apply(tok, hf, oracle):
    checked = 0
    for text in TRICKY + [row["text"] for row in oracle]:
        if not digit_rule_may_matter(text):
            assert tok.encode(text) == hf.encode(text, add_special_tokens=False), text
            checked += 1
    assert checked > 200
    # and where it applies, transformers is the one that differs from llama.cpp (documented upstream behaviour)
    assert hf.encode("a  1", add_special_tokens=False) == [81, 216, 216, 33]


@pytest.mark.slow
def test_decode_matches_transformers(tok, hf):
    rng = random.Random(1234)
    for _ in range(400):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randrange(1, 40))]
        ids += [rng.randrange(17)] * rng.randrange(2)  # special tokens
        rng.shuffle(ids)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    for text in TRICKY:
        ids = hf.encode(text, add_special_tokens=False)
        for skip in (False, True):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


@pytest.mark.slow
@pytest.mark.parametrize("pre", ["qwen2", "llama-bpe", "gpt-2"])
def test_other_pre_tokenizers_match_transformers(tmp_path, gguf_tokenizer_fields, oracle, pre):
    """transformers splits these pre-tokenizer types like llama.cpp does, so it is a reference for them."""
    from transformers import AutoTokenizer

    # NOTE: a cut-down vocabulary (the first 8000 tokens and the merges among them) keeps this test quick.
    tokens = gguf_tokenizer_fields["tokenizer.ggml.tokens"][:8000]
    known = set(tokens)
    merges = [m for m in gguf_tokenizer_fields["tokenizer.ggml.merges"] if m.replace(" ", "", 1) in known]
    fields = {
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.token_type": gguf_tokenizer_fields["tokenizer.ggml.token_type"][:8000],
    }
    path = write_gguf(tmp_path / f"{pre}.gguf", fields, pre)
    ours = Tokenizer.from_gguf(path)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in TRICKY + [row["text"] for row in oracle]:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
    # llama.cpp adds BOS by default for llama-bpe; the GGUF flag overrides the default
    assert ours.encode("hi", add_special_tokens=True)[:1] == ([1] if pre == "llama-bpe" else [ours.encode("hi")[0]])
    flagged = Tokenizer.from_gguf(write_gguf(tmp_path / f"{pre}-bos.gguf", fields, pre, add_bos=True))
    assert flagged.encode("hi", add_special_tokens=True) == [1] + ours.encode("hi")


# --- chat template ------------------------------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "user", "content": "Tell me a joke"},
        {"role": "assistant", "content": "Why did the chicken cross the road?"},
        {"role": "user", "content": "Why?\n\nTell me   😀 日本"},
    ],
    [
        {"role": "system", "content": ""},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c", "name": None},
    ],
]

# Exercises the environment: tojson (not HTML-escaped), loop controls, namespace, raise_exception, bos/eos variables.
CUSTOM_TEMPLATE = (
    "{{ bos_token }}{% set ns = namespace(n=0) %}"
    "{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}"
    "  {{ m['role'] | upper }}: {{ m['content'] | tojson }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT ({{ ns.n }} turns):{% endif %}{{ eos_token }}"
    "{% if strftime_now('%Y') | length != 4 %}{{ raise_exception('bad year') }}{% endif %}"
)


@pytest.mark.slow
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf, add_generation_prompt):
    for conversation in CONVERSATIONS:
        expected = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert tok.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt) == expected
    custom = copy.copy(tok)
    custom.chat_template = CUSTOM_TEMPLATE
    conversation = [{"role": "user", "content": "<b>\"quoted\" & é</b>"}, {"role": "skip", "content": "x"}]
    expected = hf.apply_chat_template(
        conversation, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=CUSTOM_TEMPLATE
    )
    assert custom.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt) == expected


def test_chat_template_default_is_generation_prompt(tok):
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_chat_template_errors_are_validation_errors(tok):
    with pytest.raises(ValidationError) as info:
        tok.apply_chat_template([{"role": "user"}])  # no content: the template concatenates an undefined value
    assert info.value.field == "messages"
    with pytest.raises(ValidationError) as info:
        tok.apply_chat_template([])
    assert info.value.field == "messages"
    with pytest.raises(ValidationError):
        tok.apply_chat_template(["not a dict"])  # type: ignore[list-item]
    raising = copy.copy(tok)
    raising.chat_template = "{{ raise_exception('Only user and assistant roles are supported') }}"
    with pytest.raises(ValidationError, match="Only user and assistant") as info:
        raising.apply_chat_template([{"role": "user", "content": "x"}])
    assert info.value.field == "messages"
    broken = copy.copy(tok)
    broken.chat_template = "{% for m in messages %}"
    with pytest.raises(ValidationError):
        broken.apply_chat_template([{"role": "user", "content": "x"}])
    none = copy.copy(tok)
    none.chat_template = None
    with pytest.raises(ValidationError):
        none.apply_chat_template([{"role": "user", "content": "x"}])


def test_chat_template_sandboxed(tok):
    evil = copy.copy(tok)
    evil.chat_template = "{{ messages.__class__.__mro__ }}"
    with pytest.raises(ValidationError):
        evil.apply_chat_template([{"role": "user", "content": "x"}])


# --- loading ------------------------------------------------------------------------------------------------------


def tiny_fields(**overrides) -> dict:
    fields = {"tokenizer.ggml.tokens": ["a", "b", "ab", "<s>"], "tokenizer.ggml.merges": ["a b"]}
    fields["tokenizer.ggml.token_type"] = [1, 1, 1, 3]
    fields.update(overrides)
    return fields


def test_unsupported_gguf_tokenizers_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="tokenizer.ggml.pre"):
        Tokenizer.from_gguf(write_gguf(tmp_path / "pre.gguf", tiny_fields(), "no-such-pre"))
    with pytest.raises(ModelLoadError, match="tokenizer.ggml.model"):
        Tokenizer.from_gguf(write_gguf(tmp_path / "spm.gguf", tiny_fields(), None, model="llama"))
    with pytest.raises(ModelLoadError):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError):
        Tokenizer.from_gguf(tmp_path / "junk.gguf")


def test_tiny_gguf_default_pre(tmp_path):
    tiny = Tokenizer.from_gguf(write_gguf(tmp_path / "tiny.gguf", tiny_fields(), None))
    assert tiny.encode("abab<s>ba") == [2, 2, 3, 1, 0]
    assert tiny.decode([2, 3, 99, 1], skip_special_tokens=True) == "abb"
    assert tiny.chat_template is None
    with pytest.raises(ValidationError):
        tiny.apply_chat_template([{"role": "user", "content": "x"}])


def test_load_specs(tmp_path, tok):
    embedded = Tokenizer.load(None)
    assert Tokenizer.load("embedded") is embedded  # cached: one parse per file
    with pytest.raises(ModelLoadError, match="vocab size"):
        Tokenizer.load("random:tiny")
    assert Tokenizer.load(str(embedded_model_path())).encode("a  1") == [81, 256, 33]
    with pytest.raises(ModelLoadError):
        Tokenizer.load(str(tmp_path / "nope"))
    with pytest.raises(ModelLoadError):
        Tokenizer.load(str(tmp_path))  # a folder with neither tokenizer.json nor a .gguf


# --- Hugging Face folders -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pretrained_dir_matches_transformers(tmp_path, hf):
    """A folder written by transformers: we must follow its tokenizer.json (no digit rule there) and config."""
    from transformers import AutoTokenizer

    hf.save_pretrained(tmp_path)
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))
    ours = Tokenizer.load(str(tmp_path))
    assert ours.vocab_size == 49152
    assert (ours.bos_token_id, ours.eos_token_id, ours.eos_token_ids) == (1, 2, [2])
    for text in TRICKY + ["a  1", "x   99"]:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_special_tokens=True) == theirs.encode(text, add_special_tokens=True)
        ids = theirs.encode(text, add_special_tokens=False)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)
    for conversation in CONVERSATIONS:
        for gen in (True, False):
            expected = theirs.apply_chat_template(conversation, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(conversation, add_generation_prompt=gen) == expected


SP_CORPUS = [
    "Hello world, this is a small corpus for a tiny tokenizer.",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers 0123456789 and punctuation !?.,;:",
    "  indented line\nnew line\ttab",
] * 20


def build_sentencepiece_dir(folder: Path, style: str) -> Path:
    """A Llama-2-style ("sequence": Replace/ByteFallback/Fuse/Strip) or Metaspace-decoder tokenizer folder."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers

    backend = Backend(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(SP_CORPUS, trainer)
    raw = json.loads(backend.to_str())
    vocab = raw["model"]["vocab"]
    for byte in range(256):  # byte-fallback pieces, as SentencePiece vocabularies carry them
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    raw["model"]["byte_fallback"] = True
    if style == "sequence":
        seq = Backend.from_str(json.dumps(raw))
        seq.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        seq.pre_tokenizer = None
        seq.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
        )
        raw = json.loads(seq.to_str())
    else:
        raw["decoder"] = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    raw["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<s>": {"id": "<s>", "ids": [vocab["<s>"]], "tokens": ["<s>"]}},
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(raw), encoding="utf-8")
    config = {
        "bos_token": "<s>",
        "eos_token": {"content": "</s>"},
        "chat_template": "{% for m in messages %}[{{ m['content'] }}]{% endfor %}</s>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


@pytest.mark.parametrize("style", ["sequence", "metaspace"])
def test_sentencepiece_style_folder_decodes_like_tokenizers(tmp_path, style):
    from tokenizers import Tokenizer as Backend

    folder = build_sentencepiece_dir(tmp_path / style, style)
    ours = Tokenizer.from_pretrained_dir(folder)
    reference = Backend.from_file(str(folder / "tokenizer.json"))
    assert ours.bos_token_id == reference.token_to_id("<s>")
    assert ours.eos_token_ids == [reference.token_to_id("</s>")]
    texts = ["Hello world", " leading space", "  two", "x", "naïve 日本 🤗 ok", "tab\tnew\nline", "The quick fox."]
    for text in texts:
        ids = reference.encode(text, add_special_tokens=True).ids
        assert ours.encode(text, add_special_tokens=True) == ids
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


def test_unsupported_decoder_is_refused(tmp_path):
    folder = build_sentencepiece_dir(tmp_path / "wp", "metaspace")
    raw = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    raw["decoder"] = {"type": "WordPiece", "prefix": "##", "cleanup": True}
    (folder / "tokenizer.json").write_text(json.dumps(raw), encoding="utf-8")
    with pytest.raises(ModelLoadError, match="decoder"):
        Tokenizer.from_pretrained_dir(folder)


def test_synthetic_tokenizer_of_random_weight_models():
    tok = Tokenizer.load("random:llama-3-8b", vocab_size=128256, eos_token_ids=[128001, 128009])
    assert tok.vocab_size == 128256 and tok.eos_token_ids == [128001, 128009] and tok.chat_template is None
    text = "héllo  1 wörld\n\t✓ <|tok_300|>"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))  # one id per UTF-8 byte, special-looking text included
    assert tok.decode(ids) == text
    assert tok.decode([104, 300, 128255, 128001]) == "h<|tok_300|><|tok_128255|><|tok_128001|>"
    assert tok.decode([104, 128001], skip_special_tokens=True) == "h"
    with pytest.raises(ModelLoadError):
        Tokenizer.synthetic(100)
