"""``kvformer serve --replicas N``: N engine replicas behind one endpoint on Ray Serve (see
``kvformer.serve.ray_serve``). Ray comes with the ``cluster`` extra; without it, this says
so. With ``RAY_ADDRESS`` set, the replicas go to that Ray cluster; otherwise to a Ray
instance started on this machine."""

from __future__ import annotations

import os
import sys
import time

from kvformer.errors import KvformerError

try:  # the cluster extra
    import ray
    from ray import serve

    from kvformer.serve.ray_serve import ENGINE, build_app
except ImportError as exc:  # said when --replicas is asked for
    if (exc.name or "").split(".")[0] not in ("ray", "fastapi", "starlette", "uvicorn"):
        raise
    ray = None

APP = "kvformer"


def _check(args) -> None:
    if args.replicas < 1:
        raise ValueError("--replicas must be >= 1")
    if args.route_prefix_chars < 0:
        raise ValueError("--route-prefix-chars must be >= 0 (0: route by load alone)")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port {args.port} is not a TCP port (0-65535)")


def deploy_error(text: str) -> str:
    """The one line that says why a deployment failed: the loader's own message when a
    replica's constructor raised, not Ray's traceback."""
    for line in reversed(text.splitlines()):
        line = line.strip()
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and ":" in line and "RayTaskError" not in head:
            return line.split(":", 1)[1].strip()
    return " ".join(text.split())[:500]


def serve_replicas(args, allowed_hosts=None) -> int:
    _check(args)
    if ray is None:
        raise KvformerError("kvformer serve --replicas needs Ray Serve: "
                            "pip install 'kvformer[cluster]'")
    engine = {"max_batch": args.max_batch, "kv_blocks": args.kv_blocks,
              "block_size": args.block_size, "prefill_chunk": args.prefill_chunk,
              "max_queue": args.max_queue, "queue_timeout": args.queue_timeout,
              "prefix_caching": args.prefix_cache}
    server = {"api_key": args.api_key, "max_body_bytes": args.max_body_bytes,
              "cors_origins": list(args.cors_origin), "allowed_hosts": allowed_hosts}
    name = args.served_model_name or args.model
    ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level="warning",
             log_to_driver=args.log_level == "debug")
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        app = build_app(model=args.model, replicas=args.replicas, threads=args.threads,
                        prefix_chars=args.route_prefix_chars, name=name, dtype=args.dtype,
                        kv_dtype=args.kv_dtype, max_ongoing_requests=args.max_batch
                        + args.max_queue, engine=engine, server=server)
        try:
            serve.run(app, name=APP, route_prefix="/")
        except Exception as exc:  # a replica's constructor failed (Ray gave up on it)
            why = str(exc)
            try:
                why = serve.status().applications[APP].deployments[ENGINE].message or why
            except (KeyError, AttributeError):
                pass
            raise KvformerError(f"the replicas did not start: {deploy_error(why)}") from None
        print(f"kvformer serve: {name} on http://{args.host}:{args.port}/v1 "
              f"({args.replicas} replicas on Ray Serve, routed by the first "
              f"{args.route_prefix_chars} prompt characters)", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
