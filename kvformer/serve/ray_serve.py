"""Several ``kvformer serve`` engines behind one endpoint, on Ray Serve (the ``cluster``
extra: ``pip install 'kvformer[cluster]'``).

Two deployments make the application:

* ``KvformerEngine`` (N replicas): each loads the model and runs the whole single-server
  app (the same routes, validation, streaming and prefix cache) on a loopback port of its
  own machine; a request reaches it as (method, path, headers, body) and comes back as a
  stream of (head, body bytes...) items.
* ``KvformerIngress`` (one replica, no CPU reserved): the HTTP endpoint. It computes a
  routing key from each generation request's prompt (the first ``prefix_chars`` characters
  of its messages/prompt/input, as JSON) and hands the request to the engines through a
  deployment handle whose request router is ``PrefixRouter``: rendezvous hashing of the key
  over the running replicas, so that requests that share a prefix go to the replica that
  has it cached, falling back to the least loaded replica when that one is full or far
  busier than another. Requests without a key (GET, /tokenize...) go to the least loaded.

A replica that dies is replaced by Ray Serve; a request whose replica dies before its first
byte is retried on another replica; one that dies mid-stream ends with an error event (a
stream) or a 503 (a plain response). Every response names the replica that served it in
``x-kvformer-replica``. ``/health`` answers for the whole deployment (200 while at least one
engine replica runs), ``/metrics`` sums the counters of every replica.

Run it with ``kvformer serve --replicas N`` (a local Ray instance, or the cluster that
``RAY_ADDRESS`` names), or on a Ray cluster with ``serve run`` and :func:`app_builder`.
"""


import asyncio
import hashlib
import json
import random
import time

import httpx
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.request_router import FIFOMixin, RequestRouter

from kvformer.formats.load import load
from kvformer.serve.app import BackgroundServer, create_app
from kvformer.serve.engine import Engine

ENGINE = "KvformerEngine"
REPLICA_HEADER = "x-kvformer-replica"
PREFIX_FIELDS = ("system", "messages", "prompt", "input")
HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "date",
               "server"}  # the Host header goes on: a replica checks it as one server does


def prefix_key(body: bytes, prefix_chars: int) -> str | None:
    """The routing key of a request body: a digest of the first ``prefix_chars`` characters
    of its prompt fields as JSON (None for a body that is not a JSON object with one, and
    for every body when ``prefix_chars`` is 0: routing by load alone)."""
    if prefix_chars <= 0:
        return None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    text = "".join(json.dumps(doc[f], ensure_ascii=False, sort_keys=True)
                   for f in PREFIX_FIELDS if f in doc)
    if not text:
        return None
    return hashlib.sha1(text[:prefix_chars].encode("utf-8", "replace")).hexdigest()


def rendezvous(key: str, names: list[str]) -> list[str]:
    """``names`` ordered by their rendezvous (highest random weight) score for ``key``:
    each key prefers one name, and losing a name moves only the keys that preferred it."""
    def score(name: str) -> bytes:
        return hashlib.sha1(f"{key}\0{name}".encode()).digest()

    return sorted(names, key=score, reverse=True)


class PrefixRouter(FIFOMixin, RequestRouter):
    """Ray Serve request router: the replica a request's prefix key hashes to first (see
    :func:`rendezvous`), the others after it by queue length; without a key, by queue
    length (replicas named in ``avoid`` last). The preferred replica yields to the least
    loaded one when its queue is longer by more than ``IMBALANCE`` requests; Ray Serve
    itself passes over a full replica (max_ongoing_requests reached) to the next rank."""

    IMBALANCE = 16

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        if not candidate_replicas:
            return []
        cache = self.replica_queue_len_cache

        def load(r) -> int:
            n = cache.get(r.replica_id)
            return 0 if n is None else n

        kwargs = pending_request.kwargs if pending_request is not None else {}
        avoid = set(kwargs.get("avoid") or ())
        by_load = sorted(candidate_replicas, key=lambda r: (
            r.replica_id.unique_id in avoid, load(r), random.random()))
        key = kwargs.get("key")
        if key is None:
            return [[r] for r in by_load]
        named = {r.replica_id.unique_id: r for r in candidate_replicas}
        first = named[rendezvous(key, list(named))[0]]
        if load(first) > load(by_load[0]) + self.IMBALANCE:
            first = by_load[0]
        return [[first], *[[r] for r in by_load if r is not first]]


