"""Structured output: a grammar per sequence, applied as a mask over the next token's logits.

A request with ``response_format`` (``json_object``, ``json_schema``) or a tool call that
must happen (``tool_choice: "required"`` or a named function) gets a ``Grammar``; each of
its sequences gets its own ``Constraint`` (the grammar's state after the tokens so far).
Before each token is picked, the sampler asks every constrained row for the set of tokens
that keep the text inside the grammar (``apply_masks``) and sets the others to -inf; the
picked token then advances the state (``Constraint.consume``). When the grammar can take
no more bytes the sequence ends (``finish_reason: "stop"``); an end-of-turn token is
allowed only where the text so far is complete.

The matching itself is llguidance's (Rust, an Earley parser over lazily built lexer
states: nothing is precomputed over the vocabulary per schema; docs/serving.md compares it
with xgrammar and outlines-core, and gives the mask's cost).
kvformer gives it the vocabulary as bytes (``Vocabulary``: ``Tokenizer.token_bytes``,
special tokens marked so that no grammar text can produce them).

JSON is generated in one line with ``", "`` and ``": "`` between items: small models
given free whitespace often fill the output with newlines until ``max_tokens``. For the
same reason an object that lists its keys is closed unless the schema opens it
(``closed_schema``): a small model given room for more keys adds them until the limit.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from kvformer.errors import KvformerError

# JSON layout options every schema gets unless it sets its own ("x-guidance")
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# compiled grammars kept per server (instructor and langchain send the same schema each time)
CACHED_GRAMMARS = 64


def closed_schema(schema: Any, close: bool = True) -> Any:
    """``schema`` with every object that lists its keys (``properties`` or
    ``patternProperties``) and says nothing of others (no ``additionalProperties`` or
    ``unevaluatedProperties``) given ``additionalProperties: false``, as xgrammar does. JSON
    valid under the result is valid under ``schema``: only schemas where an instance must
    match are closed (never under ``not`` or ``if``). Objects whose keys others may add to
    stay open: one with ``allOf``, ``anyOf``, ``oneOf``, ``$ref`` or ``if`` beside its
    properties, ``allOf`` members, ``then`` / ``else`` and ``dependentSchemas``; so do the
    branches of ``anyOf`` / ``oneOf`` beside properties (``close=False``)."""
    if not isinstance(schema, dict):
        return schema  # true / false, or not a schema (the compiler says so)
    out = dict(schema)
    for key in ("properties", "patternProperties", "$defs", "definitions"):
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_schema(s) for name, s in out[key].items()}
    for key in ("additionalProperties", "items", "additionalItems", "unevaluatedItems",
                "contains"):
        if isinstance(out.get(key), dict):
            out[key] = closed_schema(out[key])
    for key in ("items", "prefixItems"):
        if isinstance(out.get(key), list):
            out[key] = [closed_schema(s) for s in out[key]]
    lists_keys = "properties" in out or "patternProperties" in out
    for key in ("anyOf", "oneOf", "allOf"):
        if isinstance(out.get(key), list):
            alone = key != "allOf" and not lists_keys  # a union of whole objects
            out[key] = [closed_schema(s, alone) for s in out[key]]
    for key in ("then", "else"):
        if isinstance(out.get(key), dict):
            out[key] = closed_schema(out[key], False)
    if isinstance(out.get("dependentSchemas"), dict):
        out["dependentSchemas"] = {k: closed_schema(s, False)
                                   for k, s in out["dependentSchemas"].items()}
    shared = ("allOf", "anyOf", "oneOf", "$ref", "if", "dependentSchemas",
              "additionalProperties", "unevaluatedProperties")
    if close and lists_keys and not any(k in out for k in shared):
        out["additionalProperties"] = False
    return out


class GrammarError(KvformerError, ValueError):
    """A grammar that cannot be compiled, or a token it does not accept. ``param`` names the
    request's parameter the grammar came from ("response_format", "tools"), where known."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


def _llguidance():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a dependency of kvformer[serve]
        raise GrammarError("structured output needs llguidance: pip install 'kvformer[serve]'"
                           ) from None
    return llguidance


