"""The ``kvformer serve`` verb: an OpenAI-compatible HTTP server. Its flags are in
``kvformer.cli.flags``; FastAPI and uvicorn come with the ``serve`` extra."""

from __future__ import annotations

import ipaddress
import sys
from urllib.parse import urlsplit

import torch

from kvformer.cli.common import apply_activations, context_size, set_threads
from kvformer.cli.flags import add_serve
from kvformer.cli.status import plural
from kvformer.errors import ArgumentParser, KvformerError
from kvformer.formats.load import load
from kvformer.formats.tokenizer.template import set_template_limits, warm_template_workers
from kvformer.serve.engine import Engine

try:  # the serve extra (pip install 'kvformer[serve]'); without it, run() says so
    import uvicorn

    from kvformer.serve.app import bind_socket, create_app
    from kvformer.serve.http import (
        connection_cap,
        draining_server_class,
        raise_open_file_limit,
        server_config,
    )
except ImportError as exc:
    if (exc.name or "").split(".")[0] not in ("fastapi", "starlette", "pydantic", "uvicorn"):
        raise
    uvicorn = None


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
    for name in ("header_timeout", "keep_alive_timeout", "template_time_limit"):
        if not getattr(args, name) > 0:
            raise ValueError(f"--{name.replace('_', '-')} must be > 0 seconds")
    if args.max_connections < 1:
        raise ValueError("--max-connections must be >= 1")
    if args.template_memory < 0:
        raise ValueError("--template-memory must be >= 0 MB (0: no cap)")
    for origin in args.cors_origin:
        if origin != "*" and not origin.startswith(("http://", "https://")):
            raise ValueError(f"--cors-origin {origin!r} is not an origin such as "
                             "http://localhost:5173 (scheme://host[:port]) or '*'")


def _allowed_hosts(args) -> list[str]:
    """The Host header names served without --api-key, besides this machine's: the --host
    address (unless it is every address), the --cors-origin hosts, and --allowed-host."""
    names = list(args.allowed_host)
    if args.host not in ("0.0.0.0", "::", ""):
        names.append(args.host)
    names += [urlsplit(o).hostname for o in args.cors_origin if o != "*" and
              urlsplit(o).hostname]
    return names


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    _check(args)
    if uvicorn is None:
        raise KvformerError("kvformer serve needs FastAPI and uvicorn: "
                            "pip install 'kvformer[serve]'")
    if args.replicas is not None:
        from kvformer.serve.replicas import serve_replicas

        return serve_replicas(args, allowed_hosts=_allowed_hosts(args))
    set_threads(args)  # -t/--threads, as every verb
    max_connections = connection_cap(args.max_connections, raise_open_file_limit())
    set_template_limits(args.template_time_limit, args.template_memory)
    if args.n_gpu_layers is not None:
        print("kvformer serve: note: -ngl/--n-gpu-layers is taken for llama.cpp's command "
              "lines; kvformer runs on the CPU", file=sys.stderr)
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
                        prefix_caching=args.prefix_cache, max_tokens=args.max_tokens,
                        max_seq_len=context_size(args, model))
        name = args.served_model_name or args.model
        app = create_app(engine, name, api_key=args.api_key,
                         max_body_bytes=args.max_body_bytes, cors_origins=args.cors_origin,
                         allowed_hosts=_allowed_hosts(args))
        host, port = sock.getsockname()[:2]
        pool = engine.pool
        print(f"kvformer serve: {name} on http://{host}:{port}/v1 "
              f"(batch {args.max_batch}, {pool.n_blocks} KV blocks x "
              f"{plural(pool.block_size, 'token')} = {plural(pool.capacity, 'token')}, "
              f"{pool.nbytes / 2**20:.0f} MiB of {pool.kv_dtype} "
              "KV reserved)",
              file=sys.stderr)
        page = ("localhost" if args.host in ("0.0.0.0", "::", "") else
                f"[{host}]" if ":" in host else host)
        print(f"kvformer serve: chat page at http://{page}:{port}/"
              + (f"; answers of at most {args.max_tokens} tokens (--max-tokens)"
                 if args.max_tokens else ""), file=sys.stderr, flush=True)
        if not _is_loopback(args.host) and args.api_key is None:
            print("kvformer serve: warning: listening beyond this machine without --api-key",
                  file=sys.stderr)
        warm_template_workers()
        config = server_config(app, log_level=args.log_level,
                               header_timeout=args.header_timeout,
                               keep_alive_timeout=args.keep_alive_timeout,
                               max_connections=max_connections)
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
    add_serve(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130
    except (KvformerError, ValueError, OSError) as exc:
        print(f"kvformer: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
