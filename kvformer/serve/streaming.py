"""A submitted request seen from the web side: its outputs as they come, as one JSON answer
or as server-sent events.

The engine thread posts each ``Output`` to the event loop's ``Mailbox``, which wakes the
loop once for everything posted until the loop gets to it (one engine step's outputs of
every stream, as a rule, rather than one wake-up per token per stream); the handler awaits
its request's outputs. A client that goes away (mid-stream, or while it waits for a plain
answer) aborts its request, which frees its blocks at the engine's next step.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable

from fastapi import Request
from fastapi.responses import StreamingResponse

from kvformer.serve.engine import Engine, Output, SamplingParams
from kvformer.serve.grammar import GrammarError
from kvformer.serve.scheduler import EngineClosedError, QueueFullError, QueueTimeoutError
from kvformer.serve.schemas import APIError

log = logging.getLogger("kvformer.serve")


def engine_error(exc: Exception, retry_after: int) -> APIError:
    if isinstance(exc, (QueueFullError, QueueTimeoutError)):
        return APIError(429, str(exc), "rate_limit_error", code="rate_limit_exceeded",
                        headers={"Retry-After": str(retry_after)})
    if isinstance(exc, EngineClosedError):
        return APIError(503, str(exc), "server_error", code="service_unavailable")
    if isinstance(exc, GrammarError):  # the request's schema or tools cannot be followed
        what = exc.param or "the grammar"
        return APIError(400, f"the answer cannot follow {what}: {exc}", param=exc.param,
                        code="invalid_value")
    log.error("request failed: %r", exc)
    return APIError(500, f"the model failed on this request: {exc}", "server_error",
                    code="internal_error")


class Mailbox:
    """Outputs on their way from the engine thread to one event loop. ``post`` (any
    thread) queues an output for its stream and wakes the loop only if no wake-up is
    pending yet; ``_drain`` (on the loop) hands everything queued to the streams, in the
    order it was posted."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: deque[tuple[RequestStream, int, Output]] = deque()
        self.lock = threading.Lock()
        self.woken = False  # a _drain is scheduled and has not started yet

    def post(self, stream: RequestStream, index: int, out: Output) -> None:
        self.items.append((stream, index, out))
        with self.lock:
            if self.woken:
                return
            self.woken = True
        try:
            self.loop.call_soon_threadsafe(self._drain)
        except BaseException:  # the loop is closed: nobody will read these
            with self.lock:
                self.woken = False
            raise

    def _drain(self) -> None:
        with self.lock:
            self.woken = False  # before taking items: a later post wakes the loop again
        items = self.items
        while items:
            stream, index, out = items.popleft()
            stream._put(index, out)


# id(loop) -> its mailbox while some stream holds it (a mailbox holds its loop, so the id
# cannot be reused meanwhile; the loop itself needs no weak reference)
_mailboxes: weakref.WeakValueDictionary[int, Mailbox] = weakref.WeakValueDictionary()


def mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    """The loop's mailbox (call it on the loop's thread)."""
    box = _mailboxes.get(id(loop))
    if box is None or box.loop is not loop:
        box = _mailboxes[id(loop)] = Mailbox(loop)
    return box


class RequestStream:
    """A submitted request of ``len(params)`` choices (one engine sequence each, on the
    same prompt): their outputs arrive, tagged with the choice's index, in one queue."""

    def __init__(self, engine: Engine, prompt_ids: list[int], params: list[SamplingParams]):
        self.engine = engine
        self.mailbox = mailbox(asyncio.get_running_loop())
        self.pending: deque[tuple[int, Output]] = deque()
        self.ready = asyncio.Event()
        self.rids: list[int] = []
        self.open = set(range(len(params)))
        self.prompt_tokens = len(prompt_ids)
        try:
            for i, p in enumerate(params):
                self.rids.append(engine.submit(prompt_ids, p, functools.partial(self._sink, i)))
        except BaseException:
            self.abort()
            raise

    def _sink(self, index: int, out: Output) -> None:  # engine thread
        self.mailbox.post(self, index, out)

    def _put(self, index: int, out: Output) -> None:
        self.pending.append((index, out))
        self.ready.set()

    @property
    def done(self) -> bool:
        return not self.open

    async def get(self) -> tuple[int, Output]:
        """The next output (a choice's index and what it made), merged with the outputs of
        the same choice right behind it."""
        while not self.pending:
            self.ready.clear()
            await self.ready.wait()
        index, out = self.pending.popleft()
        while not out.finished and self.pending and self.pending[0][0] == index:
            out.merge(self.pending.popleft()[1])
        if out.finished:
            self.open.discard(index)
        return index, out

    async def get_watching(self, request: Request) -> tuple[int, Output]:
        """``get``, but give up (and abort) when the client disconnects meanwhile."""
        task = asyncio.ensure_future(self.get())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if done:
                    return task.result()
                if await request.is_disconnected():
                    raise ClientGone()
        finally:
            if not task.done():
                task.cancel()

    def abort(self) -> None:
        for index in list(self.open):
            if index < len(self.rids):
                self.engine.abort(self.rids[index])
        self.open.clear()


