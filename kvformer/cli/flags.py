"""Every verb's flags, with argparse alone: ``kvformer --help`` and the parsing of a command
line import no torch. ``add_VERB(subparsers)`` adds a verb's parser; the module that runs
the verb (``kvformer.cli.main.VERBS``) is imported only once its command line has parsed.
The flags several verbs share are defined once, in ``kvformer.cli.arguments``.
"""

from __future__ import annotations

import argparse
import os

from kvformer.cli.arguments import SAMPLING, add_flags, add_model_arguments, at_least

# kvformer.tools.bench.run's DTYPES and NEW_TOKENS, written out: importing it loads torch
BENCH_DTYPES = ("fp32", "bf16", "int8", "int4")
BENCH_NEW_TOKENS = 128


def add_generate(sub) -> None:
    g = sub.add_parser("generate", help="continue a prompt (argument, -p, -f or stdin), "
                                        "streaming")
    g.add_argument("prompt", nargs="?", help="the prompt; read from stdin when omitted")
    g.add_argument("-p", "--prompt", dest="prompt_flag", metavar="TEXT", default=None,
                   help="the prompt (as llama.cpp's -p; or give it as the argument)")
    g.add_argument("-f", "--file", metavar="FILE", default=None,
                   help="read the prompt from FILE ('-': stdin)")
    add_flags(g, "model", "dtype", "kv_dtype", "activations", "threads", "ctx_size",
              *SAMPLING, "quiet", "n_gpu_layers", "conversation")
    g.add_argument("--no-cache", action="store_true",
                   help="recompute the whole sequence for every token (the seed's comparison)")
    g.add_argument("--chat", action="store_true",
                   help="wrap the prompt as a user message in the model's chat template")
    add_flags(g, "system")
    g.add_argument("--stats", action="store_true",
                   help="print the load time, the prompt's and the answer's tokens and "
                        "tokens/s, and the time to the first token, to stderr")
    g.set_defaults(read_prompt_first=True)
    add_speculative(g)


def add_speculative(p: argparse.ArgumentParser) -> None:
    """Speculative decoding (kvformer.runtime.speculative): the same text, fewer steps."""
    p.add_argument("--spec", choices=("lookup", "draft"), default=None,
                   help="guess tokens and check them in one step: 'lookup' (n-grams of the "
                        "prompt and the text so far) or 'draft' (--draft-model)")
    p.add_argument("-md", "--draft-model", default=None, metavar="M",
                   help="the draft model (same vocabulary as the model); implies --spec draft")
    p.add_argument("--draft-dtype", default=None,
                   help="the draft model's dtype (as --dtype; e.g. int4 to draft for fp32)")
    p.add_argument("--spec-k", type=at_least(1), default=5, metavar="K",
                   help="most tokens guessed per step (default 5; fewer while guesses fail)")


def add_chat(sub) -> None:
    c = sub.add_parser("chat", help="interactive multi-turn chat (/help inside; Ctrl-C "
                                    "stops an answer, Ctrl-D exits)")
    add_flags(c, "model", "dtype", "kv_dtype", "activations", "threads", "ctx_size",
              *SAMPLING, "quiet", "n_gpu_layers", "conversation", "system",
              max_new_tokens=256, ctx_size=4096, model_sampling=True)
    c.add_argument("--context", dest="ctx_size", type=at_least(0),
                   help=argparse.SUPPRESS)  # the old name of --ctx-size
    c.add_argument("--stats", action="store_true",
                   help="after each answer, print its statistics as /stats does")
    add_speculative(c)


def add_info(sub) -> None:
    i = sub.add_parser("info", help="architecture, parameters, attention kind, KV-cache size")
    i.add_argument("model_arg", nargs="?", default=None, metavar="MODEL",
                   help="a model path or name, 'default', or a preset name (shapes only)")
    add_flags(i, "model")


