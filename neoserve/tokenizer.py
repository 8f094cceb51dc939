"""Text <-> token ids for the gateway, built from a GGUF file or a Hugging Face tokenizer folder.

Encoding runs on the `tokenizers` package. Decoding does not: every token is mapped once, at load time, to the raw
bytes it stands for, so decoding is a table lookup, a join and one UTF-8 decode. The incremental detokenizer
(neoserve/detokenizer.py) reuses the same byte table, which is what keeps streamed text identical to `decode`.

GGUF files name their pre-tokenizer in `tokenizer.ggml.pre`. We reproduce llama.cpp's splitting for the values we
support (llama.cpp is the reference for what a GGUF model was trained and evaluated with); transformers' GGUF loader
drops SmolLM's digit rule and so tokenizes "a  1" differently (see tests/data/README.md).
"""

from __future__ import annotations

import functools
import json
import operator
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from neoserve.errors import ModelLoadError, ValidationError

# --- pre-tokenizer regexes, as llama.cpp's llama-vocab.cpp applies them (each splits the previous pieces) ----------

# NOTE: llama.cpp writes the GPT-2 pattern without the final `|\s+` alternative, but its hand-written GPT-2 splitter
# behaves as if it were there; unmatched text becomes a piece of its own either way, so the two are equivalent.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# NOTE: llama.cpp's spelling of the case-insensitive contractions (`(?i:'s|...)` upstream).
_CONTRACTIONS_CI = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (
    _CONTRACTIONS_CI
    + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = _CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

# tokenizer.ggml.pre values -> (regexes applied in order, ignore_merges, add_bos default), as llama.cpp has them
_PRE_TOKENIZER_GROUPS: tuple[tuple[tuple[str, ...], tuple[tuple[str, ...], bool, bool]], ...] = (
    # digits one by one, then GPT-2 splitting (LLAMA_VOCAB_PRE_TYPE_SMOLLM and the types sharing its regexes)
    (
        ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        ((r"\p{N}", _GPT2), False, False),
    ),
    (("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4"), ((_GPT2,), False, False)),
    (("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), ((_LLAMA3,), True, True)),
    (("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), ((_QWEN2,), False, False)),
    (("default",), ((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"), False, False)),
)
_PRE_TOKENIZERS = {name: spec for names, spec in _PRE_TOKENIZER_GROUPS for name in names}

# GGUF tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Tokens chat templates end a turn with. One that the template writes (and the vocabulary holds) ends generation.
_END_OF_TURN_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|end_of_turn|>")

_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_BYTE_LEVEL_TRANSLATE = {ord(c): b for b, c in _bytes_to_unicode().items()}
_BYTE_LEVEL_CHARS = frozenset(_bytes_to_unicode().values())
_BYTE_FALLBACK_RE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_bytes(token: str) -> bytes:
    # NOTE: same rule as tokenizers' ByteLevel decoder: a token made only of table characters is mapped back to its
    # bytes; any other token (an added token with a space, say) stands for its own UTF-8.
    if _BYTE_LEVEL_CHARS.issuperset(token):
        return bytes(token.translate(_BYTE_LEVEL_TRANSLATE), "latin-1")
    return token.encode("utf-8")


class Tokenizer:
    """Encodes prompts, decodes ids and renders chat templates. Immutable once built, so one instance is shared."""

    def __init__(
        self,
        backend: Any,  # tokenizers.Tokenizer
        token_bytes: list[bytes],
        special_ids: set[int],
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        eos_token_ids: list[int],
        chat_template: str | None,
        special_tokens: dict[str, str],
        strip_leading_spaces: int = 0,
        name: str = "",
    ):
        self._backend = backend
        self._token_bytes = token_bytes
        # NOTE: a second table with special tokens blanked makes skip_special_tokens free at decode time.
        self._token_bytes_no_special = [b"" if i in special_ids else b for i, b in enumerate(token_bytes)]
        self.special_ids = frozenset(special_ids)
        self.vocab_size = len(token_bytes)
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.eos_token_ids = eos_token_ids
        self.chat_template = chat_template
        self.special_tokens = special_tokens  # bos_token/eos_token/... -> text, the chat template's variables
        # Leading spaces the decoder strips from the start of a text (SentencePiece-style tokenizers), else 0.
        self.strip_leading_spaces = strip_leading_spaces
        self.name = name

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, eos_token_ids={self.eos_token_ids})"

    # --- loading ---------------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, spec: str | None, *, vocab_size: int | None = None, eos_token_ids: Sequence[int] = ()) -> "Tokenizer":
        """None/"embedded" -> the embedded SmolLM2 tokenizer; *.gguf -> GGUF; folder -> HF folder;
        "random:<shape>" -> a synthetic byte-level tokenizer of vocab_size ids (see `synthetic`)."""
        from neoserve.model_files import embedded_model_path

        if spec is None or spec == "embedded":
            return cls.from_gguf(embedded_model_path())
        if str(spec).startswith("random:"):
            if vocab_size is None:
                raise ModelLoadError(f"{spec}: a random-weight model's tokenizer needs the model's vocab size")
            return cls.synthetic(vocab_size, eos_token_ids, name=str(spec))
        path = Path(spec)
        if path.is_file() and path.suffix == ".gguf":
            return cls.from_gguf(path)
        if path.is_dir():
            if (path / "tokenizer.json").is_file():
                return cls.from_pretrained_dir(path)
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return cls.from_gguf(ggufs[0])
            raise ModelLoadError(f"{path}: no tokenizer.json and not exactly one .gguf file to take a tokenizer from")
        raise ModelLoadError(f"{spec}: not a .gguf file, a tokenizer folder, 'embedded' or 'random:<shape>'")

    @classmethod
    def synthetic(cls, vocab_size: int, eos_token_ids: Sequence[int] = (), *, name: str = "synthetic") -> "Tokenizer":
        """The tokenizer of a random-weight model, which ships none: ids 0-255 are the 256 bytes (any text encodes
        one id per UTF-8 byte and decodes back exactly), and every other id decodes to the text `<|tok_N|>`.

        NOTE: built from the model's own vocab size, so every id the model can sample decodes to something and a
        benchmark of a large-vocabulary shape (llama-3-8b: 128,256 ids) needs no checkpoint or borrowed vocabulary."""
        from tokenizers import Tokenizer as Backend, models, pre_tokenizers

        if vocab_size < 256:
            raise ModelLoadError(f"{name}: a synthetic byte-level tokenizer needs vocab_size >= 256, got {vocab_size}")
        byte_chars = _bytes_to_unicode()
        vocab = {byte_chars[b]: b for b in range(256)}
        token_bytes = [bytes([b]) for b in range(256)]
        for i in range(256, vocab_size):
            vocab[f"<|tok_{i}|>"] = i
            token_bytes.append(f"<|tok_{i}|>".encode())
        backend = Backend(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        eos = [i for i in eos_token_ids if 0 <= i < vocab_size]
        return cls(backend, token_bytes, set(eos), bos_token_id=None, eos_token_id=eos[0] if eos else None,
                   eos_token_ids=eos, chat_template=None, special_tokens={}, name=name)

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        """Builds the tokenizer stored in a GGUF file's metadata (only byte-level BPE, `tokenizer.ggml.model` gpt2)."""
        path = Path(path).resolve()
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such GGUF file")
        stat = path.stat()
        return _from_gguf_cached(str(path), stat.st_mtime_ns, stat.st_size)

    @classmethod
    def from_pretrained_dir(cls, path) -> "Tokenizer":
        """Builds the tokenizer of a Hugging Face folder: tokenizer.json plus tokenizer_config.json and friends."""
        path = Path(path).resolve()
        if not (path / "tokenizer.json").is_file():
            raise ModelLoadError(f"{path}: no tokenizer.json")
        stat = (path / "tokenizer.json").stat()
        return _from_dir_cached(str(path), stat.st_mtime_ns, stat.st_size)

    # --- encode / decode -------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special-token markers in the text (e.g. "<|im_start|>") become those tokens."""
        if not isinstance(text, str):
            raise ValidationError("prompt", f"must be a string, got {type(text).__name__}")
        # NOTE: encode_batch, not encode: only the batch call releases the GIL, and the gateway tokenizes on a worker
        # thread so that a megabyte prompt does not stall its event loop (tests/test_reliability_bad_input.py).
        return self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def byte_table(self, skip_special_tokens: bool) -> list[bytes]:
        """id -> the bytes that token stands for (b"" for special tokens when skipped). Do not modify."""
        return self._token_bytes_no_special if skip_special_tokens else self._token_bytes

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`. Ids outside the vocabulary render nothing; invalid UTF-8 becomes U+FFFD. Never raises."""
        table = self.byte_table(skip_special_tokens)
        text = ids_to_bytes(table, ids).decode("utf-8", "replace")
        if self.strip_leading_spaces:
            text = _strip_spaces(text, self.strip_leading_spaces)
        return text

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # --- chat ------------------------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **template_kwargs) -> str:
        """Renders a conversation exactly as transformers' `apply_chat_template(..., tokenize=False)` does.

        `template_kwargs` become extra template variables (as in transformers). Any template error, including the
        template's own `raise_exception(...)`, is a ValidationError on "messages".
        """
        if self.chat_template is None:
            raise ValidationError("messages", "this model has no chat template; send a plain prompt instead")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise ValidationError("messages", "must be a non-empty list of messages")
        chat = []
        for message in messages:
            if not isinstance(message, dict):
                raise ValidationError("messages", f"each message must be an object, got {type(message).__name__}")
            # NOTE: transformers drops None-valued keys (OpenAI clients send content=None) and aliases reasoning.
            message = {k: v for k, v in message.items() if v is not None}
            reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
            chat.append(message)
        import jinja2

        try:
            template = _compile_chat_template(self.chat_template)
            return template.render(
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=bool(add_generation_prompt),
                **{**self.special_tokens, **template_kwargs},
            )
        except ValidationError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as exc:
            raise ValidationError("messages", f"the chat template rejected them: {exc}") from exc


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def ids_to_bytes(table: list[bytes], ids: Sequence[int]) -> bytes:
    """Joins the bytes of `ids`, skipping anything that is not a valid id (out of range, negative, not an int)."""
    n = len(table)
    if not isinstance(ids, (list, tuple)):
        try:
            ids = list(ids)  # numpy arrays, ranges, generators
        except TypeError:
            return b""
    try:
        if len(ids) == 0 or (min(ids) >= 0 and max(ids) < n):
            return b"".join([table[i] for i in ids])
    except TypeError:
        pass
    # NOTE: slow path for malformed input only; negative ids would otherwise index from the end.
    valid = []
    for i in ids:
        try:
            i = operator.index(i)
        except TypeError:
            continue
        if 0 <= i < n:
            valid.append(table[i])
    return b"".join(valid)


def _strip_spaces(text: str, count: int) -> str:
    i = 0
    while i < count and i < len(text) and text[i] == " ":
        i += 1
    return text[i:]


# --- chat template ------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=16)
def _compile_chat_template(source: str):
    """Compiles a chat template in the same sandboxed environment transformers uses (same filters and globals)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # NOTE: `{% generation %}` marks assistant text for training masks in transformers; rendering ignores it.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # NOTE: Jinja's own tojson HTML-escapes; transformers overrides it with plain json.dumps.
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ValidationError("messages", f"the model's chat template does not compile: {exc}") from exc


def _eos_ids_from_template(chat_template: str | None, lookup: dict[str, int]) -> list[int]:
    if not chat_template:
        return []
    return [lookup[m] for m in _END_OF_TURN_MARKERS if m in chat_template and m in lookup]


def _dedup(ids) -> list[int]:
    out: list[int] = []
    for i in ids:
        if i is not None and i not in out:
            out.append(int(i))
    return out


# --- GGUF ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4)
def _from_gguf_cached(path: str, mtime_ns: int, size: int) -> Tokenizer:
    # NOTE: cached by (path, mtime, size): reading 49k vocabulary strings with the gguf package takes seconds.
    import gguf
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
    from tokenizers import Tokenizer as Backend

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})") from exc

    def field(key: str, default=None):
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    model = field("tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelLoadError(
            f"{path}: tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) tokenizers are supported"
        )
    pre = field("tokenizer.ggml.pre", "default") or "default"
    if pre not in _PRE_TOKENIZERS:
        raise ModelLoadError(
            f"{path}: tokenizer.ggml.pre {pre!r} is not supported (supported: {', '.join(sorted(_PRE_TOKENIZERS))})"
        )
    regexes, ignore_merges, add_bos_default = _PRE_TOKENIZERS[pre]
    tokens: list[str] = field("tokenizer.ggml.tokens")
    merges: list[str] = field("tokenizer.ggml.merges")
    if not tokens or merges is None:
        raise ModelLoadError(f"{path}: tokenizer.ggml.tokens or tokenizer.ggml.merges is missing")
    token_types: list[int] = field("tokenizer.ggml.token_type") or [1] * len(tokens)

    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # NOTE: some vocabularies repeat a string; the first id wins, as in llama.cpp
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep:
            raise ModelLoadError(f"{path}: tokenizer.ggml.merges has a malformed entry {m!r}")
        pairs.append((left, right))
    backend = Backend(models.BPE(vocab=vocab, merges=pairs, ignore_merges=ignore_merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()

    special_ids: set[int] = set()
    added = []
    for i, (t, kind) in enumerate(zip(tokens, token_types)):
        if kind == _TOKEN_TYPE_CONTROL:
            special_ids.add(i)
            added.append(AddedToken(t, special=True, normalized=False))
        elif kind == _TOKEN_TYPE_USER_DEFINED:
            added.append(AddedToken(t, special=False, normalized=False))
    # NOTE: these strings are already vocabulary entries, so the backend keeps their ids; it only learns to cut them
    # out of the text before BPE (llama.cpp's special=True parsing).
    backend.add_tokens(added)

    def token_id(key: str) -> int | None:
        value = field(key)
        return int(value) if value is not None and 0 <= int(value) < len(tokens) else None

    bos = token_id("tokenizer.ggml.bos_token_id")
    eos = token_id("tokenizer.ggml.eos_token_id")
    add_bos = bool(field("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(field("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        single = " ".join(([tokens[bos]] if add_bos else []) + ["$A"] + ([tokens[eos]] if add_eos else []))
        specials = ([(tokens[bos], bos)] if add_bos else []) + ([(tokens[eos], eos)] if add_eos else [])
        backend.post_processor = processors.TemplateProcessing(single=single, special_tokens=specials)

    chat_template = field("tokenizer.chat_template")
    special_tokens = {}
    # NOTE: the four names transformers' GGUF loader passes to chat templates (a template may test `is defined`).
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        tid = token_id(f"tokenizer.ggml.{key}")
        if tid is not None:
            special_tokens[name] = tokens[tid]
    lookup = {tokens[i]: i for i in special_ids}
    eos_ids = _dedup(
        [eos, token_id("tokenizer.ggml.eot_token_id"), token_id("tokenizer.ggml.eom_token_id")]
        + _eos_ids_from_template(chat_template, lookup)
    )
    return Tokenizer(
        backend,
        [_byte_level_bytes(t) for t in tokens],
        special_ids,
        bos_token_id=bos,
        eos_token_id=eos,
        eos_token_ids=eos_ids,
        chat_template=chat_template,
        special_tokens=special_tokens,
        name=path,
    )


# --- Hugging Face folder ------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: unreadable JSON ({exc})") from exc


def _token_text(value) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _decoder_mode(decoder: dict | None, where: Path) -> tuple[str, str, bool, int]:
    """Classifies a tokenizer.json decoder: ("byte_level" | "metaspace", metaspace char, byte fallback, strip)."""
    if decoder is None:
        raise ModelLoadError(f"{where}: the tokenizer has no decoder")
    kind = decoder.get("type")
    if kind == "ByteLevel":
        return "byte_level", "", False, 0
    if kind == "Metaspace":
        prepend = decoder.get("prepend_scheme", "always" if decoder.get("add_prefix_space", True) else "never")
        return "metaspace", decoder.get("replacement", "▁"), False, 0 if prepend == "never" else 1
    if kind == "Sequence":
        parts = decoder.get("decoders", [])
        if len(parts) == 1 and parts[0].get("type") == "ByteLevel":
            return "byte_level", "", False, 0
        # SentencePiece-style: Replace("▁", " "), ByteFallback, Fuse, Strip(" ", n, 0) -- in this order, each optional
        replacement, fallback, fused, strip = "", False, False, 0
        order = ["Replace", "ByteFallback", "Fuse", "Strip"]
        last = -1
        for part in parts:
            t = part.get("type")
            if t not in order or order.index(t) <= last:
                break
            last = order.index(t)
            if t == "Replace":
                pattern = part.get("pattern", {}).get("String")
                if part.get("content") != " " or not pattern:
                    break
                replacement = pattern
            elif t == "ByteFallback":
                fallback = True
            elif t == "Fuse":
                fused = True
            elif t == "Strip":
                if part.get("content") != " " or part.get("stop", 0) != 0 or not fused:
                    break
                strip = int(part.get("start", 0))
        else:
            if replacement:
                return "metaspace", replacement, fallback, strip
    raise ModelLoadError(f"{where}: tokenizer.json decoder {json.dumps(decoder)[:200]} is not supported")


@functools.lru_cache(maxsize=4)
def _from_dir_cached(path: str, mtime_ns: int, size: int) -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    folder = Path(path)
    tokenizer_json = folder / "tokenizer.json"
    try:
        raw = json.loads(tokenizer_json.read_text(encoding="utf-8"))
        backend = Backend.from_str(json.dumps(raw))
    except Exception as exc:
        raise ModelLoadError(f"{tokenizer_json}: cannot be loaded ({exc})") from exc
    config = _read_json(folder / "tokenizer_config.json")
    special_map = _read_json(folder / "special_tokens_map.json")
    generation = _read_json(folder / "generation_config.json")

    mode, replacement, byte_fallback, strip = _decoder_mode(raw.get("decoder"), tokenizer_json)
    vocab = backend.get_vocab(with_added_tokens=True)  # text -> id
    size_ = max(vocab.values()) + 1 if vocab else 0
    texts = [""] * size_
    for text, i in vocab.items():
        texts[i] = text
    if mode == "byte_level":
        token_bytes = [_byte_level_bytes(t) for t in texts]
    else:

        def piece_bytes(t: str) -> bytes:
            m = _BYTE_FALLBACK_RE.fullmatch(t) if byte_fallback else None
            return bytes([int(m.group(1), 16)]) if m else t.replace(replacement, " ").encode("utf-8")

        token_bytes = [piece_bytes(t) for t in texts]

    special_ids = {t["id"] for t in raw.get("added_tokens", []) if t.get("special")}
    for i_str, t in (config.get("added_tokens_decoder") or {}).items():
        if isinstance(t, dict) and t.get("special") and i_str.isdigit():
            special_ids.add(int(i_str))

    special_tokens: dict[str, str] = {}
    for name in _SPECIAL_TOKEN_NAMES:
        text = _token_text(config.get(name)) or _token_text(special_map.get(name))
        if text is not None:
            special_tokens[name] = text

    chat_template = config.get("chat_template")
    if isinstance(chat_template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
        chat_template = named.get("default")
    if chat_template is None and (folder / "chat_template.jinja").is_file():
        chat_template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if chat_template is None:
        chat_template = _read_json(folder / "chat_template.json").get("chat_template")

    bos = vocab.get(special_tokens.get("bos_token", ""))
    eos = vocab.get(special_tokens.get("eos_token", ""))
    generation_eos = generation.get("eos_token_id")
    if not isinstance(generation_eos, list):
        generation_eos = [generation_eos]
    lookup = {texts[i]: i for i in special_ids if 0 <= i < size_}
    eos_ids = _dedup([eos] + [e for e in generation_eos if isinstance(e, int)])
    eos_ids = _dedup(eos_ids + _eos_ids_from_template(chat_template, lookup))

    tokenizer = Tokenizer(
        backend,
        token_bytes,
        special_ids,
        bos_token_id=bos,
        eos_token_id=eos,
        eos_token_ids=eos_ids,
        chat_template=chat_template,
        special_tokens=special_tokens,
        strip_leading_spaces=strip,
        name=path,
    )
    _check_decoder(tokenizer, backend, tokenizer_json)
    return tokenizer


_DECODER_CHECK_TEXT = "Hello world!  Ünïcödé 日本語 🤗\n\tcode = f(x) + 12345;"


def _check_decoder(tokenizer: Tokenizer, backend, where: Path) -> None:
    """Refuses a tokenizer whose decoder our byte tables do not reproduce (cheap insurance against odd configs)."""
    ids = backend.encode(_DECODER_CHECK_TEXT, add_special_tokens=True).ids
    for skip in (False, True):
        ours, theirs = tokenizer.decode(ids, skip_special_tokens=skip), backend.decode(ids, skip_special_tokens=skip)
        if ours != theirs:
            raise ModelLoadError(
                f"{where}: decoding differs from the tokenizer's own decoder ({ours!r} vs {theirs!r}); unsupported"
            )
