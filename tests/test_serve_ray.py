"""`kvformer serve --replicas`: two engine replicas of a tiny random model on a local Ray
instance (2 CPUs) behind the prefix-aware ingress, checked against one in-process server of
the same saved model. Skipped without Ray Serve (the cluster extra). The tests share one
deployment and run in file order: the last one kills a replica."""

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from kvformer import ModelConfig, Transformer  # noqa: E402
from kvformer.formats.load import load  # noqa: E402
from kvformer.formats.native import save_model  # noqa: E402
from kvformer.formats.tokenizer.tokenizer import ByteTokenizer  # noqa: E402
from kvformer.serve.app import BackgroundServer, create_app  # noqa: E402
from kvformer.serve.engine import Engine  # noqa: E402
from kvformer.serve.ray_serve import ENGINE, REPLICA_HEADER, build_app, rendezvous  # noqa: E402
from kvformer.serve.replicas import APP  # noqa: E402

ENGINE_KW = {"max_batch": 4, "kv_blocks": 256, "block_size": 8, "prefill_chunk": 64}
PREFIX_CHARS = 64


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layer=2, n_head=4, n_kv_head=2,
                      max_seq_len=1024)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(20)  # decisive logits: batching noise cannot flip a greedy choice
    return str(save_model(m, tmp_path_factory.mktemp("tiny") / "model", ByteTokenizer()))


@pytest.fixture(scope="module")
def cluster(model_dir):
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning",
             log_to_driver=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(model_dir, replicas=2, threads=1, name="tiny",
                            prefix_chars=PREFIX_CHARS, engine=ENGINE_KW),
                  name=APP, route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield client
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def single(model_dir):
    """One server of the same saved model, in this process: the reference."""
    m, tok = load(model_dir)
    srv = BackgroundServer(create_app(Engine(m, tok, **ENGINE_KW), "tiny")).start()
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        yield client
    srv.stop()


def complete(client, prompt, **kw):
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt,
                                             "max_tokens": 8, "temperature": 0, **kw})
    assert r.status_code == 200, r.text
    return r


def running_replicas() -> int:
    app = serve.status().applications[APP]
    return app.deployments[ENGINE].replica_states.get("RUNNING", 0)


def test_a_replica_that_cannot_load_fails_the_deployment_with_the_loaders_line(tmp_path):
    # first in the file: its own Ray instance, before the shared one starts
    missing = str(tmp_path / "no-such-model")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-m", "kvformer.cli.main", "serve", "--replicas",
                           "1", "--model", missing, "--port", str(free_port())],
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("kvformer: error: the replicas did not start: model ")
    assert f"'{missing}' not found" in last and "Traceback" not in last


def test_rendezvous_moves_only_the_lost_names_keys():
    names = ["a", "b", "c"]
    keys = [f"k{i}" for i in range(200)]
    before = {k: rendezvous(k, names)[0] for k in keys}
    after = {k: rendezvous(k, ["a", "c"])[0] for k in keys}
    assert {before[k] for k in keys} == set(names)  # every name gets keys
    assert all(after[k] == before[k] for k in keys if before[k] != "b")


