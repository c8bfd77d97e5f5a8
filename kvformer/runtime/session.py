"""A multi-turn conversation that keeps its KV cache across turns.

Each turn renders the whole conversation with the model's chat template, finds how much
of it the cache already holds (the common prefix of token ids) and feeds only the rest,
so earlier turns are never recomputed.

The cache always holds exactly ``cached_ids``: a prefix of the tokens of the conversation
so far. An answer that is stopped part way (``stop``, Ctrl-C in ``kvformer chat``) stays
in the conversation as far as it went, marked ``"cut": true``; the next turn re-renders
the conversation and keeps whatever prefix still matches, so the cache is never out of
step with the history. A conversation is saved and loaded as JSON (``save``/``load``).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kvformer.errors import KvformerError
from kvformer.fileio import write_atomic
from kvformer.runtime.generation import continue_stream
from kvformer.runtime.speculative import SpecStats, speculative_stream

CHAT_FORMAT = "kvformer-chat"
ROLES = ("system", "user", "assistant")


@dataclass
class TurnStats:
    """What one answer cost: tokens fed, tokens reused from the cache, tokens made, time."""
    fed: int = 0  # prompt tokens run through the model
    reused: int = 0  # prompt tokens served from the cache
    new_tokens: int = 0
    prefill_s: float = 0.0  # until the first new token
    decode_s: float = 0.0  # from the first new token to the last
    cut: bool = False

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed: the tokens after the first over the time they took."""
        if self.new_tokens < 2 or self.decode_s <= 0:
            return None
        return (self.new_tokens - 1) / self.decode_s