def add_models(sub) -> None:
    sub.add_parser("models", help="the models kvformer can find: the default one and those "
                                  "in $KVFORMER_MODELS (or ~/.cache/kvformer/models)")


def add_kv_size(sub) -> None:
    k = sub.add_parser("kv-size", help="KV-cache bytes of models as MHA, GQA and MQA")
    k.add_argument("models", nargs="*", default=["default"], metavar="PRESET|MODEL")
    k.add_argument("-c", "--ctx-size", "--context", dest="context", type=int, default=4096,
                   help="context length in tokens (default 4096)")
    k.add_argument("--batch", type=int, default=1)
    k.add_argument("--dtype", "--kv-dtype", default="fp16,int8,int4",
                   help="comma-separated KV dtypes: fp32, fp16, bf16, int8, int4 (int8 and "
                        "int4 with their scales; default fp16,int8,int4)")
    k.add_argument("--plot", default=None, metavar="OUT.png")


def add_attention(sub) -> None:
    a = sub.add_parser("attention", help="heatmaps of a model's attention weights")
    a.add_argument("model_arg", nargs="?", default=None, metavar="MODEL",
                   help="the model (or give it with -m)")
    a.add_argument("text")
    add_flags(a, "model", "threads", "quiet")
    a.add_argument("--layer", type=int, default=0)
    a.add_argument("--head", type=int, default=None, help="one head; default: all heads")
    a.add_argument("-o", "--output", default="attention.png")


def add_explain(sub) -> None:
    e = sub.add_parser("explain", help="the seed's ideas measured, as pictures")
    e.add_argument("topic", choices=["scaling", "cache", "docs"],
                   help="scaling: why 1/sqrt(d_k); cache: time per token with and without "
                        "the KV cache; docs: regenerate docs/how-it-decodes.md and its pictures")
    e.add_argument("-o", "--output", default=None, help="PNG (or, for docs, a directory)")
    add_flags(e, "model", "threads")


def add_build(sub) -> None:
    b = sub.add_parser("build", help="compile kvformer's C++ kernels for this machine (make "
                                     "does it during setup)")
    b.add_argument("--force", action="store_true", help="build again even if a build exists")


