"""The batching engine: one model step serves every active sequence.

Requests enter a bounded waiting queue (``submit``). A single background thread runs the
loop, so all torch work stays off the web server's event loop:

1. take in aborts (a client went away) and drop those sequences, freeing their blocks;
2. answer requests that waited longer than ``queue_timeout`` with ``QueueTimeoutError``;
3. admit waiting sequences while fewer than ``max_batch`` run and the pool has blocks for
   the prompt less its cached prefix (plus one spare block per running sequence, so they
   can grow);
4. one *decode* row for every sequence with exactly one token not yet cached, and
   *prefill* of at most ``prefill_chunk`` prompt tokens (so a long new prompt does not
   stall the running streams for more than a chunk): where the model's executor is the C++
   step, all of them rows of one call of it, reading and writing the pool by block tables
   (a prompt's tokens are rows too, see ``runner``); otherwise one decode forward of T=1
   over the paged cache, then one prefill forward per sequence (B=1).

Sequences join at the next step and leave when finished, so the batch changes every step
(continuous batching). A decode row that needs a new block when none is free preempts the
most recently admitted sequence: its blocks are freed and it goes back to the front of
the queue, to be recomputed (prompt and the tokens it already made) when room returns.
A sequence that cannot fit even alone ends with ``finish_reason='length'``.

Each request gets its own sampling settings and ``torch.Generator``, so its tokens do not
depend on what else is in the batch. Results go out through the request's ``sink``
callable, called on the engine thread with ``Output`` objects.

The parts, one job each: ``scheduler.Scheduler`` (queue, admission, preemption),
``sequence`` (a request, its text and stop strings, its outputs), ``runner.StepRunner``
(the forwards over the paged cache), ``sampler`` (logits to tokens), ``paged`` (the
blocks), ``metrics``. This module holds the loop that drives them and the public API.

Threads: the model runs on the engine thread. If the thread that built the model ran
multi-threaded torch ops (a load does), its OpenMP team competes with the engine thread's
and decoding is about half as fast on 2 cores; ``kvformer serve`` therefore loads on one
torch thread (``torch.set_num_threads(1)`` around ``kvformer.load``). See docs/serving.md.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import TypeVar

import torch

from kvformer.kv.paged import BlockPool
from kvformer.runtime.step import for_model
from kvformer.serve.grammar import GrammarError
from kvformer.serve.metrics import Metrics
from kvformer.serve.runner import StepRunner
from kvformer.serve.sampler import pick_tokens
from kvformer.serve.scheduler import (
    EngineClosedError,
    QueueFullError,
    QueueTimeoutError,
    Scheduler,
)
from kvformer.serve.sequence import (
    Output,
    SamplingParams,
    Seq,
    TokenLogprob,
    check_prompt,
    merge_outputs,
)

__all__ = ["Engine", "EngineClosedError", "Output", "QueueFullError", "QueueTimeoutError",
           "SamplingParams", "TokenLogprob", "merge_outputs"]

log = logging.getLogger("kvformer.serve")
T = TypeVar("T")


class Engine:
    def __init__(self, model, tokenizer, *, max_batch: int = 16, kv_blocks: int | None = None,
                 block_size: int = 16, prefill_chunk: int = 128, max_queue: int = 64,
                 queue_timeout: float = 30.0, step_delay: float = 0.0,
                 prefix_caching: bool = True, kv_dtype: str | None = None,
                 max_tokens: int | None = None, max_seq_len: int | None = None):
        for name, value in (("max_batch", max_batch), ("block_size", block_size),
                            ("prefill_chunk", prefill_chunk)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if not isinstance(max_queue, int) or max_queue < 0:
            raise ValueError(f"max_queue={max_queue!r} must be an integer >= 0")
        if not queue_timeout > 0:
            raise ValueError(f"queue_timeout={queue_timeout!r} must be > 0 seconds")
        if max_tokens is not None and (isinstance(max_tokens, bool)
                                       or not isinstance(max_tokens, int) or max_tokens < 1):
            raise ValueError(f"max_tokens={max_tokens!r} must be an integer >= 1 (or None)")
        # the server's default and ceiling for a request's max_tokens (None: the context)
        self.max_tokens = max_tokens
        # a model (its executor chosen here, once: the C++ step or the forward) or an Executor
        self.executor = for_model(model)
        model = self.executor.model
        self.model, self.tokenizer = model.eval(), tokenizer
        # the context a request may fill (``kvformer serve -c``): at most the model's
        if max_seq_len is not None and (isinstance(max_seq_len, bool)
                                        or not isinstance(max_seq_len, int) or max_seq_len < 1):
            raise ValueError(f"max_seq_len={max_seq_len!r} must be an integer >= 1 (or None)")
        self.max_seq_len = min(max_seq_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        kv = model.kv_format(kv_dtype)  # None: the model's choice (load(kv_dtype=...))
        if kv_blocks is None:
            kv_blocks = default_kv_blocks(model, kv, max_batch, block_size)
        if isinstance(kv_blocks, bool) or not isinstance(kv_blocks, int) or kv_blocks < 1:
            raise ValueError(f"kv_blocks={kv_blocks!r} must be an integer >= 1")
        self.pool = BlockPool.for_model(model, kv_blocks, block_size, dtype=kv,
                                        prefix_caching=prefix_caching,
                                        model_key=model_key(model))
        self.metrics = Metrics()
        self.scheduler = Scheduler(self.pool, self.metrics, max_batch, max_queue, queue_timeout)
        self.runner = StepRunner(self.executor, self.pool)
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.max_queue, self.queue_timeout = max_queue, queue_timeout
        self.step_delay = step_delay  # tests: slow every step down
        self.stop_ids = frozenset(getattr(tokenizer, "stop_ids", ()) or ())
        # ids a token can be picked from: a model's vocab_size may be padded past its
        # tokenizer's (Qwen2: 151,936 rows for 151,665 tokens); the rest have no text
        self.pickable = min(model.cfg.vocab_size,
                            getattr(tokenizer, "vocab_size", None) or model.cfg.vocab_size)
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
        self.scheduler.stop()
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
    def running(self) -> list[Seq]:
        return self.scheduler.running

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def gauges(self) -> dict[str, int | str]:
        """What the engine holds now, as plain numbers: the batch, the queue and the KV
        pool (``/metrics`` and the chat page's panel read these, not the engine)."""
        pool = self.pool
        return {
            "active_sequences": self.num_running, "queue_length": self.num_waiting,
            "kv_blocks_used": pool.num_used, "kv_blocks_free": pool.num_free,
            "kv_blocks_cached": pool.num_cached, "kv_blocks_total": pool.n_blocks,
            "kv_block_size": pool.block_size, "kv_dtype": pool.kv_dtype,
            "kv_cache_bytes": pool.nbytes, "kv_cache_tokens": pool.capacity,
            "kv_bytes_per_token": pool.bytes_per_token,
        }

    def check_prompt(self, prompt_ids: Sequence[int], max_tokens: int | None) -> int:
        """Raise ValueError/ContextOverflowError for a request that can never run; returns
        max_tokens (None: the rest of the context), at most the engine's ``max_tokens``
        (which is also the default). See ``sequence.check_prompt``."""
        if self.max_tokens is not None:
            room = max(1, self.max_seq_len - len(prompt_ids))
            max_tokens = (min(self.max_tokens, room) if max_tokens is None
                          else min(max_tokens, self.max_tokens))
        pool = self.pool
        return check_prompt(prompt_ids, max_tokens, vocab_size=self.model.cfg.vocab_size,
                            max_seq_len=self.max_seq_len, pool_tokens=pool.capacity,
                            pool_fits=lambda n: pool.blocks_for(n) <= pool.n_blocks)

    def submit(self, prompt_ids: Sequence[int], params: SamplingParams,
               sink: Callable[[Output], None]) -> int:
        """Queue a request; returns its id (for ``abort``). Raises ValueError for bad input,
        QueueFullError when the waiting queue is full, EngineClosedError after ``stop``."""
        params.validate()
        prompt_ids = list(prompt_ids)
        params.max_tokens = self.check_prompt(prompt_ids, params.max_tokens)
        seed = params.seed
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_source))
        decoder = self.tokenizer.stream_decoder() if self.tokenizer is not None else None
        seq = Seq(next(self._ids), prompt_ids, params, sink, decoder, seed)
        self.scheduler.add(seq)
        with self.metrics.lock:
            self.metrics.prompt_tokens += len(prompt_ids)
        return seq.id

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn()`` on the engine thread between two steps (under inference mode), for
        torch work that is not a sequence (``/v1/embeddings``): the model is never run by
        two threads at once. Raises EngineClosedError after ``stop``."""
        future: Future[T] = Future()

        def job() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    with torch.inference_mode():
                        future.set_result(fn())
                except Exception as exc:
                    future.set_exception(exc)

        self.scheduler.add_job(job)
        return future

    def abort(self, rid: int) -> None:
        """Drop a request (its client went away); its blocks are freed at the next step."""
        self.scheduler.abort(rid)

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
        sched = self.scheduler
        try:
            while True:
                stopping, aborts = sched.wait_for_work()
                if stopping:
                    break
                dropped, gone = sched.drop(aborts)
                for _ in range(dropped + len(gone)):
                    self.metrics.count("finished", "abort")
                for seq in sched.expire():
                    self.metrics.count("rejected", "queue_timeout")
                    _deliver(seq, Output(error=QueueTimeoutError(
                        f"the request waited {self.queue_timeout:g} s for free KV cache "
                        "blocks or a batch slot; retry later"),
                        prompt_tokens=len(seq.prompt_ids)))
                job = sched.take_job()
                if job is not None:
                    job()
                sched.admit()
                if sched.running:
                    try:
                        with torch.inference_mode():
                            self._step()
                    except Exception as exc:  # keep serving: fail this batch only
                        log.exception("engine step failed")
                        for seq in list(sched.running):
                            self._fail(seq, exc)
                    if self.step_delay:
                        time.sleep(self.step_delay)
                elif sched.waiting:
                    sched.idle_wait()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        err = EngineClosedError("the server shut down before the request finished")
        for seq in list(self.scheduler.running):
            self._fail(seq, err)
        for seq in self.scheduler.take_waiting():
            _deliver(seq, Output(error=err, prompt_tokens=len(seq.prompt_ids)))
        while (job := self.scheduler.take_job()) is not None:
            job()  # late jobs still run: each is short, and its caller is waiting

    def _fail(self, seq: Seq, exc: Exception) -> None:
        self.scheduler.release(seq, cache=False)  # what a failed step wrote is not trusted
        self.metrics.count("finished", "error")
        _deliver(seq, Output(error=exc, prompt_tokens=len(seq.prompt_ids),
                             completion_tokens=len(seq.output_ids)))

    # ------------------------------------------------------------------ one step
    def _step(self) -> None:
        self.metrics.steps += 1
        ready, too_big = self.scheduler.decode_rows()
        for seq in too_big:
            self._finish(seq, "length")  # does not fit even alone
        work = self.scheduler.prefill_work(self.prefill_chunk)
        done = self.runner.step(ready, work) if ready or work else None
        if done is not None:  # one call of the C++ step did it all
            self._sample(*done)
        else:
            self._step_apart(ready, work)
        for seq in self.scheduler.running:
            self.scheduler.remember(seq)

    def _step_apart(self, ready: list[Seq], work: list[tuple[Seq, int]]) -> None:
        """A decode forward for the ready rows, then a prefill forward per sequence."""
        if ready:
            self._sample(ready, self.runner.decode(ready))
        for seq, n in work:
            if seq not in self.scheduler.running:
                continue  # ended while the decode rows were sampled
            logits = self.runner.prefill(seq, n)
            if seq.num_cached == seq.num_tokens:
                self._sample([seq], logits)

    def _sample(self, seqs: list[Seq], logits: torch.Tensor) -> None:
        if logits.shape[-1] > self.pickable:  # out of reach, whatever a bias adds
            logits = logits.float().clone()
            logits[:, self.pickable:] = float("-inf")
        for seq, (tok, lp) in zip(seqs, pick_tokens(seqs, logits)):
            try:
                self._on_token(seq, tok, lp)
            except GrammarError as exc:  # this sequence's grammar failed: end it alone
                log.error("request %d: %s", seq.id, exc)
                self._fail(seq, exc)

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
        hit_stop = seq.push_token(tok)
        with self.metrics.lock:
            self.metrics.completion_tokens += 1
        out = Output(token_ids=[tok], logprobs=[lp] if lp is not None else None)
        if hit_stop:
            self._finish(seq, "stop", out, flush=False)
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_seq_len:
            self._finish(seq, "length", out)
        else:
            out.text = seq.take_text()
            _deliver(seq, out)

    def _finish(self, seq: Seq, reason: str, out: Output | None = None,
                flush: bool = True) -> None:
        """End a sequence: send the rest of its text, the reason and the counts."""
        out = out or Output()
        if flush and seq.flush_text():
            reason = "stop"  # the held-back end of the text completed a stop string
        out.text = seq.take_text(final=True)
        out.finish_reason = reason
        out.prompt_tokens = len(seq.prompt_ids)
        out.completion_tokens = len(seq.output_ids)
        out.cached_tokens = seq.cached_tokens
        self.scheduler.release(seq)
        self.metrics.count("finished", reason)
        _deliver(seq, out)


def default_kv_blocks(model, kv, max_batch: int, block_size: int) -> int:
    """The pool's blocks when none are asked for: the bytes that every batch slot at up to
    2,048 tokens takes in the activations' dtype (what the pool held before quantized KV
    rows existed), filled with rows of ``kv``. So int8 rows hold ~1.9x the tokens, int4
    ~3.2x, in the same memory."""
    cfg = model.cfg
    tokens = max_batch * min(cfg.max_seq_len, 2048)
    budget = tokens * cfg.kv_cache_bytes(1, 1, model.kv_format("auto"))
    return max(1, -(-budget // (block_size * cfg.kv_cache_bytes(1, 1, kv))))


def model_key(model) -> bytes:
    """What names the model in the prefix cache's block hashes: its config, its dtype and
    a sample of its first weights."""
    first = next(iter(model.state_dict().values()))
    sample = first.detach().reshape(-1)[:256].float().cpu().numpy().tobytes()
    return repr((model.cfg, str(model.dtype))).encode() + sample


def _deliver(seq: Seq, out: Output) -> None:
    try:
        seq.sink(out)
    except Exception:  # a consumer's failure must not stop the engine
        log.exception("delivering output of request %d failed", seq.id)
