"""One request inside the engine: its settings, its tokens, its text and what it sends out.

``SamplingParams`` is what a request asks for; ``Seq`` is the request while it runs (prompt
and output ids, its block table, its random generator, its decoded text); ``Output`` is
what it sends its consumer after each step. The rules about a request's text live here
and nowhere else: stop strings (the text is cut before the first match, and a tail that
could still grow into one is held back), merging outputs, and the checks a prompt must
pass before it is queued (``check_prompt``). A request with a grammar (structured output,
an enforced tool call) gives each of its sequences a ``Constraint``: every token it takes
advances it, and the sequence ends when the grammar's text is complete.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from kvformer.errors import ContextOverflowError
from kvformer.runtime.sampling import validate_sampling

if TYPE_CHECKING:
    from kvformer.serve.grammar import Grammar


@dataclass
class SamplingParams:
    """One sequence's settings. The penalties follow OpenAI's definitions (presence and
    frequency over the tokens generated so far) and, for ``repetition_penalty``, the one of
    Hugging Face and vLLM (over the prompt and the output: a positive logit divided by it,
    a negative one multiplied); ``min_p`` drops tokens less likely than ``min_p`` times the
    most likely one (after temperature); ``logit_bias`` adds to chosen logits."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's plus the top k
    ignore_eos: bool = False
    grammar: Grammar | None = None  # what the output must match (structured output)

    def validate(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) \
                or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an integer >= 1")
        validate_sampling(self.temperature, self.top_k, self.top_p)
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs={self.logprobs!r} must be between 0 and 20")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name}={getattr(self, name)!r} must be between -2 and 2")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty={self.repetition_penalty!r} must be > 0")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p={self.min_p!r} must be between 0 and 1")
        for tok, bias in (self.logit_bias or {}).items():
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias[{tok}]={bias!r} must be between -100 and 100")

    @property
    def adjusts_logits(self) -> bool:
        """Whether the logits change before sampling (bias or a penalty)."""
        return bool(self.logit_bias) or self.presence_penalty != 0 \
            or self.frequency_penalty != 0 or self.repetition_penalty != 1


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely ids and their log-probabilities

    @classmethod
    def of(cls, logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
        """The chosen token's log-probability under ``logits`` [V] and the ``k`` best."""
        lp = torch.log_softmax(logits.float(), dim=-1)
        top: list[tuple[int, float]] = []
        if k > 0:
            values, ids = torch.topk(lp, min(k, lp.shape[-1]))
            top = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist())
                   if math.isfinite(v)]  # a grammar's mask leaves fewer than k
        value = float(lp[token])
        return cls(token, value if math.isfinite(value) else -9999.0, top)


