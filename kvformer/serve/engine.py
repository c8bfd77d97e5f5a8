"""The batching engine: one model step serves every active sequence.

Requests enter a bounded waiting queue (``submit``). A single background thread runs the
loop, so all torch work stays off the web server's event loop:

1. take in aborts (a client went away) and drop those sequences, freeing their blocks;
2. answer requests that waited longer than ``queue_timeout`` with ``QueueTimeoutError``;
3. admit waiting sequences while fewer than ``max_batch`` run and the pool has blocks for
   the whole prompt (plus one spare block per running sequence, so they can grow);
4. one *decode* forward for every sequence with exactly one token not yet cached: T=1,
   rows of different lengths left-padded by ``PagedBatch`` (for an accelerated model,
   gathered into a contiguous cache so the fast decode step of ``kvformer.native`` /
   ``kvformer.fast`` runs it, and the new K/V written back to the pool);
5. *prefill* of at most ``prefill_chunk`` prompt tokens (one forward per sequence, B=1),
   so a long new prompt does not stall the running streams for more than a chunk.

Sequences join at the next step and leave when finished, so the batch changes every step
(continuous batching). A decode row that needs a new block when none is free preempts the
most recently admitted sequence: its blocks are freed and it goes back to the front of
the queue, to be recomputed (prompt and the tokens it already made) when room returns.
A sequence that cannot fit even alone ends with ``finish_reason='length'``.

Each request gets its own sampling settings and ``torch.Generator``, so its tokens do not
depend on what else is in the batch. Results go out through the request's ``sink``
callable, called on the engine thread with ``Output`` objects.

Threads: the model runs on the engine thread. If the thread that built the model ran
multi-threaded torch ops (a load does), its OpenMP team competes with the engine thread's
and decoding is about half as fast on 2 cores; ``kvformer serve`` therefore loads on one
torch thread (``torch.set_num_threads(1)`` around ``kvformer.load``). See docs/serving.md.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import ContextOverflowError, KvformerError
from ..fast import FastForward
from ..sampling import sample, validate_sampling
from .paged import BlockPool, OutOfBlocksError

# Largest contiguous copy of the batch's K/V a decode step may gather to run the fast step
# (beyond it, e.g. 16 rows of 2,000+ tokens, the step runs over the paged cache in place).
STEP_CACHE_BUDGET = 64 << 20
# Spare slots a gathered step cache gets, so the same rows' next steps reuse it.
STEP_ROOM = 32

log = logging.getLogger("kvformer.serve")


class QueueFullError(KvformerError):
    """The waiting queue is full: try again later."""


class QueueTimeoutError(KvformerError):
    """The request waited too long for a free slot or free KV blocks."""


class EngineClosedError(KvformerError):
    """The engine has stopped."""


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's plus the top k
    ignore_eos: bool = False

    def validate(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) \
                or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an integer >= 1")
        validate_sampling(self.temperature, self.top_k, self.top_p)
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs={self.logprobs!r} must be between 0 and 20")


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely ids and their log-probabilities


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
    error: Exception | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


class Seq:
    """One request inside the engine."""

    def __init__(self, rid: int, prompt_ids: list[int], params: SamplingParams,
                 sink: Callable[[Output], None], decoder, seed: int):
        self.id, self.prompt_ids, self.params, self.sink = rid, prompt_ids, params, sink
        self.output_ids: list[int] = []
        self.blocks: list[int] = []
        self.num_cached = 0  # tokens whose K/V are in the pool
        self.generator = torch.Generator().manual_seed(seed)
        self.decoder = decoder
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


# ---------------------------------------------------------------------------- metrics
class Histogram:
    def __init__(self, buckets: Sequence[float]):
        self.buckets = list(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for i, upper in enumerate(self.buckets):
            if value <= upper:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.sum += value
        self.count += 1


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0,
                   1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0)


class Metrics:
    """Counters and histograms, updated by the engine thread and the web handlers."""

    def __init__(self):
        self.lock = threading.Lock()
        self.http: dict[tuple[str, str], int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.finished: dict[str, int] = {}
        self.preemptions = 0
        self.rejected: dict[str, int] = {}
        self.steps = 0
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.itl = Histogram(LATENCY_BUCKETS)

    def count_http(self, path: str, code: int) -> None:
        with self.lock:
            key = (path, str(code))
            self.http[key] = self.http.get(key, 0) + 1

    def count(self, table: str, key: str) -> None:
        with self.lock:
            d = getattr(self, table)
            d[key] = d.get(key, 0) + 1


# ---------------------------------------------------------------------------- the engine
class Engine:
    def __init__(self, model, tokenizer, *, max_batch: int = 16, kv_blocks: int | None = None,
                 block_size: int = 16, prefill_chunk: int = 128, max_queue: int = 64,
                 queue_timeout: float = 30.0, step_delay: float = 0.0):
        for name, value in (("max_batch", max_batch), ("block_size", block_size),
                            ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue={max_queue!r} must be an integer >= 0")
        if not queue_timeout > 0:
            raise ValueError(f"queue_timeout={queue_timeout!r} must be > 0 seconds")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_seq_len = model.cfg.max_seq_len
        if kv_blocks is None:  # room for every batch slot at up to 2048 tokens
            kv_blocks = -(-max_batch * min(self.max_seq_len, 2048) // block_size)
        if isinstance(kv_blocks, bool) or not isinstance(kv_blocks, int) or kv_blocks < 1:
            raise ValueError(f"kv_blocks={kv_blocks!r} must be an integer >= 1")
        self.pool = BlockPool.for_model(model, kv_blocks, block_size)
        # an accelerated model (kvformer.load's) decodes through the lean step of
        # kvformer.fast / the C++ one of kvformer.native, which need a contiguous cache
        self._fast_decode = isinstance(model.__dict__.get("forward"), FastForward)
        self._step_memo = None  # (row ids, their lengths, step cache) after the last decode
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.max_queue, self.queue_timeout = max_queue, queue_timeout
        self.step_delay = step_delay  # tests: slow every step down
        self.stop_ids = frozenset(getattr(tokenizer, "stop_ids", ()) or ())
        self.metrics = Metrics()

        self._cond = threading.Condition()
        self.waiting: deque[Seq] = deque()  # guarded by _cond
        self._aborts: set[int] = set()  # guarded by _cond
        self._stopping = False
        self.running: list[Seq] = []  # engine thread only
        self._ids = itertools.count(1)
        self._seed_source = torch.Generator().manual_seed(int(time.time_ns() % 2**63))
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ public
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="kvformer-engine",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def alive(self) -> bool:
        """The engine thread is running."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def check_prompt(self, prompt_ids: Sequence[int], max_tokens: int) -> None:
        """Raise ValueError/ContextOverflowError for a request that can never run."""
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int)
               or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"the prompt has token ids outside [0, {vocab}): {bad[:5]}")
        n = len(prompt_ids)
        if n + max_tokens > self.max_seq_len:
            raise ContextOverflowError(
                f"this model's maximum context length is {self.max_seq_len} tokens, but "
                f"{n + max_tokens} were requested ({n} in the prompt, {max_tokens} for the "
                "completion); shorten the prompt or lower max_tokens")
        if self.pool.blocks_for(n + 1) > self.pool.n_blocks:
            raise ContextOverflowError(
                f"the prompt of {n} tokens does not fit in the server's KV cache of "
                f"{self.pool.capacity} tokens; shorten it or start the server with more "
                "--kv-blocks")

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               sink: Callable[[Output], None]) -> int:
        """Queue a request; returns its id (for ``abort``). Raises ValueError for bad input,
        QueueFullError when the waiting queue is full, EngineClosedError after ``stop``."""
        params.validate()
        prompt_ids = list(prompt_ids)
        self.check_prompt(prompt_ids, params.max_tokens)
        seed = params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_source))
        decoder = self.tokenizer.stream_decoder() if self.tokenizer is not None else None
        with self._cond:
            if self._stopping:
                raise EngineClosedError("the engine is shutting down")
            if len(self.waiting) >= self.max_queue:
                self.metrics.count("rejected", "queue_full")
                raise QueueFullError(f"the server is busy: {len(self.waiting)} requests are "
                                     "already waiting; retry later")
            seq = Seq(next(self._ids), prompt_ids, params, sink, decoder, seed)
            self.waiting.append(seq)
            self._cond.notify_all()
        with self.metrics.lock:
            self.metrics.prompt_tokens += len(prompt_ids)
        return seq.id

    def abort(self, rid: int) -> None:
        """Drop a request (its client went away); its blocks are freed at the next step."""
        with self._cond:
            self._aborts.add(rid)
            self._cond.notify_all()

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams,
                 timeout: float | None = None) -> Output:
        """Blocking convenience: run one request to the end, return one merged Output."""
        done = threading.Event()
        parts: list[Output] = []

        def sink(out: Output) -> None:
            parts.append(out)
            if out.finished:
                done.set()

        self.submit(prompt_ids, params, sink)
        if not done.wait(timeout):
            raise TimeoutError("the request did not finish in time")
        return merge_outputs(parts)

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    if not (self.running or self.waiting or self._aborts or self._stopping):
                        self._cond.wait()
                    if self._stopping:
                        break
                    aborts, self._aborts = self._aborts, set()
                self._drop(aborts)
                self._expire()
                self._admit()
                if self.running:
                    try:
                        with torch.inference_mode():
                            self._step()
                    except Exception as exc:  # keep serving: fail this batch only
                        log.exception("engine step failed")
                        for seq in list(self.running):
                            self._fail(seq, exc)
                    if self.step_delay:
                        time.sleep(self.step_delay)
                elif self.waiting:
                    with self._cond:  # nothing admissible yet: wait a moment
                        self._cond.wait(0.02)
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        err = EngineClosedError("the server shut down before the request finished")
        for seq in list(self.running):
            self._fail(seq, err)
        with self._cond:
            pending, self.waiting = list(self.waiting), deque()
        for seq in pending:
            _deliver(seq, Output(error=err, prompt_tokens=len(seq.prompt_ids)))

    def _drop(self, aborts: set[int]) -> None:
        if not aborts:
            return
        with self._cond:
            kept = [s for s in self.waiting if s.id not in aborts]
            dropped = len(self.waiting) - len(kept)
            if dropped:
                self.waiting = deque(kept)
        for _ in range(dropped):
            self.metrics.count("finished", "abort")
        for seq in [s for s in self.running if s.id in aborts]:
            self._release(seq)
            self.metrics.count("finished", "abort")

    def _expire(self) -> None:
        now = time.monotonic()
        with self._cond:
            late = [s for s in self.waiting
                    if not s.started and now - s.arrival > self.queue_timeout]
            if late:
                self.waiting = deque(s for s in self.waiting if s not in late)
        for seq in late:
            self.metrics.count("rejected", "queue_timeout")
            _deliver(seq, Output(error=QueueTimeoutError(
                f"the request waited {self.queue_timeout:g} s for free KV cache blocks or a "
                "batch slot; retry later"), prompt_tokens=len(seq.prompt_ids)))

    def _admit(self) -> None:
        while len(self.running) < self.max_batch:
            with self._cond:
                if not self.waiting:
                    return
                seq = self.waiting[0]
                need = self.pool.blocks_for(seq.num_tokens)
                spare = len(self.running)  # one block of room for each running sequence
                if self.pool.num_free < need + spare and self.running:
                    return
                if self.pool.num_free < need:
                    return
                self.waiting.popleft()
            seq.blocks = self.pool.allocate(need)
            seq.num_cached = 0
            seq.started = True
            self.running.append(seq)

    def _release(self, seq: Seq) -> None:
        if seq in self.running:
            self.running.remove(seq)
        if seq.blocks:
            self.pool.free(seq.blocks)
            seq.blocks = []

    def _preempt(self, seq: Seq) -> None:
        self._release(seq)
        seq.num_cached = 0
        self.metrics.preemptions += 1
        with self._cond:
            self.waiting.appendleft(seq)

    def _fail(self, seq: Seq, exc: Exception) -> None:
        self._release(seq)
        self.metrics.count("finished", "error")
        _deliver(seq, Output(error=exc, prompt_tokens=len(seq.prompt_ids),
                             completion_tokens=len(seq.output_ids)))

    # ------------------------------------------------------------------ one step
    def _step(self) -> None:
        self.metrics.steps += 1
        decode = [s for s in self.running if s.num_tokens - s.num_cached == 1]
        ready: list[Seq] = []
        for seq in decode:  # oldest first; room for one more slot each
            if seq not in self.running:
                continue  # preempted for an older one
            while True:
                try:
                    self.pool.grow(seq.blocks, seq.num_cached + 1)
                    ready.append(seq)
                    break
                except OutOfBlocksError:
                    victim = self.running[-1]
                    if victim is seq and len(self.running) == 1:
                        self._finish(seq, "length")  # does not fit even alone
                        break
                    self._preempt(victim)
                    if victim is seq:
                        break
        if ready:
            self._decode(ready)
        else:
            self._step_memo = None  # nothing decodes: do not hold a gathered cache

        budget = self.prefill_chunk
        for seq in [s for s in self.running if s.num_tokens - s.num_cached > 1]:
            if budget <= 0:
                break
            n = min(budget, seq.num_tokens - seq.num_cached)
            budget -= n
            self._prefill(seq, n)

    def _decode(self, seqs: list[Seq]) -> None:
        device = self.model.device
        tokens = torch.tensor([[s.token_at(s.num_cached)] for s in seqs], device=device)
        pos = torch.tensor([[s.num_cached] for s in seqs], device=device)
        cache = self.pool.batch([s.blocks for s in seqs], [s.num_cached for s in seqs])
        if self._fast_decode and cache.step_cache_bytes(STEP_ROOM) <= STEP_CACHE_BUDGET:
            # The fast decode step reads only a contiguous cache: gather the rows into one
            # with room for STEP_ROOM more steps, step, write the new slots back to the
            # pool. While the same rows keep decoding, the next steps reuse it.
            rows = [s.id for s in seqs]
            memo = self._step_memo
            if (memo is not None and memo[0] == rows and memo[1] == cache.lengths
                    and memo[2].length < memo[2].max_len):
                step = memo[2]
            else:
                self._step_memo = None  # free the old one before gathering a new one
                step = cache.step_cache(STEP_ROOM)
            logits = self.model(tokens, input_pos=pos, cache=step,
                                key_mask=cache.key_mask(1))[:, -1]
            cache.write_back(step)
            self._step_memo = (rows, list(cache.lengths), step)
        else:
            self._step_memo = None
            logits = self.model(tokens, input_pos=pos, cache=cache)[:, -1]
        for s in seqs:
            s.num_cached += 1
        self._sample(seqs, logits)

    def _prefill(self, seq: Seq, n: int) -> None:
        device = self.model.device
        lo = seq.num_cached
        tokens = torch.tensor([seq.tokens(lo, lo + n)], device=device)
        pos = torch.arange(lo, lo + n, device=device).unsqueeze(0)
        cache = self.pool.batch([seq.blocks], [lo])
        # a prefill chunk needs only its last token's logits: the LM head runs on one row
        logits = self.model(tokens, input_pos=pos, cache=cache, last_only=True)[:, -1]
        seq.num_cached += n
        if seq.num_cached == seq.num_tokens:
            self._sample([seq], logits)

    def _sample(self, seqs: list[Seq], logits: torch.Tensor) -> None:
        greedy = [i for i, s in enumerate(seqs) if s.params.temperature == 0]
        ids = [0] * len(seqs)
        if greedy:
            picked = logits[greedy].argmax(dim=-1).tolist()
            for i, tok in zip(greedy, picked):
                ids[i] = tok
        for i, s in enumerate(seqs):
            p = s.params
            if p.temperature != 0:
                ids[i] = int(sample(logits[i:i + 1], p.temperature, p.top_k, p.top_p,
                                    s.generator)[0])
        for i, (s, tok) in enumerate(zip(seqs, ids)):
            lp = None
            if s.params.logprobs is not None:
                lp = _logprob(logits[i], tok, s.params.logprobs)
            self._on_token(s, tok, lp)

    def _on_token(self, seq: Seq, tok: int, lp: TokenLogprob | None) -> None:
        now = time.monotonic()
        with self.metrics.lock:
            if seq.last_token_at is None:
                self.metrics.ttft.observe(now - seq.arrival)
            else:
                self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        p = seq.params
        if tok in self.stop_ids and not p.ignore_eos:
            self._finish(seq, "stop")
            return
        seq.output_ids.append(tok)
        with self.metrics.lock:
            self.metrics.completion_tokens += 1
        piece = seq.decoder.push(tok) if seq.decoder is not None else ""
        out = Output(token_ids=[tok], logprobs=[lp] if lp is not None else None)
        if self._add_text(seq, piece):
            self._finish(seq, "stop", out, flush=False)
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_seq_len:
            self._finish(seq, "length", out)
        else:
            out.text = self._take_text(seq)
            _deliver(seq, out)

    def _add_text(self, seq: Seq, piece: str) -> bool:
        """Append decoded text; True if it completed a stop string (text is cut there)."""
        if not piece:
            return False
        before = len(seq.text)
        seq.text += piece
        stops = seq.params.stop
        if not stops:
            return False
        longest = max(len(s) for s in stops)
        lo = max(0, before - longest + 1)
        hits = [i for i in (seq.text.find(s, lo) for s in stops) if i >= 0]
        if hits:
            seq.text = seq.text[:min(hits)]
            return True
        return False

    def _take_text(self, seq: Seq, final: bool = False) -> str:
        """The text that can be sent now: all of it at the end, otherwise all but a tail
        that could still grow into a stop string."""
        end = len(seq.text)
        if not final and seq.params.stop:
            for s in seq.params.stop:
                for k in range(min(len(s) - 1, end - seq.sent), 0, -1):
                    if seq.text.endswith(s[:k]):
                        end = min(end, len(seq.text) - k)
                        break
        piece = seq.text[seq.sent:end]
        seq.sent = end
        return piece

    def _finish(self, seq: Seq, reason: str, out: Output | None = None,
                flush: bool = True) -> None:
        """End a sequence: send the rest of its text, the reason and the counts."""
        out = out or Output()
        if flush and seq.decoder is not None and self._add_text(seq, seq.decoder.flush()):
            reason = "stop"  # the held-back end of the text completed a stop string
        out.text = self._take_text(seq, final=True)
        out.finish_reason = reason
        out.prompt_tokens = len(seq.prompt_ids)
        out.completion_tokens = len(seq.output_ids)
        self._release(seq)
        self.metrics.count("finished", reason)
        _deliver(seq, out)


def _logprob(logits: torch.Tensor, tok: int, k: int) -> TokenLogprob:
    lp = torch.log_softmax(logits.float(), dim=-1)
    top: list[tuple[int, float]] = []
    if k > 0:
        values, ids = torch.topk(lp, min(k, lp.shape[-1]))
        top = [(int(i), float(v)) for i, v in zip(ids.tolist(), values.tolist())]
    value = float(lp[tok])
    return TokenLogprob(tok, value if math.isfinite(value) else -9999.0, top)


def _deliver(seq: Seq, out: Output) -> None:
    try:
        seq.sink(out)
    except Exception:  # a consumer's failure must not stop the engine
        log.exception("delivering output of request %d failed", seq.id)


def merge_outputs(parts: Iterable[Output]) -> Output:
    merged = Output(logprobs=[])
    for out in parts:
        merged.text += out.text
        merged.token_ids += out.token_ids
        if out.logprobs:
            merged.logprobs += out.logprobs
        if out.finished:
            merged.finish_reason, merged.error = out.finish_reason, out.error
            merged.prompt_tokens = out.prompt_tokens
            merged.completion_tokens = out.completion_tokens
    if not merged.logprobs:
        merged.logprobs = None
    return merged