def test_greedy_outputs_equal_one_server(cluster, single):
    for prompt in ["hello world", "The quick brown fox", "0123456789" * 5]:
        want = complete(single, prompt)
        got = complete(cluster, prompt)
        assert got.json()["choices"][0]["text"] == want.json()["choices"][0]["text"]
        assert got.headers[REPLICA_HEADER]
    # a stream passes through: the same text, chunk by chunk, then [DONE]
    r = cluster.post("/v1/completions", json={"model": "tiny", "prompt": "hello world",
                                              "max_tokens": 8, "temperature": 0,
                                              "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert text == complete(single, "hello world").json()["choices"][0]["text"]


def test_a_shared_prefix_stays_on_one_replica_and_hits_its_cache(cluster):
    prefix = "You are a careful assistant. Answer in one word. " * 4  # 200 characters
    replicas, cached = set(), []
    for i in range(8):
        r = complete(cluster, prefix + f"Question {i}?")
        replicas.add(r.headers[REPLICA_HEADER])
        cached.append(r.json()["usage"]["prompt_tokens_details"]["cached_tokens"])
    assert len(replicas) == 1
    assert sum(c > 0 for c in cached[1:]) == 7, cached  # all but the first reuse the prefix
    # prompts that differ within the first PREFIX_CHARS characters spread over both
    spread = {complete(cluster, f"{i:03d} distinct opening").headers[REPLICA_HEADER]
              for i in range(16)}
    assert len(spread) == 2


def test_bad_input_is_4xx_as_at_one_server(cluster, single):
    cases = [
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
        {"json": {"model": "tiny", "prompt": "x", "max_tokens": -1}},
        {"json": {"model": "nope", "prompt": "x"}},
        {"json": [1, 2, 3]},
        {"content": b"prompt=x"},
    ]
    for kw in cases:
        got = cluster.post("/v1/completions", **kw)
        want = single.post("/v1/completions", **kw)
        assert 400 <= got.status_code < 500
        assert got.status_code == want.status_code, (kw, got.text)
    assert cluster.get("/v1/nothing-here").status_code == 404


def test_health_and_metrics_cover_every_replica(cluster):
    assert cluster.get("/health").json() == {"status": "ok", "replicas": 2}
    before = cluster.get("/metrics").text
    n = 6
    for i in range(n):
        complete(cluster, f"metrics {i:02d} " * 3)

    def total(text):
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("kvformer_completion_tokens_total"))

    after = cluster.get("/metrics").text
    assert total(after) - total(before) == n * 8
    assert "\nkvformer_kv_block_size 8\n" in after  # the same on each: not summed
    assert "\nkvformer_kv_blocks_total 512\n" in after  # 256 on each: summed


def kill(replica_id: str) -> None:
    for actor in ray.util.list_named_actors(all_namespaces=True):
        if actor["name"].endswith(f"#{ENGINE}#{replica_id}"):
            ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]),
                     no_restart=True)
            return
    raise AssertionError(f"no actor for replica {replica_id}")


def test_a_killed_replica_is_replaced_and_requests_keep_succeeding(cluster, single):
    prompt = "a long answer please " * 3
    want = complete(single, prompt).json()["choices"][0]["text"]
    # a long stream: kill its replica once the first token is out
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 900, "temperature": 0,
            "stream": True}
    with cluster.stream("POST", "/v1/completions", json=body) as r:
        victim = r.headers[REPLICA_HEADER]
        lines = r.iter_lines()
        first = next(ln for ln in lines if ln.startswith("data: "))
        assert json.loads(first[6:])["choices"]  # generating
        kill(victim)
        rest = [ln[6:] for ln in lines if ln.startswith("data: ")]
    assert rest[-1] != "[DONE]" and json.loads(rest[-1])["error"]["code"] == "replica_lost"
    # new requests with the same prefix succeed at once, on the other replica
    others = [complete(cluster, prompt) for _ in range(3)]
    assert {r.headers[REPLICA_HEADER] for r in others} - {victim}
    assert all(r.json()["choices"][0]["text"] == want for r in others)
    # Ray starts a replacement; then both serve again
    deadline = time.monotonic() + 60
    while running_replicas() < 2:
        assert time.monotonic() < deadline, "no replacement replica in 60 s"
        time.sleep(0.5)
    # ... and the ingress routes to it once the controller has told it (distinct prefixes)
    survivor = next(iter({r.headers[REPLICA_HEADER] for r in others}))
    seen, i = set(), 0
    while not seen - {survivor}:
        assert time.monotonic() < deadline, f"only {seen} served after the loss"
        r = complete(cluster, f"{i:03d} after the loss")
        assert r.json()["choices"][0]["text"] == complete(
            single, f"{i:03d} after the loss").json()["choices"][0]["text"]
        seen.add(r.headers[REPLICA_HEADER])
        i += 1
    assert victim not in seen