def add_serve(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server (continuous batching, paged KV cache)",
        description="Serve a model over OpenAI's and Anthropic's HTTP APIs: /v1/models, "
                    "/v1/completions, /v1/chat/completions, /v1/responses, /v1/embeddings, "
                    "/v1/messages, /tokenize, /detokenize, /health, /metrics, and a chat page "
                    "at /.")
    add_model_arguments(p)
    add_flags(p, "ctx_size")  # default: the model's context
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
    p.add_argument("--max-tokens", type=at_least(1), default=None, metavar="N",
                   help="the most tokens one answer may have: the default of requests that "
                        "give no max_tokens, and the ceiling of those that ask for more "
                        "(default: none, the rest of the context)")
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
    p.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="without --api-key, also answer requests whose Host header is NAME "
                        "(besides localhost, 127.0.0.1, ::1, the --host address and the "
                        "--cors-origin hosts; others get 403); repeatable")
    g = p.add_argument_group("limits on clients and chat templates")
    g.add_argument("--header-timeout", type=float, default=15.0, metavar="SECONDS",
                   help="close a connection that has not sent a request's headers this long "
                        "after it opened or after its last response (default 15)")
    g.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="close a kept-alive connection idle this long (default 5)")
    g.add_argument("--max-connections", type=int, default=1000, metavar="N",
                   help="open connections served at once; more get 503 (default 1000, and "
                        "never more than the open-file limit allows; the soft limit is "
                        "raised to the hard one at start)")
    g.add_argument("--template-time-limit", type=float, default=1.0, metavar="SECONDS",
                   help="stop a chat template (untrusted code from the model file) after "
                        "this long: 400 for that request (default 1)")
    g.add_argument("--template-memory", type=int, default=256, metavar="MB",
                   help="memory a chat template may use in its worker process before it is "
                        "stopped (default 256; 0: no cap)")
    p.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="run N engine replicas behind this endpoint on Ray Serve, routed by "
                        "prompt prefix (the cluster extra; RAY_ADDRESS names a cluster)")
    p.add_argument("--route-prefix-chars", type=int, default=512, metavar="N",
                   help="with --replicas: the prompt characters that pick a replica "
                        "(default 512; 0: by load alone)")
    p.add_argument("--log-level", default="info",
                   choices=["critical", "error", "warning", "info", "debug"])
    return p


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The train verb's flags, for ``kvformer train`` and ``python -m kvformer.train``."""
    p.add_argument("--config", default="tiny",
                   help="model shape: a preset (tiny, gpt2, smollm2-135m, ...) or a config "
                        "JSON file (default: tiny); ignored with --init and --resume")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="text files, directories (searched for text files) or glob patterns")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="run directory: token files, checkpoints, metrics.jsonl, loss.png, "
                        "and at the end the trained model in DIR/model")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in DIR (starts fresh if none)")
    p.add_argument("--seed", type=int, default=1337)
    g = p.add_argument_group("batches and optimisation")
    g.add_argument("--batch-size", type=int, default=16,
                   help="sequences per micro-batch over all processes (default 16)")
    g.add_argument("--seq-len", type=int, default=None,
                   help="tokens per sequence (default: min(128, the model's context))")
    g.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches per optimizer step (default 1)")
    g.add_argument("--lr", type=float, default=None,
                   help="peak learning rate (default 1e-3; 5e-5 with --init)")
    g.add_argument("--min-lr-ratio", type=float, default=0.1,
                   help="the cosine ends at lr * this (default 0.1)")
    g.add_argument("--warmup", type=int, default=None,
                   help="linear warmup steps (default 10%% of --steps, at most 100)")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: off)")
    g.add_argument("--bf16", action="store_true",
                   help="bfloat16 autocast (CPU or GPU); weights and optimizer stay fp32")
    g = p.add_argument_group("evaluation, checkpoints, logging")
    g.add_argument("--eval-every", type=int, default=100,
                   help="steps between evaluations (0: only at the end)")
    g.add_argument("--eval-tokens", type=int, default=16384,
                   help="validation tokens per evaluation (default 16384)")
    g.add_argument("--val-fraction", type=float, default=0.05,
                   help="share of the data held out for validation (default 0.05)")
    g.add_argument("--sample-tokens", type=int, default=64,
                   help="tokens of sample text generated at each evaluation (0: none)")
    g.add_argument("--save-every", type=int, default=250,
                   help="steps between checkpoints (0: only at the end and on Ctrl-C)")
    g.add_argument("--keep", type=int, default=2, help="checkpoints to keep (default 2)")
    g.add_argument("--log-every", type=int, default=10,
                   help="steps between lines in metrics.jsonl (default 10)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--quiet", "-q", action="store_true", help="print only errors")
    g = p.add_argument_group("model and tokenizer")
    g.add_argument("--init", metavar="MODEL", default=None,
                   help="fine-tune this model (a .gguf, a model directory, or 'default') "
                        "with its own tokenizer")
    g.add_argument("--tokenizer", default=None, metavar="byte|MODEL",
                   help="'byte' (default from scratch) or a model whose tokenizer to use")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda, cuda:N")
    g.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (default: torch's choice, one per core)")
    g.add_argument("--data-dir", default=None,
                   help="where the token files go (default DIR/data); runs on the same data "
                        "and tokenizer can share it")


def add_train(sub) -> argparse.ArgumentParser:
    t = sub.add_parser(
        "train", help="train a model from scratch or fine-tune one (also under torchrun)",
        description="Train a model on text files; Ctrl-C saves a checkpoint and --resume "
                    "continues exactly where it stopped. See docs/training.md.")
    add_train_arguments(t)
    return t


def add_experiment(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "experiment", help="compare norms, positions or attention kinds on equal budgets",
        description="Train equal-size models on the Python standard library's source and "
                    "write docs/experiments.md with tables and plots.")
    p.add_argument("which", choices=("norms", "positions", "attention", "all"),
                   help="which comparison to run")
    p.add_argument("--out", default="docs",
                   help="where experiments.md goes (plots go to OUT/img/exp_*.png); "
                        "default docs")
    p.add_argument("--steps", type=int, default=None,
                   help="optimizer steps per model (default: the documented budget)")
    p.add_argument("--work", default=None,
                   help="directory for the runs (default: a temporary one, removed at the end)")
    p.add_argument("--corpus-mb", type=float, default=None,
                   help="megabytes of standard-library source to train on")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: one per core; 1 is faster on a busy machine)")
    p.add_argument("--quiet", "-q", action="store_true")
    return p