class ChatSession:
    def __init__(self, model, tokenizer, system: str | None = None, max_len: int | None = None,
                 temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, *,
                 spec: str | None = None, spec_k: int = 5, draft=None):
        self.model, self.tokenizer = model, tokenizer
        # speculative decoding (kvformer.runtime.speculative): its options and acceptance
        self.spec = dict(method=spec, k=spec_k, draft=draft) if spec else None
        self.spec_stats = SpecStats()
        self.cache = model.new_cache(1, min(max_len or model.cfg.max_seq_len,
                                            model.cfg.max_seq_len))
        self.cached_ids: list[int] = []  # exactly the tokens whose K/V are in the cache
        self.messages: list[dict] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p)
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.reused_tokens = 0  # of the last turn: prompt tokens served from the cache
        self.last: TurnStats | None = None
        self.total_new_tokens = 0

    # -- the conversation ------------------------------------------------------------------
    @property
    def system(self) -> str | None:
        if self.messages and self.messages[0]["role"] == "system":
            return self.messages[0]["content"]
        return None

    def set_system(self, text: str | None) -> None:
        """Replace (or with None, remove) the system message; the conversation stays. The
        cache keeps what still matches, which after a new system message is nothing."""
        if self.system is not None:
            self.messages.pop(0)
        if text:
            self.messages.insert(0, {"role": "system", "content": text})

    def reset(self) -> None:
        """A new conversation (the system message stays) on an empty cache."""
        system = self.system
        self.messages = [{"role": "system", "content": system}] if system else []
        self.cache.reset()
        self.cached_ids = []
        self.last = None

    def _ids(self, messages: list[dict]) -> list[int]:
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        # what was typed is text: only the template's own markup becomes control tokens
        return self.tokenizer.encode_chat(plain, add_generation_prompt=True)

    # -- one turn --------------------------------------------------------------------------
    def send(self, text: str, max_new_tokens: int = 256,
             stop: Callable[[], bool] | None = None) -> Iterator[str]:
        """Add a user message and stream the assistant's reply as text pieces.

        ``stop`` is asked after every token; when it says True the answer ends there and is
        kept, marked cut. An error before the first token (no room left, a template that
        fails) undoes the turn, so the conversation is as it was."""
        self.messages.append({"role": "user", "content": text})
        try:
            ids = self._ids(self.messages)
        except BaseException:
            self.messages.pop()
            raise
        common = 0
        for a, b in zip(self.cached_ids, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one token must be fed for logits
        self.cache.truncate(common)
        self.cached_ids = ids[:common]
        self.reused_tokens = common
        stats = TurnStats(fed=len(ids) - common, reused=common, cut=True)
        produced: list[int] = []
        decoder = self.tokenizer.stream_decoder()
        limit = getattr(self.tokenizer, "vocab_size", None)  # not padded-embedding ids
        if self.spec:
            stream = speculative_stream(self.model, ids, max_new_tokens,
                                        stop_ids=self.tokenizer.stop_ids, cache=self.cache,
                                        generator=self.generator, stats=self.spec_stats,
                                        vocab_limit=limit,
                                        **self.spec, **self.sampling)
        else:
            stream = continue_stream(self.model, self.cache, ids[common:], max_new_tokens,
                                     generator=self.generator,
                                     stop_ids=self.tokenizer.stop_ids,
                                     vocab_limit=limit, **self.sampling)
        start = first = time.perf_counter()
        undo = False
        try:
            for tok in stream:
                if not produced:
                    first = time.perf_counter()
                produced.append(tok)
                piece = decoder.push(tok)
                if piece:
                    yield piece
                if stop is not None and stop():
                    break
            else:
                stats.cut = False
            tail = decoder.flush()
            if tail:
                yield tail
        except Exception:
            undo = not produced
            raise
        finally:
            stream.close()
            # The cache holds a prefix of ids + produced, however the turn ended.
            self.cached_ids = (ids + produced)[:self.cache.length]
            end = time.perf_counter()
            stats.new_tokens = len(produced)
            stats.prefill_s = (first if produced else end) - start
            stats.decode_s = end - first if produced else 0.0
            self.last = stats
            self.total_new_tokens += len(produced)
            if undo:
                self.messages.pop()
            else:
                reply = {"role": "assistant",
                         "content": self.tokenizer.decode(produced, skip_special_tokens=True)}
                if stats.cut:
                    reply["cut"] = True
                self.messages.append(reply)

    # -- saving and loading ----------------------------------------------------------------
    def save(self, path: str | os.PathLike, model: str | None = None) -> Path:
        """Write the conversation as JSON, atomically: a crash never leaves half a file and
        an existing file is replaced only by a complete new one."""
        path = Path(path).expanduser()
        if not path.parent.is_dir():
            raise KvformerError(f"cannot save to {path}: {path.parent} is not a directory")
        data = {"format": CHAT_FORMAT, "version": 1, "model": model,
                "messages": self.messages}
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
        return write_atomic(path, lambda fh: fh.write(text.encode("utf-8")))

    def load(self, path: str | os.PathLike) -> int:
        """Replace the conversation with one saved by ``save`` (the number of messages).
        A file that is not such a conversation, or one too long for the cache, is refused
        and the current conversation stays as it was."""
        path = Path(path).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as exc:
            raise KvformerError(f"{path}: not a text file ({exc})") from None
        except json.JSONDecodeError as exc:
            raise KvformerError(f"{path}: not JSON ({exc})") from None
        messages = _check_messages(data, path)
        n = len(self._ids(messages))
        if n >= self.cache.max_len:
            raise KvformerError(f"{path}: the conversation is {n} tokens, more than the "
                                f"context of {self.cache.max_len}; raise --ctx-size")
        self.messages = messages
        return len(messages)


def _check_messages(data, path) -> list[dict]:
    if not isinstance(data, dict) or data.get("format") != CHAT_FORMAT:
        raise KvformerError(f"{path}: not a kvformer conversation (no \"format\": "
                            f"\"{CHAT_FORMAT}\"); /save writes one")
    raw = data.get("messages")
    if not isinstance(raw, list):
        raise KvformerError(f"{path}: \"messages\" must be a list")
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(
                m.get("content"), str):
            raise KvformerError(f"{path}: message {i} needs a role ({', '.join(ROLES)}) and "
                                "a text content")
        if m["role"] == "system" and i != 0:
            raise KvformerError(f"{path}: message {i} is a system message; only the first "
                                "may be")
        message = {"role": m["role"], "content": m["content"]}
        if m.get("cut"):
            message["cut"] = True
        messages.append(message)
    return messages