class ClientGone(Exception):
    pass


async def collect(stream: RequestStream, first: tuple[int, Output], request: Request,
                  retry_after: int, n: int) -> list[Output]:
    """Every output of a non-streamed request, merged per choice (aborted if the client
    leaves)."""
    merged = [Output() for _ in range(n)]
    merged[first[0]].merge(first[1])
    try:
        while not stream.done:
            index, out = await stream.get_watching(request)
            merged[index].merge(out)
    finally:
        stream.abort()
    for out in merged:
        if out.error is not None:
            raise engine_error(out.error, retry_after)
    return merged


_dumps = json.JSONEncoder(ensure_ascii=False).encode  # json.dumps(x, ensure_ascii=False)
json_str = json.encoder.encode_basestring  # a str as _dumps writes it


class ChunkJSON:
    """The JSON text of a stream chunk ``dict(head, choices=[choice])``, followed by
    ``"usage": None`` when ``usage_null``, exactly as ``json.dumps(chunk,
    ensure_ascii=False)`` writes it, from the choice's JSON text: the head is written once
    per request, not once per chunk."""

    def __init__(self, head: dict, usage_null: bool):
        if not head or {"choices", "usage"} & head.keys():
            raise ValueError("head must be non-empty, without choices or usage")
        self.prefix = _dumps(head)[:-1] + ', "choices": ['
        self.suffix = '], "usage": null}' if usage_null else ']}'

    def __call__(self, choice: dict | str) -> str:
        """``choice``: a dict, or its JSON text as ``json.dumps`` writes it."""
        return self.prefix + (choice if choice.__class__ is str else _dumps(choice)) \
            + self.suffix


def sse_response(stream: RequestStream, first: tuple[int, Output],
                 chunks: Callable[[int, Output, bool], list[dict | str]], *,
                 named: bool = False,
                 error_body: Callable[[APIError], dict] = APIError.body) -> StreamingResponse:
    """Server-sent events: ``chunks(index, output, last)`` gives the JSON chunks for each
    output (``last``: every choice has finished), each a dict or its JSON text as
    ``json.dumps(chunk, ensure_ascii=False)`` writes it, then ``data: [DONE]``. The events
    of every output already queued go out in one write. ``named``: each chunk is a dict
    whose ``type`` names its event (``event: <type>``), and no ``[DONE]`` follows (the
    Responses and Anthropic streams); an error is ``error_body(error)``."""
    async def events() -> AsyncIterator[str]:
        index, out = first
        parts: list[str] = []
        try:
            while True:
                if out.error is not None:
                    err = error_body(engine_error(out.error, 1))
                    parts.append(f"event: error\ndata: {json.dumps(err)}\n\n" if named
                                 else f"data: {json.dumps(err)}\n\n")
                    break
                try:
                    for chunk in chunks(index, out, stream.done):
                        if named:
                            parts.append(f"event: {chunk['type']}\ndata: {_dumps(chunk)}\n\n")
                        else:
                            parts.append(
                                f"data: {chunk if chunk.__class__ is str else _dumps(chunk)}\n\n")
                except Exception:
                    if parts:  # the events before the failure go out, as one by one
                        yield "".join(parts)
                    raise
                if stream.done:
                    break
                if parts and not stream.pending:
                    yield "".join(parts)
                    parts.clear()
                index, out = await stream.get()
            if not named:
                parts.append("data: [DONE]\n\n")
            yield "".join(parts)
        finally:
            stream.abort()  # a client that went away frees its blocks here

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