@serve.deployment(name=ENGINE, health_check_period_s=2, health_check_timeout_s=20,
                  graceful_shutdown_timeout_s=5)
class KvformerEngine:
    """One engine: the model and the single-server app on a loopback port."""

    def __init__(self, model: str, options: dict):
        threads = options.get("threads")
        if threads:
            torch.set_num_threads(threads)
        m, tokenizer = load(model, dtype=options.get("dtype"),
                            kv_dtype=options.get("kv_dtype") or "auto", progress=False)
        if tokenizer is None:
            raise ValueError(f"{model}: no tokenizer found beside the model; serving needs "
                             "tokenizer.json or a GGUF with a vocabulary")
        engine = Engine(m, tokenizer, **options.get("engine", {}))
        app = create_app(engine, options.get("name") or model,
                         api_key=options.get("api_key"),
                         max_body_bytes=options.get("max_body_bytes", 1 << 20),
                         cors_origins=options.get("cors_origins", ()),
                         allowed_hosts=options.get("allowed_hosts"))
        self.server = BackgroundServer(app).start()
        self.client = httpx.AsyncClient(base_url=self.server.url, timeout=None,
                                        limits=httpx.Limits(max_connections=None))
        self.replica = serve.get_replica_context().replica_id.unique_id

    async def call(self, method: str, path: str, headers: list, body: bytes, key=None,
                   avoid=()):
        """The request answered by this replica's app: the head (status, headers, this
        replica's id), then the body's bytes as they come."""
        request = self.client.build_request(method, path, headers=headers, content=body)
        resp = await self.client.send(request, stream=True)
        try:
            yield {"status": resp.status_code, "replica": self.replica,
                   "headers": [(k, v) for k, v in resp.headers.items()
                                           if k.lower() not in HOP_HEADERS]}
            async for chunk in resp.aiter_raw():
                yield chunk
        finally:
            await resp.aclose()

    def check_health(self) -> None:
        if not self.server.thread.is_alive():
            raise RuntimeError("the replica's HTTP server stopped")


AVERAGED = ("_rate", "_block_size", "_bytes_per_token")  # not summed over replicas


def sum_metrics(texts: list[str]) -> str:
    """Prometheus text of several replicas, sample by sample: counters, gauges and
    histogram buckets summed; ratios and per-token sizes (``AVERAGED``) averaged. The
    HELP/TYPE lines of the first replica kept."""
    order: list[str] = []
    values: dict[str, list[float]] = {}
    for text in texts:
        for line in text.splitlines():
            if not line or line.startswith("#"):
                if line not in order:
                    order.append(line)
                continue
            name, _, value = line.rpartition(" ")
            try:
                number = float(value)
            except ValueError:
                continue
            if name not in values:
                order.append(name)
                values[name] = []
            values[name].append(number)
    out = []
    for item in order:
        if item not in values:
            out.append(item)
            continue
        v = values[item]
        total = sum(v) / len(v) if item.split("{")[0].endswith(AVERAGED) else sum(v)
        out.append(f"{item} {int(total) if total == int(total) else total}")
    return "\n".join(out) + "\n"


def _error(status: int, message: str, code: str) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "server_error",
                                   "param": None, "code": code}}, status_code=status)


ingress_app = FastAPI(title="kvformer (Ray Serve replicas)", openapi_url=None,
                      docs_url=None, redoc_url=None)


@serve.deployment(name="KvformerIngress", ray_actor_options={"num_cpus": 0},
                  max_ongoing_requests=4096)