@dataclass
class Output:
    """What a sequence made in one step. ``text`` is new text (stop strings held back until
    they are ruled out); the last Output of a request has ``finish_reason`` or ``error``."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache
    error: Exception | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None

    def merge(self, later: Output) -> Output:
        """Append a later output of the same request to this one (in place)."""
        self.text += later.text
        self.token_ids += later.token_ids
        if later.logprobs:
            self.logprobs = (self.logprobs or []) + later.logprobs
        if later.finished:
            self.finish_reason, self.error = later.finish_reason, later.error
            self.prompt_tokens = later.prompt_tokens
            self.completion_tokens = later.completion_tokens
            self.cached_tokens = later.cached_tokens
        return self


def merge_outputs(parts: Iterable[Output]) -> Output:
    """Every output of a request as one."""
    merged = Output()
    for out in parts:
        merged.merge(out)
    return merged


def check_prompt(prompt_ids: Sequence[int], max_tokens: int | None, *, vocab_size: int,
                 max_seq_len: int, pool_tokens: int, pool_fits: Callable[[int], bool]) -> int:
    """The one place a prompt is checked before it is queued. Raises ValueError for an
    empty prompt or ids outside the vocabulary, ContextOverflowError for prompt +
    max_tokens over the context or a prompt that does not fit in the whole KV pool
    (``pool_fits(n_tokens)``). Returns max_tokens, where None means the rest of the
    context."""
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    bad = [t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int)
           or not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"the prompt has token ids outside [0, {vocab_size}): {bad[:5]}")
    n = len(prompt_ids)
    if max_tokens is None:
        max_tokens = max_seq_len - n
        if max_tokens < 1:
            raise ContextOverflowError(
                f"the prompt has {n} tokens and leaves no room in this model's context of "
                f"{max_seq_len}; shorten it")
    if n + max_tokens > max_seq_len:
        raise ContextOverflowError(
            f"this model's maximum context length is {max_seq_len} tokens, but "
            f"{n + max_tokens} were requested ({n} in the prompt, {max_tokens} for the "
            "completion); shorten the prompt or lower max_tokens")
    if not pool_fits(n + 1):
        raise ContextOverflowError(
            f"the prompt of {n} tokens does not fit in the server's KV cache of "
            f"{pool_tokens} tokens; shorten it or start the server with more --kv-blocks")
    return max_tokens


class Seq:
    """One request inside the engine."""

    def __init__(self, rid: int, prompt_ids: list[int], params: SamplingParams,
                 sink: Callable[[Output], None], decoder, seed: int):
        self.id, self.prompt_ids, self.params, self.sink = rid, prompt_ids, params, sink
        self.output_ids: list[int] = []
        self.counts: dict[int, int] = {}  # generated token -> how often (penalties)
        self.blocks: list[int] = []
        self.num_cached = 0  # tokens whose K/V are in the pool
        self.block_hashes: list[bytes] = []  # chain hashes of the full blocks (prefix cache)
        self.cached_tokens = 0  # prompt tokens found in the prefix cache at admission
        self.generator = torch.Generator().manual_seed(seed)
        self.decoder = decoder
        self.constraint = params.grammar.start() if params.grammar is not None else None
        self.text = ""  # decoded output so far (cut at a stop string)
        self.sent = 0  # chars of text already sent
        self.arrival = time.monotonic()
        self.started = False  # admitted at least once (preempted ones are not expired)
        self.last_token_at: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    def token_at(self, i: int) -> int:
        n = len(self.prompt_ids)
        return self.prompt_ids[i] if i < n else self.output_ids[i - n]

    def tokens(self, lo: int, hi: int) -> list[int]:
        return (self.prompt_ids + self.output_ids)[lo:hi]

    def all_tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    # ------------------------------------------------------------------ text and stop strings
    def add_text(self, piece: str) -> bool:
        """Append decoded text; True if it completed a stop string (text is cut there)."""
        if not piece:
            return False
        before = len(self.text)
        self.text += piece
        stops = self.params.stop
        if not stops:
            return False
        longest = max(len(s) for s in stops)
        lo = max(0, before - longest + 1)
        hits = [i for i in (self.text.find(s, lo) for s in stops) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return True
        return False

    def take_text(self, final: bool = False) -> str:
        """The text that can be sent now: all of it at the end, otherwise all but a tail
        that could still grow into a stop string."""
        end = len(self.text)
        if not final and self.params.stop:
            for s in self.params.stop:
                for k in range(min(len(s) - 1, end - self.sent), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        piece = self.text[self.sent:end]
        self.sent = end
        return piece

    def push_token(self, tok: int) -> bool:
        """Record a generated token and its text; True if the sequence must end here: the
        text hit a stop string, or completed its grammar (raises GrammarError for a token
        the grammar refuses)."""
        if self.constraint is not None:
            self.constraint.consume(tok)
        self.output_ids.append(tok)
        self.counts[tok] = self.counts.get(tok, 0) + 1
        piece = self.decoder.push(tok) if self.decoder is not None else ""
        if self.add_text(piece):
            return True
        if self.constraint is not None and self.constraint.done:
            self.flush_text()
            return True
        return False

    def flush_text(self) -> bool:
        """At the end: decode what the decoder held back; True if it completed a stop."""
        return self.decoder is not None and self.add_text(self.decoder.flush())