class Vocabulary:
    """The model's token ids as llguidance sees them: each id's bytes, the special ids,
    and the ids that end a turn. ``width`` is the logits' width (the model's vocab_size,
    which may exceed the tokenizer's: those ids are never allowed)."""

    def __init__(self, tokenizer, width: int):
        llg = _llguidance()
        table = list(tokenizer.token_bytes())
        specials = set(tokenizer.special_ids)
        n = max(width, len(table))
        table += [b""] * (n - len(table))
        for i, raw in enumerate(table):  # ids with no text: specials no grammar names
            if not raw:
                table[i] = f"<|kvformer_unused_{i}|>".encode()
                specials.add(i)
        self.stop_ids = sorted(i for i in tokenizer.stop_ids if i < width)
        ends = self.stop_ids
        if not ends:  # llguidance needs an end token: one past the logits, never picked
            table.append(b"<|kvformer_end|>")
            specials.add(n)
            ends = [n]
        self.width = width
        self.words = -(-len(table) // 32)  # the bitmask's int32 words per row
        source = _Source(table, sorted(specials), ends[0], tokenizer)
        self.ll = llg.LLTokenizer(llg.TokenizerWrapper(source), eos_token=ends)
        source.ll = self.ll


class _Source:
    """What llguidance's TokenizerWrapper reads: the bytes of each id, and a way to
    tokenize text (for the tokens a grammar forces)."""

    def __init__(self, tokens: list[bytes], specials: list[int], eos: int, tokenizer):
        self.tokens, self.special_token_ids = tokens, specials
        self.eos_token_id, self.bos_token_id = eos, None
        self._tokenizer = tokenizer
        self.ll = None

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text only")  # the wrapper then passes str
        ids = self._tokenizer.encode_plain(text)
        if self.ll is not None and b"".join(self.tokens[i] for i in ids) != text.encode():
            # not spelled exactly (a SentencePiece vocabulary puts a space in front):
            # llguidance's longest-match tokenization, over the same token bytes
            return self.ll.greedy_tokenize(text)
        return ids


class Grammar:
    """A compiled grammar; ``start()`` gives one sequence its own state."""

    def __init__(self, vocab: Vocabulary, source: str, what: str, param: str | None = None):
        llg = _llguidance()
        self.vocab, self.what, self.param = vocab, what, param
        matcher = llg.LLMatcher(vocab.ll, source, log_level=0,
                                limits=llg.LLParserLimits(verbose_errors=False))
        if matcher.is_error():
            raise GrammarError(f"{what}: {_first_line(matcher.get_error())}")
        self._first = matcher

    def start(self) -> Constraint:
        return Constraint(self._first.deep_copy(), self.vocab, self.param)


class Constraint:
    """One sequence's place in its grammar."""

    def __init__(self, matcher, vocab: Vocabulary, param: str | None = None):
        self.matcher, self.vocab, self.param = matcher, vocab, param

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"the grammar refused token {token}: "
                               f"{_first_line(self.matcher.get_error()) or 'not allowed'}",
                               self.param)

    @property
    def done(self) -> bool:
        """Nothing more can follow: the text is complete."""
        return self.matcher.is_stopped()


def _first_line(text: str) -> str:
    return text.strip().split("\n", 1)[0]


def apply_masks(rows: list[tuple[int, Constraint, bool]], logits: torch.Tensor) -> None:
    """Set to -inf, in place, the logits [B, V] (float32) of the tokens each constrained
    row may not take next. ``rows``: (row of ``logits``, its constraint, whether its
    end-of-turn tokens are off: ``ignore_eos``). One llguidance call fills every row's
    bitmask (bit ``t % 32`` of word ``t // 32`` for token t)."""
    if not rows:
        return
    vocab = rows[0][1].vocab
    bits = np.zeros((len(rows), vocab.words), dtype=np.int32)
    stride = vocab.words * 4
    if len(rows) == 1:
        rows[0][1].matcher.unsafe_compute_mask_ptr(bits.ctypes.data, stride)
    else:
        _executor().unsafe_compute_mask_ptr(
            [(c.matcher, k) for k, (_, c, _) in enumerate(rows)], bits.ctypes.data, stride,
            len(rows))
    width = logits.shape[-1]
    allowed = np.unpackbits(bits.view(np.uint8), axis=-1, bitorder="little")[:, :width]
    allowed = allowed.view(bool)
    for k, (_, _, no_eos) in enumerate(rows):
        if no_eos and vocab.stop_ids:
            allowed[k, vocab.stop_ids] = False
    banned = ~allowed
    on_cpu = logits.device.type == "cpu" and logits.dtype == torch.float32
    for k, (i, _, _) in enumerate(rows):
        if not allowed[k].any():  # the matcher failed: consume() will say so
            continue
        if on_cpu:
            np.copyto(logits[i].numpy(), -np.inf, where=banned[k])
        else:
            logits[i].masked_fill_(torch.from_numpy(banned[k]).to(logits.device),
                                   float("-inf"))


_EXECUTOR = None
_EXECUTOR_LOCK = threading.Lock()


def _executor():
    global _EXECUTOR
    with _EXECUTOR_LOCK:
        if _EXECUTOR is None:
            _EXECUTOR = _llguidance().LLExecutor()
        return _EXECUTOR


class Grammars:
    """One server's grammar compiler: the vocabulary (built on first use, about half a
    second for a 49k vocabulary) and the last compiled grammars. Thread-safe."""

    def __init__(self, tokenizer, width: int):
        self.tokenizer, self.width = tokenizer, width
        self._vocab: Vocabulary | None = None
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def vocab(self) -> Vocabulary:
        with self._lock:
            if self._vocab is None:
                if self.tokenizer is None:
                    raise GrammarError("structured output needs the model's tokenizer; this "
                                       "server has none")
                self._vocab = Vocabulary(self.tokenizer, self.width)
            return self._vocab

    def json_schema(self, schema: Any) -> Grammar:
        """A grammar for JSON text valid under ``schema`` (a JSON Schema object), its
        objects closed (``closed_schema``)."""
        if not isinstance(schema, dict):
            raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
        llg = _llguidance()
        try:
            source = llg.LLMatcher.grammar_from_json_schema(closed_schema(schema),
                                                            defaults=JSON_LAYOUT)
        except ValueError as exc:
            raise GrammarError(f"the JSON schema is not usable: {exc}") from None
        return self._compiled(source, "the JSON schema", "response_format")

    def json_object(self) -> Grammar:
        """Any JSON object."""
        return self.json_schema({"type": "object"})

    def lark(self, text: str, what: str = "the grammar", param: str | None = None) -> Grammar:
        """A grammar in llguidance's Lark dialect (``%json {...}`` embeds a JSON schema)."""
        return self._compiled(_llguidance().LLMatcher.grammar_from_lark(text), what, param)

    def _compiled(self, source: str, what: str, param: str | None = None) -> Grammar:
        key = json.dumps([source, what, param])
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        grammar = Grammar(self.vocab, source, what, param)
        with self._lock:
            self._cache[key] = grammar
            while len(self._cache) > CACHED_GRAMMARS:
                self._cache.popitem(last=False)
        return grammar