def add_bench(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "bench", help="speed, memory and quality against llama.cpp and transformers, per "
                      "kernel path (writes docs/benchmarks.md)",
        description="`kvformer bench`: speed, memory, load time and quality, against "
                    "llama.cpp (and\n`transformers`) measured in the same run, on each kernel "
                    "path of this CPU.")
    p.add_argument("--model", "-m", default="default",
                   help="a .gguf file, a model directory, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default=",".join(BENCH_DTYPES),
                   help="comma-separated kvformer dtypes to measure (default "
                        f"{','.join(BENCH_DTYPES)})")
    p.add_argument("--paths", default=None,
                   help="comma-separated kernel paths for the int8/int4 rows (default: the "
                        "SIMD paths this CPU runs; 'all' adds scalar)")
    p.add_argument("--runs", type=int, default=3, help="fresh processes per configuration "
                   "(the figures are their medians; default 3)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads for every engine (default: all cores)")
    p.add_argument("--no-transformers", action="store_true",
                   help="skip the transformers reference")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp reference")
    p.add_argument("--llama-cpp-avx2", default=None, metavar="DIR",
                   help="a second llama-cpp-python built for AVX2 only (CMAKE_ARGS='-DGGML_NATIVE="
                        "OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF ...', pip install --target DIR): "
                        "the reference for the avx2 rows")
    p.add_argument("--big", action="store_true",
                   help="also a random model in the shape of Llama-3.2-1B (Q4_0 GGUF, ~0.8 GB, "
                        "written once to ~/.cache/kvformer/bench)")
    p.add_argument("--types", default=None, metavar="TYPES",
                   help="also each of these GGUF types (comma-separated: Q4_0, Q4_1, Q5_0, "
                        "Q5_1, Q8_0, Q4_K_M, Q5_K_M, Q6_K, IQ4_NL, IQ4_XS), made by llama.cpp's "
                        "quantizer from the default model's numbers (and with --big the 1B "
                        "shape's), run by kvformer --dtype auto against llama.cpp on the file")
    p.add_argument("--new-tokens", type=int, default=BENCH_NEW_TOKENS)
    p.add_argument("--out", default="docs/benchmarks.md",
                   help="markdown file to write (its chart goes to img/ beside it)")
    p.add_argument("--no-write", action="store_true", help="print only")
    p.add_argument("--kv-dtype", default=None,
                   help="the KV cache of kvformer's rows: auto (default), fp32, bf16, int8, "
                        "int4; with --kv, the comma-separated KV dtypes to compare (default "
                        "fp32,bf16,int8,int4)")
    p.add_argument("--kv", action="store_true",
                   help="instead: each KV dtype's bytes, perplexity (1,000+ tokens), greedy "
                        "agreement with the bf16 cache and decode speed at 2,048 tokens "
                        "cached (kvformer.tools.bench.kv; writes docs/kv-cache.md)")
    p.add_argument("--profile", action="store_true",
                   help="also profile one int4 decode step (adds about a minute)")
    return p
