"""Streams generated token ids out as text, one request at a time, honouring stop strings.

Each push costs O(new tokens + longest stop string), never O(all tokens so far): new tokens are turned into bytes with
the tokenizer's byte table and fed to an incremental UTF-8 decoder, which keeps back a trailing incomplete character
until its last byte arrives. So the streamed chunks always concatenate to exactly `tokenizer.decode(all_ids)`.

Stop strings are searched in the decoded text, across token boundaries. Text that might be the beginning of a stop
string is held back until the next tokens decide it. The stop string that is completed first wins (a rule that does not
depend on how tokens were grouped into pushes); among stop strings completed by the same character, the longest wins.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Sequence

from neoserve.errors import ValidationError
from neoserve.tokenizer import Tokenizer, ids_to_bytes


@dataclass(slots=True)
class DetokenizerDelta:
    text: str  # new text to send to the client (may be empty)
    stopped: bool  # a stop string was found: the request is finished (also True on every push after that)
    stop_string: str | None  # the stop string that matched, if stopped


class IncrementalDetokenizer:
    """One per request. Not thread-safe (one stream is handled by one task)."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
    ):
        for s in stop:
            if not isinstance(s, str) or not s:
                raise ValidationError("stop", "stop strings must be non-empty strings")
        self._table = tokenizer.byte_table(skip_special_tokens)
        # NOTE: errors="replace" only ever fires mid-stream for bytes that can never become valid UTF-8; those are
        # replaced exactly as bytes.decode(errors="replace") replaces them, so streaming still equals decode().
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._strip = tokenizer.strip_leading_spaces
        self._stops = list(dict.fromkeys(stop))
        self._include_stop = include_stop_str_in_output
        self._pending = ""  # decoded text held back: it could be the start of a stop string
        self._chunks: list[str] = []  # emitted text, joined lazily by `text`
        self._text_cache: str | None = ""
        self.stopped = False
        self.stop_string: str | None = None
        self.finished = False  # flush() was called

    @property
    def text(self) -> str:
        """Everything emitted so far (by push and flush)."""
        if self._text_cache is None:
            self._text_cache = "".join(self._chunks)
            self._chunks = [self._text_cache]
        return self._text_cache

    def push(self, new_token_ids: Sequence[int]) -> DetokenizerDelta:
        if self.stopped or self.finished:
            return DetokenizerDelta("", self.stopped, self.stop_string)
        new_text = self._utf8.decode(ids_to_bytes(self._table, new_token_ids))
        return self._advance(new_text, final=False)

    def flush(self) -> str:
        """At the end of the request: returns the held-back text (an incomplete last character becomes U+FFFD)."""
        if self.stopped or self.finished:
            return ""
        delta = self._advance(self._utf8.decode(b"", final=True), final=True)
        self.finished = True
        return delta.text

    def _advance(self, new_text: str, final: bool) -> DetokenizerDelta:
        if self._strip and new_text:
            # NOTE: SentencePiece-style decoders drop the leading space(s) of the whole text: do it on its first chars.
            stripped = new_text.lstrip(" ")
            cut = min(self._strip, len(new_text) - len(stripped))
            self._strip = 0 if cut < len(new_text) else self._strip - cut
            new_text = new_text[cut:]
        if not self._stops:
            return self._emit(new_text)
        text = self._pending + new_text if self._pending else new_text
        if not text:
            return DetokenizerDelta("", False, None)
        match = self._first_stop(text)
        if match is not None:
            start, stop = match
            self.stopped, self.stop_string = True, stop
            self._pending = ""
            return self._emit(text[: start + len(stop)] if self._include_stop else text[:start], stop)
        hold = 0 if final else self._partial_stop_len(text)
        self._pending = text[len(text) - hold :] if hold else ""
        return self._emit(text[: len(text) - hold] if hold else text)

    def _emit(self, text: str, stop: str | None = None) -> DetokenizerDelta:
        if text:
            self._chunks.append(text)
            self._text_cache = None
        return DetokenizerDelta(text, self.stopped, stop)

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        """(start, stop string) of the stop string completed first in `text`, or None."""
        best: tuple[int, int, str] | None = None  # (end, -length, stop)
        for stop in self._stops:
            i = text.find(stop)
            if i >= 0:
                key = (i + len(stop), -len(stop), stop)
                if best is None or key < best:
                    best = key
        if best is None:
            return None
        end, neg_len, stop = best
        return end + neg_len, stop

    def _partial_stop_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        hold = 0
        n = len(text)
        for stop in self._stops:
            first = stop[0]
            # NOTE: only positions holding the stop's first character can start a partial match; scan those.
            p = text.find(first, max(0, n - len(stop) + 1))
            while p != -1 and n - p > hold:
                if stop.startswith(text[p:]):
                    hold = n - p
                    break
                p = text.find(first, p + 1)
        return hold
