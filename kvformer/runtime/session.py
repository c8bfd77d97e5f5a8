"""A multi-turn conversation that keeps its KV cache across turns.

Each turn renders the whole conversation with the model's chat template, finds how much
of it the cache already holds (the common prefix of token ids) and feeds only the rest,
so earlier turns are never recomputed.

The cache always holds exactly ``cached_ids``: a prefix of the tokens of the conversation
so far. An answer that is stopped part way (``stop``, Ctrl-C in ``kvformer chat``) stays
in the conversation as far as it went, marked ``"cut": true``; the next turn re-renders
the conversation and keeps whatever prefix still matches, so the cache is never out of
step with the history. A conversation is saved and loaded as JSON (``save``/``load``).

When the conversation no longer fits the context, the oldest turns are dropped (the system
message stays) and the cache keeps what still matches, which is then only the system part:
the rest is read again. ``last.dropped`` says how many messages went.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from kvformer.errors import ContextOverflowError, KvformerError
from kvformer.fileio import write_atomic
from kvformer.runtime.generation import continue_stream
from kvformer.runtime.speculative import SpecStats, speculative_stream

CHAT_FORMAT = "kvformer-chat"
ROLES = ("system", "user", "assistant")


@dataclass
class TurnStats:
    """What one answer cost: tokens fed, tokens reused from the cache, tokens made, time.
    ``new_tokens`` counts up while the answer is made."""
    fed: int = 0  # prompt tokens run through the model
    reused: int = 0  # prompt tokens served from the cache
    new_tokens: int = 0
    prefill_s: float = 0.0  # until the first new token
    decode_s: float = 0.0  # from the first new token to the last
    cut: bool = False
    # why it was cut: "stop" (asked to), "length" (max_new_tokens), "context" (full), or
    # "prompt" (asked to stop while the prompt was read: no answer, the turn undone)
    cut_by: str | None = None
    dropped: int = 0  # old messages dropped to make room for this turn

    @property
    def prompt_tokens_per_s(self) -> float | None:
        return self.fed / self.prefill_s if self.fed and self.prefill_s > 0 else None

    @property
    def tokens_per_s(self) -> float | None:
        """Decode speed: the tokens after the first over the time they took."""
        if self.new_tokens < 2 or self.decode_s <= 0:
            return None
        return (self.new_tokens - 1) / self.decode_s


class ChatSession:
    def __init__(self, model, tokenizer, system: str | None = None, max_len: int | None = None,
                 temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None,
                 min_p: float | None = None, repeat_penalty: float = 1.0, *,
                 spec: str | None = None, spec_k: int = 5, draft=None):
        self.model, self.tokenizer = model, tokenizer
        # speculative decoding (kvformer.runtime.speculative): its options and acceptance
        if spec and repeat_penalty != 1:
            raise ValueError("speculative decoding keeps the model's own distribution: use "
                             "repeat_penalty=1 with it")
        self.spec = dict(method=spec, k=spec_k, draft=draft) if spec else None
        self.spec_stats = SpecStats()
        self.cache = model.new_cache(1, min(max_len or model.cfg.max_seq_len,
                                            model.cfg.max_seq_len))
        self.cached_ids: list[int] = []  # exactly the tokens whose K/V are in the cache
        self.messages: list[dict] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self.sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                             repeat_penalty=repeat_penalty)
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
        """A new conversation (the system message stays) on an empty cache, its counters
        at zero."""
        system = self.system
        self.messages = [{"role": "system", "content": system}] if system else []
        self.cache.reset()
        self.cached_ids = []
        self.last = None
        self.total_new_tokens = 0

    def template_system(self) -> str | None:
        """The system message the chat template adds by itself when the conversation has
        none (SmolLM2's "You are a helpful AI assistant named SmolLM..."), else None: the
        template rendered with a user message alone, beside the way it wraps a given one."""
        mark, given = "\x01user\x01", "\x01system\x01"
        try:
            alone = self.tokenizer.apply_chat_template([{"role": "user", "content": mark}])
            both = self.tokenizer.apply_chat_template(
                [{"role": "system", "content": given}, {"role": "user", "content": mark}])
        except Exception:  # a template that needs more than this: nothing to say
            return None
        if given not in both or mark not in both or mark not in alone:
            return None
        head, tail = both[:both.index(given)], both[both.index(given) + len(given):
                                                    both.index(mark)]
        before = alone[:alone.index(mark)]
        if not (tail and before.startswith(head) and before.endswith(tail)) \
                or len(before) <= len(head) + len(tail):
            return None
        return before[len(head):len(before) - len(tail)].strip() or None

    def _ids(self, messages: list[dict]) -> list[int]:
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        # what was typed is text: only the template's own markup becomes control tokens
        return self.tokenizer.encode_chat(plain, add_generation_prompt=True)

    # -- one turn --------------------------------------------------------------------------
    def _make_room(self, messages: list[dict], ids: list[int],
                   max_new_tokens: int | None) -> tuple[list[dict], list[int], int]:
        """Drop the oldest turns (never the system message, nor the new message) until the
        conversation and some room for the answer fit the cache: the answer's length, at
        most a quarter of the context. (messages, ids, messages dropped)."""
        most = self.cache.max_len
        room = most // 4 if max_new_tokens is None else min(max_new_tokens, most // 4)
        first = 1 if messages and messages[0]["role"] == "system" else 0
        dropped = 0
        while len(ids) + max(room, 1) > most and len(messages) - first > 1:
            # a whole exchange goes: the user message and the answers after it
            end = first + 1
            while end < len(messages) - 1 and messages[end]["role"] != "user":
                end += 1
            dropped += end - first
            messages = messages[:first] + messages[end:]
            ids = self._ids(messages)
        return messages, ids, dropped

    def send(self, text: str, max_new_tokens: int | None = 256,
             stop: Callable[[], bool] | None = None,
             stop_prompt: bool = True) -> Iterator[str]:
        """Add a user message and stream the assistant's reply as text pieces (the first
        piece is "" once the turn is set up, before the prompt is read: ``last`` then says
        how many old messages were dropped to make room). ``max_new_tokens`` None: until
        the end of the text or of the context.

        ``stop`` is asked after every token and, with ``stop_prompt``, between chunks of the
        prompt (``continue_stream``); when it says True the answer ends there and is kept,
        marked cut (stopped while the prompt was read, the turn is undone; the cache keeps
        what was read). Without ``stop_prompt`` the prompt is read in one piece, which is
        faster once the cache holds a few hundred tokens (the forward's per-call cost is
        paid once), and a KeyboardInterrupt is what stops it: the turn is undone the same
        way. An error before the first token (no room left, a template that fails) undoes
        the turn, so the conversation is as it was."""
        messages = [*self.messages, {"role": "user", "content": text}]
        ids = self._ids(messages)
        messages, ids, dropped = self._make_room(messages, ids, max_new_tokens)
        if len(ids) >= self.cache.max_len:
            raise ContextOverflowError(
                f"this message makes the conversation {len(ids)} tokens, more than the context "
                f"of {self.cache.max_len} can hold with room for an answer")
        self.messages = messages
        common = 0
        for a, b in zip(self.cached_ids, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one token must be fed for logits
        self.cache.truncate(common)
        self.cached_ids = ids[:common]
        self.reused_tokens = common
        stats = TurnStats(fed=len(ids) - common, reused=common, cut=True, cut_by="stop",
                          dropped=dropped)
        self.last = stats
        produced: list[int] = []
        decoder = self.tokenizer.stream_decoder()
        room = self.cache.max_len - len(ids)
        limit = room if max_new_tokens is None else min(max_new_tokens, room)
        vocab = getattr(self.tokenizer, "vocab_size", None)  # not padded-embedding ids
        if self.spec:
            sampling = {k: v for k, v in self.sampling.items() if k != "repeat_penalty"}
            stream = speculative_stream(self.model, ids, limit,
                                        stop_ids=self.tokenizer.stop_ids, cache=self.cache,
                                        generator=self.generator, stats=self.spec_stats,
                                        vocab_limit=vocab, **self.spec, **sampling)
        else:
            stream = continue_stream(self.model, self.cache, ids[common:], max_new_tokens,
                                     generator=self.generator,
                                     stop_ids=self.tokenizer.stop_ids,
                                     history=ids[:common], stop=stop if stop_prompt else None,
                                     vocab_limit=vocab, **self.sampling)
        start = first = time.perf_counter()
        undo = False
        try:
            yield ""
            for tok in stream:
                if not produced:
                    first = time.perf_counter()
                produced.append(tok)
                stats.new_tokens = len(produced)
                piece = decoder.push(tok)
                if piece:
                    yield piece
                if stop is not None and stop():
                    break
            else:
                if not produced and stop is not None and stop():
                    stats.cut_by, undo = "prompt", True
                elif len(produced) >= limit:
                    stats.cut_by = "context" if limit == room else "length"
                else:
                    stats.cut, stats.cut_by = False, None
            tail = decoder.flush()
            if tail:
                yield tail
        except BaseException:  # an error, Ctrl-C, or the stream closed before any token
            undo = not produced
            if undo:
                stats.cut_by = "prompt"
            raise
        finally:
            stream.close()
            # The cache holds a prefix of ids + produced, however the turn ended.
            self.cached_ids = (ids + produced)[:self.cache.length]
            end = time.perf_counter()
            stats.new_tokens = len(produced)
            stats.prefill_s = (first if produced else end) - start
            stats.decode_s = end - first if produced else 0.0
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
                                f"context of {self.cache.max_len}; raise -c/--ctx-size")
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
