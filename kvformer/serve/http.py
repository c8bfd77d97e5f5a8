"""Running the app: the listening socket, uvicorn in a thread (tests, benchmarks), the
middleware that counts responses for /metrics, the gate (JSON only; 503 while draining),
the bounds on connections (a header-read timeout, a cap on open connections, the open-file
limit) and the graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import errno
import json
import socket
import sys
import threading
import time
from functools import lru_cache

from fastapi import FastAPI
from fastapi.responses import JSONResponse

ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics",
          "/tokenize", "/detokenize", "/", "/status", "/v1/embeddings", "/v1/responses",
          "/v1/messages")


class CountRequests:
    """ASGI middleware counting responses by path and status (for /metrics)."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            path = scope.get("path", "")
            self.metrics.count_http(path if path in ROUTES else "other", status[0])


class Gate:
    """What is let in: while the server drains (a SIGTERM or Ctrl-C came), new generation
    requests get 503 with Retry-After and /health says so; every POST must be JSON (415
    otherwise: a web page can then not drive a key-less local server with a plain
    cross-site form or `text/plain` fetch, which would skip the CORS preflight). With
    ``allowed_hosts``, a request whose Host header names another host gets 403: a web page
    whose DNS name is rebound to 127.0.0.1 then cannot drive a key-less local server (its
    requests carry its own name). Counts the requests in flight, so that a drain knows when
    every response has been written."""

    def __init__(self, retry_after: int = 5, allowed_hosts=None):
        self.draining = False
        self.inflight = 0
        self.retry_after = retry_after
        self.allowed_hosts = (None if allowed_hosts is None
                              else frozenset(h.lower().strip("[]") for h in allowed_hosts))

    def middleware(self, app):
        async def gate(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            method, path = scope.get("method", ""), scope.get("path", "")
            refusal = None
            host = _host_of(scope) if self.allowed_hosts is not None else None
            if host is not None and host not in self.allowed_hosts:
                refusal = _error(403, f"this server does not answer for host {host!r}: start "
                                      "it with --api-key, or name the host with "
                                      "--allowed-host", "invalid_request_error",
                                 "host_not_allowed")
            elif self.draining and path == "/health":
                refusal = JSONResponse({"status": "draining"}, status_code=503,
                                       headers={"Retry-After": str(self.retry_after)})
            elif self.draining and method == "POST":
                refusal = _error(503, "the server is shutting down: retry later or elsewhere",
                                 "server_error", "service_unavailable",
                                 {"Retry-After": str(self.retry_after)})
            elif method == "POST" and not _is_json(scope):
                refusal = _error(415, "the request body must be JSON: send 'Content-Type: "
                                      "application/json'", "invalid_request_error",
                                 "unsupported_media_type")
            if refusal is not None:
                return await refusal(scope, receive, send)
            self.inflight += 1
            try:
                await app(scope, receive, send)
            finally:
                self.inflight -= 1

        return gate


# the names of this machine that every server answers for
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def _host_of(scope) -> str | None:
    """The host name of a request's Host header, lower case, without port or brackets
    (None without the header: not a browser's request)."""
    for key, value in scope.get("headers", ()):
        if key == b"host":
            host = value.decode("latin-1").strip().lower()
            if host.startswith("["):  # [::1]:8000
                return host[1:host.find("]")] if "]" in host else host[1:]
            return host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return None


def _is_json(scope) -> bool:
    for name, value in scope.get("headers", ()):
        if name == b"content-type":
            mime = value.split(b";")[0].strip().lower()
            return mime == b"application/json" or mime.endswith(b"+json")
    return False


def _error(status: int, message: str, kind: str, code: str, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None,
                                   "code": code}}, status_code=status, headers=headers)


