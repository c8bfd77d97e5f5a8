"""Who runs next: the waiting queue, the running batch, admission, preemption, expiry.

The web handlers add requests (``add``) and ask to drop them (``abort``) from their own
threads; everything else runs on the engine thread. ``cond`` guards the waiting queue and
the aborts, and wakes the engine thread when there is work.

Admission takes the oldest waiting sequence while fewer than ``max_batch`` run and the
pool has blocks for its whole prompt, keeping one spare block per running sequence so
that they can grow. A decode row that needs a block when none is free preempts the most
recently admitted sequence: its blocks are freed and it goes back to the front of the
queue, to be recomputed when room returns.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from kvformer.errors import KvformerError
from kvformer.kv.paged import BlockPool, OutOfBlocksError
from kvformer.serve.metrics import Metrics
from kvformer.serve.sequence import Seq

MAX_JOBS = 8192  # jobs (embedding inputs) waiting for the engine thread


class QueueFullError(KvformerError):
    """The waiting queue is full: try again later."""


class QueueTimeoutError(KvformerError):
    """The request waited too long for a free slot or free KV blocks."""


class EngineClosedError(KvformerError):
    """The engine has stopped."""


class Scheduler:
    def __init__(self, pool: BlockPool, metrics: Metrics, max_batch: int, max_queue: int,
                 queue_timeout: float):
        self.pool, self.metrics = pool, metrics
        self.max_batch, self.max_queue, self.queue_timeout = max_batch, max_queue, queue_timeout
        self.cond = threading.Condition()
        self.waiting: deque[Seq] = deque()  # guarded by cond
        self.aborts: set[int] = set()  # guarded by cond
        self.stopping = False  # guarded by cond
        self.jobs: deque[Callable[[], None]] = deque()  # guarded by cond
        self.running: list[Seq] = []  # engine thread only

    # ------------------------------------------------------------------ any thread
    def add(self, seq: Seq) -> None:
        with self.cond:
            if self.stopping:
                raise EngineClosedError("the engine is shutting down")
            if len(self.waiting) >= self.max_queue:
                self.metrics.count("rejected", "queue_full")
                raise QueueFullError(f"the server is busy: {len(self.waiting)} requests are "
                                     "already waiting; retry later")
            self.waiting.append(seq)
            self.cond.notify_all()

    def add_job(self, job: Callable[[], None]) -> None:
        """Torch work that is not a sequence (an embedding), for the engine thread."""
        with self.cond:
            if self.stopping:
                raise EngineClosedError("the engine is shutting down")
            if len(self.jobs) >= MAX_JOBS:
                raise QueueFullError(f"the server is busy: {len(self.jobs)} embeddings are "
                                     "already waiting; retry later")
            self.jobs.append(job)
            self.cond.notify_all()

    def take_job(self) -> Callable[[], None] | None:
        """The oldest job (one per step, so that the running sequences keep going)."""
        with self.cond:
            return self.jobs.popleft() if self.jobs else None

    def abort(self, rid: int) -> None:
        with self.cond:
            self.aborts.add(rid)
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    # ------------------------------------------------------------------ the engine thread
    def wait_for_work(self) -> tuple[bool, set[int]]:
        """Block until there is something to do; (stopping, the aborts taken in)."""
        with self.cond:
            if not (self.running or self.waiting or self.aborts or self.jobs
                    or self.stopping):
                self.cond.wait()
            aborts, self.aborts = self.aborts, set()
            return self.stopping, aborts

    def idle_wait(self, seconds: float = 0.02) -> None:
        """Nothing admissible yet: wait a moment (or until woken)."""
        with self.cond:
            self.cond.wait(seconds)

    def drop(self, aborts: set[int]) -> tuple[int, list[Seq]]:
        """Remove aborted sequences: (how many were waiting, the running ones released)."""
        if not aborts:
            return 0, []
        with self.cond:
            kept = [s for s in self.waiting if s.id not in aborts]
            dropped = len(self.waiting) - len(kept)
            if dropped:
                self.waiting = deque(kept)
        gone = [s for s in self.running if s.id in aborts]
        for seq in gone:
            self.release(seq)
        return dropped, gone

    def expire(self) -> list[Seq]:
        """Take out the never-admitted sequences that waited longer than queue_timeout."""
        now = time.monotonic()
        with self.cond:
            late = [s for s in self.waiting
                    if not s.started and now - s.arrival > self.queue_timeout]
            if late:
                self.waiting = deque(s for s in self.waiting if s not in late)
        return late

    def take_waiting(self) -> list[Seq]:
        """Empty the queue (at shutdown)."""
        with self.cond:
            pending, self.waiting = list(self.waiting), deque()
        return pending

    def admit(self) -> None:
        pool = self.pool
        while len(self.running) < self.max_batch:
            with self.cond:
                if not self.waiting:
                    return
                seq = self.waiting[0]
                # reuse the longest cached prefix; at least the last token is computed
                match = pool.match(seq.all_tokens(), seq.num_tokens - 1)
                need = pool.cost(match, seq.num_tokens)
                spare = len(self.running)  # one block of room for each running sequence
                if pool.num_free < need + spare and self.running:
                    return
                if pool.num_free < need:
                    return
                self.waiting.popleft()
            seq.blocks = pool.acquire(match, seq.num_tokens)
            seq.num_cached = match.num_tokens
            seq.block_hashes = list(match.hashes)
            if not seq.started:
                seq.cached_tokens = match.num_tokens
                with self.metrics.lock:
                    self.metrics.prefix_queried += len(seq.prompt_ids)
                    self.metrics.prefix_hits += match.num_tokens
            seq.started = True
            self.running.append(seq)

    def remember(self, seq: Seq) -> None:
        """Cache the blocks the sequence has filled since the last call."""
        if (len(seq.block_hashes) + 1) * self.pool.block_size <= seq.num_cached:
            self.pool.remember_full(seq.blocks, seq.all_tokens(), seq.num_cached,
                                    seq.block_hashes)

    def release(self, seq: Seq, cache: bool = True) -> None:
        """Take the sequence out of the batch and give its blocks back (keeping what they
        hold in the prefix cache, unless ``cache`` is False: a failed step)."""
        if seq in self.running:
            self.running.remove(seq)
        if seq.blocks:
            if cache:
                self.remember(seq)
                self.pool.remember_partial(seq.blocks, seq.all_tokens(), seq.num_cached,
                                           seq.block_hashes)
            self.pool.free(seq.blocks)
            seq.blocks = []

    def preempt(self, seq: Seq) -> None:
        self.release(seq)
        seq.num_cached = 0
        self.metrics.preemptions += 1
        with self.cond:
            self.waiting.appendleft(seq)

    def decode_rows(self) -> tuple[list[Seq], list[Seq]]:
        """The sequences with exactly one token not yet cached, each given room for it,
        oldest first, preempting the newest when blocks run out: (ready, too_big), where
        ``too_big`` could not get a block even alone (the caller ends them)."""
        ready: list[Seq] = []
        too_big: list[Seq] = []
        for seq in [s for s in self.running if s.num_tokens - s.num_cached == 1]:
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
                        too_big.append(seq)
                        break
                    self.preempt(victim)
                    if victim is seq:
                        break
        return ready, too_big

    def prefill_work(self, budget: int) -> list[tuple[Seq, int]]:
        """(sequence, how many of its prompt tokens) to prefill this step, at most
        ``budget`` tokens in all, oldest first."""
        work = []
        for seq in [s for s in self.running if s.num_tokens - s.num_cached > 1]:
            if budget <= 0:
                break
            n = min(budget, seq.num_tokens - seq.num_cached)
            budget -= n
            work.append((seq, n))
        return work
