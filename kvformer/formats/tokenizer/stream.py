"""Streaming decode: token ids to text one id at a time, emitting only whole characters."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvformer.formats.tokenizer.tokenizer import Tokenizer

__all__ = ["StreamDecoder"]


class StreamDecoder:
    """Turns token ids into text one id at a time, emitting only whole characters.

    A character can span several byte tokens (an emoji is often 2-4 of them). Each push decodes a
    small window of recent ids; if the window's text ends in U+FFFD the character is unfinished
    and is held back until a later token completes it. Decoding a window that starts at the last
    emitted boundary, rather than the whole history, keeps each push cheap and lets decoders that
    treat the first token specially (SentencePiece's leading space) agree with a full decode. The
    concatenation of everything pushed out plus `flush()` equals `decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window: the previous emission boundary
        self._read = 0  # end of what has been emitted

    def _pending(self) -> str:
        decode = self._tokenizer.decode
        done = decode(self._ids[self._prefix:self._read], skip_special_tokens=self._skip)
        text = decode(self._ids[self._prefix:], skip_special_tokens=self._skip)
        return text[len(done):]

    def _advance(self) -> None:
        del self._ids[:self._read]  # ids before the new window are never decoded again
        self._prefix, self._read = 0, len(self._ids)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (often '', never half a character)."""
        self._ids.append(int(token_id))
        new = self._pending()
        if new and not new.endswith("\ufffd"):
            self._advance()
            return new
        return ""

    def flush(self) -> str:
        """End of stream: return what is held back (an unfinished character becomes U+FFFD)."""
        new = self._pending()
        self._advance()
        return new