@serve.ingress(ingress_app)
class KvformerIngress:
    """The endpoint: routes by prompt prefix, retries a request whose replica died before
    answering, aggregates /health and /metrics."""

    RETRIES = 8

    def __init__(self, engine, prefix_chars: int = 512):
        self.engine = engine.options(stream=True)
        self.prefix_chars = prefix_chars

    async def _head(self, method, path, headers, body, key):
        """The first item of a replica's answer, retrying on another replica while the
        chosen one dies first: (head, the stream)."""
        error = None
        for attempt in range(self.RETRIES):
            stream = self.engine.call.remote(method, path, headers, body, key=key)
            try:
                return await stream.__anext__(), stream
            except Exception as exc:  # a replica lost (ActorDiedError and kin)
                error = exc
                await asyncio.sleep(min(0.25 * 2 ** attempt, 2.0))
        raise RuntimeError(f"no replica answered: {type(error).__name__}: {error}")

    @ingress_app.get("/health")
    async def health(self):
        status = serve.status().applications
        running = sum(d.replica_states.get("RUNNING", 0)
                      for app in status.values() for name, d in app.deployments.items()
                      if name == ENGINE)
        body = {"status": "ok" if running else "unavailable", "replicas": running}
        return JSONResponse(body, status_code=200 if running else 503)

    @ingress_app.get("/metrics")
    async def metrics(self):
        # ask each running replica once: every call names those that answered already
        status = serve.status().applications
        want = sum(d.replica_states.get("RUNNING", 0)
                   for app in status.values() for name, d in app.deployments.items()
                   if name == ENGINE)
        texts: dict[str, str] = {}
        deadline = time.monotonic() + 5
        while len(texts) < want and time.monotonic() < deadline:
            call = self.engine.call.remote("GET", "/metrics", [], b"", avoid=list(texts))
            async for item in call:
                if isinstance(item, dict):
                    replica, chunks = item["replica"], []
                else:
                    chunks.append(item)
            texts[replica] = b"".join(chunks).decode()
        return Response(sum_metrics(list(texts.values())),
                        media_type="text/plain; version=0.0.4")

    @ingress_app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH",
                                                    "OPTIONS", "HEAD"])
    async def forward(self, path: str, request: Request):
        body = await request.body()
        key = prefix_key(body, self.prefix_chars) if request.method == "POST" else None
        target = "/" + path + (f"?{request.url.query}" if request.url.query else "")
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
        try:
            head, stream = await self._head(request.method, target, headers, body, key)
        except RuntimeError as exc:
            return _error(503, str(exc), "service_unavailable")
        resp_headers = dict(head["headers"])
        resp_headers[REPLICA_HEADER] = head["replica"]
        media = resp_headers.pop("content-type", None)
        if not media or not media.startswith("text/event-stream"):
            chunks = []
            try:
                async for chunk in stream:
                    chunks.append(chunk)
            except Exception as exc:
                return _error(503, f"replica {head['replica']} was lost while answering "
                                   f"({type(exc).__name__}); retry the request",
                              "service_unavailable")
            return Response(b"".join(chunks), status_code=head["status"],
                            headers=resp_headers, media_type=media)

        async def relay():
            try:
                async for chunk in stream:
                    yield chunk
            except Exception as exc:
                error = {"error": {"message": f"replica {head['replica']} was lost while "
                                              f"streaming ({type(exc).__name__})",
                                   "type": "server_error", "code": "replica_lost"}}
                yield f"data: {json.dumps(error)}\n\n".encode()

        return StreamingResponse(relay(), status_code=head["status"], headers=resp_headers,
                                 media_type=media)


def build_app(model: str = "default", replicas: int = 2, threads: int | None = None,
              prefix_chars: int = 512, name: str | None = None, dtype: str | None = None,
              kv_dtype: str | None = None, max_ongoing_requests: int = 64,
              engine: dict | None = None, server: dict | None = None):
    """The Ray Serve application: ``replicas`` engines of ``model`` behind the prefix-aware
    ingress (the numbers may come as strings: see :func:`app_builder`)."""
    from ray.serve.config import RequestRouterConfig

    replicas, prefix_chars = int(replicas), int(prefix_chars)
    threads = int(threads) if threads else None
    options = {"threads": threads, "name": name or model, "dtype": dtype,
               "kv_dtype": kv_dtype, "engine": engine or {}, **(server or {})}
    engines = KvformerEngine.options(
        num_replicas=replicas, max_ongoing_requests=int(max_ongoing_requests),
        ray_actor_options={"num_cpus": threads or 1},
        request_router_config=RequestRouterConfig(request_router_class=PrefixRouter),
    ).bind(model, options)
    return KvformerIngress.bind(engines, prefix_chars)


def app_builder(args: dict):
    """The ``serve run`` target: ``serve run kvformer.serve.ray_serve:app_builder
    model=PATH replicas=4 threads=2 prefix_chars=512`` (Ray passes the key=value pairs as a
    dict of strings)."""
    known = {"model", "replicas", "threads", "prefix_chars", "name", "dtype", "kv_dtype",
             "max_ongoing_requests"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise ValueError(f"unknown argument(s) {', '.join(unknown)}; known: "
                         f"{', '.join(sorted(known))}")
    return build_app(**args)