async def drain(app, grace: float, say=None) -> None:
    """Shut down gently: refuse new requests (``Gate``), let the streams in progress finish
    for up to ``grace`` seconds, then end the rest (each gets an error event and
    ``[DONE]``), and wait until every response has been written."""
    gate, engine = app.state.gate, app.state.engine
    gate.draining = True
    busy = engine.num_running + engine.num_waiting
    if say and busy:
        say(f"shutting down: waiting up to {grace:g} s for {busy} request(s) to finish "
            "(press Ctrl-C again to stop now)")
    deadline = time.monotonic() + grace
    while engine.num_running + engine.num_waiting and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    left = engine.num_running + engine.num_waiting
    if left:
        if say:
            say(f"shutting down: {left} request(s) still running after {grace:g} s; "
                "ending them")
        await asyncio.get_running_loop().run_in_executor(None, engine.stop)
    deadline = time.monotonic() + 5
    while gate.inflight and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------- connections
#: Seconds a client has to send a request's headers, from the connection or the end of the
#: previous response on a kept-alive one (a slowloris client sends a byte now and then).
HEADER_TIMEOUT = 15.0
#: Seconds a kept-alive connection may stay idle between requests.
KEEP_ALIVE_TIMEOUT = 5.0
#: Open connections served at once; one more gets 503 and is closed at once.
MAX_CONNECTIONS = 1000
# file descriptors kept for everything but connections (model files, pipes, logs)
_SPARE_FILES = 64


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit (a shell's default
    soft limit, often 1,024, would otherwise cap the connections); returns the limit now."""
    try:
        import resource
    except ImportError:  # Windows
        return 1 << 16
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
    if soft == resource.RLIM_INFINITY or soft >= want:
        return soft if soft != resource.RLIM_INFINITY else 1 << 30
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        return want
    except (ValueError, OSError):  # e.g. macOS refuses more than OPEN_MAX
        return soft


def connection_cap(wanted: int, open_files: int) -> int:
    """The connections served at once: ``wanted``, but never so many that accepting them
    would run out of file descriptors."""
    return max(1, min(wanted, open_files - _SPARE_FILES))


_BUSY = json.dumps({"error": {
    "message": "the server has too many open connections: retry later",
    "type": "server_error", "param": None, "code": "service_unavailable"}}).encode()
_BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
                  b"retry-after: 1\r\nconnection: close\r\ncontent-length: "
                  + str(len(_BUSY)).encode() + b"\r\n\r\n" + _BUSY)


def bounded_protocol(base: type, header_timeout: float, max_connections: int) -> type:
    """uvicorn's HTTP protocol class ``base``, with two bounds it lacks: a connection
    beyond ``max_connections`` gets 503 and is closed at once (freeing its descriptor), and
    one that has not sent a request's headers ``header_timeout`` seconds after it opened or
    after its previous response is closed (uvicorn's keep-alive timer is reset by every
    byte, so a client sending one byte at a time would keep it forever)."""

    class Bounded(base):
        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._kvf_cycle, self._kvf_timer = None, None
            if len(self.connections) > max_connections:
                transport.write(_BUSY_RESPONSE)
                transport.close()
                return
            self._kvf_arm()

        def _kvf_arm(self) -> None:
            if self._kvf_timer is not None:
                self._kvf_timer.cancel()
            self._kvf_timer = self.loop.call_later(header_timeout, self._kvf_expire)

        def _kvf_disarm(self) -> None:
            if self._kvf_timer is not None:
                self._kvf_timer.cancel()
                self._kvf_timer = None

        def _kvf_expire(self) -> None:
            self._kvf_timer = None
            cycle = self.cycle
            if cycle is not None and cycle is not self._kvf_cycle:  # its headers came
                self._kvf_cycle = cycle
            elif (cycle is None or cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.cycle is not None and self.cycle is not self._kvf_cycle:
                self._kvf_cycle = self.cycle  # a request's headers have all come
                self._kvf_disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or
                                                    self.cycle is self._kvf_cycle):
                self._kvf_arm()  # the next request's headers are due in time too

        def connection_lost(self, exc) -> None:
            self._kvf_disarm()
            super().connection_lost(exc)

    Bounded.__name__ = Bounded.__qualname__ = f"Bounded{base.__name__}"
    return Bounded


def server_config(app, *, log_level: str = "info", access_log: bool = True,
                  header_timeout: float = HEADER_TIMEOUT,
                  keep_alive_timeout: float = KEEP_ALIVE_TIMEOUT,
                  max_connections: int = MAX_CONNECTIONS):
    """uvicorn's Config for the app, with the connection bounds above."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    # h11 and asyncio's own loop always, not whatever uvicorn finds installed (httptools and
    # uvloop come with some packages, ray[serve] among them): the bounds above are written
    # and tested against these
    return uvicorn.Config(app, log_level=log_level, access_log=access_log,
                          timeout_graceful_shutdown=5, timeout_keep_alive=keep_alive_timeout,
                          loop="asyncio",
                          http=bounded_protocol(H11Protocol, header_timeout, max_connections))


class _QuietAboutResources:
    """An event loop exception handler that says "out of file descriptors" in one line at
    most every 10 s, not a traceback per failed accept (a flood of them filled 43 MB of log
    in 15 s); everything else goes to the default handler."""

    def __init__(self):
        self.last = 0.0

    def __call__(self, loop, context) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in (errno.EMFILE, errno.ENFILE,
                                                      errno.ENOBUFS, errno.ENOMEM):
            now = time.monotonic()
            if now - self.last >= 10:
                self.last = now
                print(f"kvformer serve: warning: {context.get('message', 'out of resources')} "
                      f"({exc.strerror}); lower --max-connections or raise the open-file "
                      "limit (ulimit -n)", file=sys.stderr, flush=True)
            return
        loop.default_exception_handler(context)


@lru_cache(maxsize=1)
def quiet_server_class():
    """uvicorn's Server, with ``_QuietAboutResources`` on its event loop."""
    import uvicorn

    class QuietServer(uvicorn.Server):
        async def serve(self, sockets=None):
            asyncio.get_running_loop().set_exception_handler(_QuietAboutResources())
            await super().serve(sockets)

    return QuietServer


@lru_cache(maxsize=1)
def draining_server_class():
    """uvicorn's Server, but the first SIGTERM/SIGINT drains (``drain``) before it exits, and
    the process then exits 0; a second one stops at once."""
    class DrainingServer(quiet_server_class()):
        def __init__(self, config, grace: float = 30.0, say=None):
            super().__init__(config)
            self.grace, self.say = grace, say
            self.loop: asyncio.AbstractEventLoop | None = None
            self.draining = False

        async def serve(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame) -> None:
            if self.draining or self.loop is None or not self.started:
                self.should_exit = True
                self.force_exit = self.draining
                return
            self.draining = True
            self.loop.call_soon_threadsafe(self._start_drain)

        def _start_drain(self) -> None:
            async def run():
                try:
                    await drain(self.config.app, self.grace, self.say)
                finally:
                    self.should_exit = True

            self._drain_task = asyncio.ensure_future(run())

    return DrainingServer


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (IPv4 or IPv6); OSError with a readable message if taken.
    Made with the protocol named (IPPROTO_TCP, not 0): asyncio sets TCP_NODELAY only on
    connections accepted from such a socket, and without it every request after the first
    on a kept-alive connection waited ~40 ms for the client's delayed ACK."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(2048)
    return sock


class BackgroundServer:
    """uvicorn serving an app from a thread, on a free port by default (tests, benchmarks)."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0,
                 log_level: str = "warning", **bounds):
        self.sock = bind_socket(host, port)
        self.host, self.port = host, self.sock.getsockname()[1]
        config = server_config(app, log_level=log_level, access_log=False, **bounds)
        self.server = quiet_server_class()(config)
        self.thread = threading.Thread(target=self.server.run,
                                       kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
