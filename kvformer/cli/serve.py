"""The ``kvformer serve`` verb."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from kvformer.cli.arguments import add_model_arguments, apply_activations, physical_cores
from kvformer.errors import ArgumentParser, KvformerError


def register(subparsers) -> argparse.ArgumentParser:
    """Add the ``serve`` verb to the ``kvformer`` command's subparsers."""
    p = subparsers.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (continuous batching, paged KV cache)",
        description="Serve a model over an OpenAI-compatible HTTP API: /v1/models, "
                    "/v1/completions, /v1/chat/completions, /health, /metrics.")
    add_model_arguments(p)
    p.add_argument("--served-model-name", default=None,
                   help="the model id clients send (default: the --model argument)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("KVFORMER_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $KVFORMER_API_KEY)")
    p.add_argument("--max-batch", type=int, default=16,
                   help="sequences decoded together in one step (default 16)")
    p.add_argument("--kv-blocks", type=int, default=None,
                   help="KV cache blocks in the pool (default: max-batch x min(context, "
                        "2048) tokens' worth)")
    p.add_argument("--block-size", type=int, default=16, help="token slots per KV block")
    p.add_argument("--prefill-chunk", type=int, default=128,
                   help="prompt tokens prefilled per engine step (default 128)")
    p.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false",
                   help="recompute every prompt in full (default: reuse the KV blocks of "
                        "prompt prefixes seen before)")
    p.add_argument("--max-queue", type=int, default=64,
                   help="requests that may wait for a slot; more get 429 (default 64)")
    p.add_argument("--queue-timeout", type=float, default=30.0,
                   help="seconds a request may wait before it gets 429 (default 30)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body accepted; larger gets 413 (default 1 MiB)")
    p.add_argument("--shutdown-grace", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM or Ctrl-C, refuse new requests (503) and let the ones "
                        "in progress finish for up to this long, then end them (default 30)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:5173; '*' for "
                        "any) call the API from a browser; repeatable (default: none)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)
    return p


def _check(args) -> None:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a TCP port (0-65535)")
    for name in ("max_batch", "block_size", "prefill_chunk", "max_body_bytes"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.kv_blocks is not None and args.kv_blocks < 1:
        raise ValueError("--kv-blocks must be >= 1")
    if args.max_queue < 0:
        raise ValueError("--max-queue must be >= 0")
    if not args.queue_timeout > 0:
        raise ValueError("--queue-timeout must be > 0 seconds")
    if args.api_key is not None and not args.api_key.strip():
        raise ValueError("--api-key is empty")
    if not args.shutdown_grace >= 0:
        raise ValueError("--shutdown-grace must be >= 0 seconds")
    for origin in args.cors_origin:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ValueError(f"--cors-origin {origin!r} is not an origin such as "
                             "http://localhost:5173 (scheme://host[:port]) or '*'")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def cmd_serve(args) -> int:
    _check(args)
    try:
        import uvicorn
    except ImportError:
        raise KvformerError("kvformer serve needs FastAPI and uvicorn: "
                            "pip install 'kvformer[serve]'") from None
    import torch

    from kvformer.formats.load import load
    from kvformer.serve.app import bind_socket, create_app
    from kvformer.serve.engine import Engine
    from kvformer.serve.http import draining_server_class

    torch.set_num_threads(args.threads or physical_cores())  # -t/--threads, as every verb
    sock = bind_socket(args.host, args.port)  # fail fast (port taken) before loading
    try:
        # Load on one torch thread: the model then runs on the engine's thread, and once
        # this (main) thread has run a multi-threaded op, its OpenMP team stays and the
        # engine thread's team competes with it: decode measured ~2x slower (77 vs 203
        # tokens/s, SmolLM2 int4, 2 cores). The load itself takes as long either way.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model, tokenizer = load(args.model, dtype=args.dtype, kv_dtype=args.kv_dtype)
        finally:
            torch.set_num_threads(threads)
        apply_activations(args)  # after the load, which builds the kernels if need be
        if tokenizer is None:
            raise KvformerError(f"{args.model}: no tokenizer found beside the model; "
                                "serving needs tokenizer.json or a GGUF with a vocabulary")
        engine = Engine(model, tokenizer, max_batch=args.max_batch, kv_blocks=args.kv_blocks,
                        block_size=args.block_size, prefill_chunk=args.prefill_chunk,
                        max_queue=args.max_queue, queue_timeout=args.queue_timeout,
                        prefix_caching=args.prefix_cache)
        name = args.served_model_name or args.model
        app = create_app(engine, name, api_key=args.api_key,
                         max_body_bytes=args.max_body_bytes, cors_origins=args.cors_origin)
        host, port = sock.getsockname()[:2]
        pool = engine.pool
        print(f"kvformer serve: {name} on http://{host}:{port}/v1 "
              f"(batch {args.max_batch}, {pool.n_blocks} KV blocks x {pool.block_size} "
              f"tokens = {pool.capacity} tokens, {pool.nbytes / 2**20:.0f} MiB of {pool.kv_dtype} "
              "KV reserved)",
              file=sys.stderr)
        if not _is_loopback(args.host) and args.api_key is None:
            print("kvformer serve: warning: listening beyond this machine without --api-key",
                  file=sys.stderr)
        config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
        server = draining_server_class()(
            config, grace=args.shutdown_grace,
            say=lambda text: print(f"kvformer serve: {text}", file=sys.stderr, flush=True))
        server.run(sockets=[sock])
    finally:
        sock.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ``serve`` on its own: ``python -c 'from kvformer.cli.serve import main; main()'``."""
    parser = ArgumentParser(prog="kvformer")
    register(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (KvformerError, ValueError, OSError) as exc:
        print(f"kvformer: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
