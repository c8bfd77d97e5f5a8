"""Prefix-aware routing over replicas, measured: cache hits with and without it.

Starts a local Ray instance, deploys ``--replicas`` engine replicas of ``--model`` behind the
ingress of ``kvformer serve --replicas`` (kvformer.serve.ray_serve), once with prefix routing
(``prefix_chars`` 512) and once by load alone (``prefix_chars`` 0: ties broken at random),
and sends ``--requests`` chat requests one after another that share a system prompt of
about ``--prefix-tokens`` tokens and differ in their question. It reports, per routing, the
requests whose ``usage.prompt_tokens_details.cached_tokens`` was above zero, the replicas
used and the mean time per request.

    python benchmarks/serve_replicas.py                       # default model, 2 replicas
    python benchmarks/serve_replicas.py --threads 1 --requests 8 --prefix-tokens 1500
"""

import argparse
import os
import socket
import sys
import time

import httpx

PARAGRAPH = ("The harbour town kept its records in a long ledger: ships that came in, the "
             "weather of each morning, the price of salt and rope, and the names of those "
             "who sailed. ")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, prefix_chars: int) -> dict:
    import ray
    from ray import serve

    from kvformer.serve.ray_serve import REPLICA_HEADER, build_app

    ray.init(num_cpus=args.replicas * (args.threads or 1), include_dashboard=False,
             logging_level="warning", log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args.model, replicas=args.replicas, threads=args.threads,
                            prefix_chars=prefix_chars, name="m"), name="kvformer",
                  route_prefix="/")
        document = PARAGRAPH * max(1, args.prefix_tokens // 33)
        hits, replicas, seconds, prompt_tokens = 0, [], [], 0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
            for i in range(args.requests):
                body = {"model": "m", "max_tokens": 1, "temperature": 0,
                        "messages": [{"role": "system", "content": document},
                                     {"role": "user", "content": f"Question {i}: which "
                                                                 "ships came in?"}]}
                start = time.perf_counter()
                r = client.post("/v1/chat/completions", json=body)
                seconds.append(time.perf_counter() - start)
                r.raise_for_status()
                usage = r.json()["usage"]
                prompt_tokens = usage["prompt_tokens"]
                hits += usage["prompt_tokens_details"]["cached_tokens"] > 0
                replicas.append(r.headers[REPLICA_HEADER])
        return {"hits": hits, "replicas": len(set(replicas)), "prompt_tokens": prompt_tokens,
                "mean_s": sum(seconds) / len(seconds)}
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--prefix-tokens", type=int, default=1500)
    args = p.parse_args(argv)
    load = os.getloadavg()[0]
    rows = [("prefix (512 characters)", run(args, 512)), ("by load, ties at random",
                                                         run(args, 0))]
    print(f"\n{args.replicas} replicas of {args.model}, {args.threads} thread(s) each, "
          f"{args.requests} requests sharing a {rows[0][1]['prompt_tokens']}-token prompt "
          f"but its last question; load average {load:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after\n")
    print("| routing | requests with cached_tokens > 0 | replicas used | mean s / request |")
    print("|---|---:|---:|---:|")
    for name, r in rows:
        print(f"| {name} | {r['hits']} of {args.requests} | {r['replicas']} | "
              f"{r['mean_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
