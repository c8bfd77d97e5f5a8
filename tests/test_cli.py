"""The `kvformer` command on the real default model, and its one-line errors."""

import argparse
import re
import subprocess
import sys

import pytest
from helpers import HAVE_DEFAULT, needs_default

import kvformer
from kvformer.cli.main import main
from kvformer.formats.load import default_model_path


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "kvformer", *args], input=stdin,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def default():
    from kvformer.formats.load import load
    return load("default")


@needs_default
def test_generate_chat_answers(default):
    res = run_cli("generate", "--chat", "What is the capital of France?", "-n", "24")
    assert res.returncode == 0, res.stderr
    assert "Paris" in res.stdout


LONG_PROMPT = ("Here is a paragraph: The lighthouse keeper climbed the spiral stairs every "
               "evening to light the lamp, watching ships pass far out at sea while the storm "
               "gathered over the cliffs and the gulls cried. Summarize it in one sentence.")


def _kernel_paths():
    from kvformer.runtime import native

    return native.isas() or ["torch"]


@needs_default
@pytest.mark.parametrize("path", ["avx512", "avxvnni", "avx2", "neon", "scalar"])
def test_a_long_prompt_is_answered_in_words_on_every_kernel_path(path):
    """The CLI's default (int4) on a prompt past the dense-prefill threshold (64 tokens),
    on each kernel path, with torch dispatching as a CPU of that path would: the answer is
    English about the paragraph, not bytes."""
    import os

    if path not in _kernel_paths():
        pytest.skip(f"this CPU (or build) cannot run the {path} kernels")
    env = {**os.environ, "KVFORMER_ISA": path,
           "ATEN_CPU_CAPABILITY": {"avxvnni": "avx2", "avx2": "avx2",
                                   "scalar": "default"}.get(path, "")}
    if not env["ATEN_CPU_CAPABILITY"]:
        del env["ATEN_CPU_CAPABILITY"]
    res = subprocess.run([sys.executable, "-m", "kvformer", "generate", "--chat", LONG_PROMPT,
                          "-n", "40", "--stats"], capture_output=True, text=True, timeout=600,
                         env=env)
    assert res.returncode == 0, res.stderr
    answer = res.stdout
    words = answer.split()
    letters = sum(c.isalpha() or c.isspace() or c in ".,;:'-" for c in answer)
    assert len(words) >= 8 and letters / len(answer) > 0.95, answer
    assert "lighthouse" in answer.lower() or "keeper" in answer.lower(), answer
    assert f"kernels {path}" in res.stderr, res.stderr


@needs_default
def test_generate_from_stdin_equals_argument_and_library(default, capsys):
    from kvformer import generate
    model, tok = default
    prompt = "The three primary colors are"
    expected = tok.decode(generate(model, tok.encode(prompt), 12, stop_ids=tok.stop_ids))
    res = run_cli("generate", "-n", "12", "--dtype", "fp32", stdin=prompt)
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected + "\n"
    assert main(["generate", prompt, "-n", "12", "--no-cache", "--dtype", "fp32"]) == 0
    assert capsys.readouterr().out == expected + "\n"


@needs_default
def test_generate_with_an_int8_kv_cache_equals_the_library():
    from kvformer import generate
    from kvformer.formats.load import load
    model, tok = load("default", dtype="auto", kv_dtype="int8")
    prompt = "The three primary colors are"
    expected = tok.decode(generate(model, tok.encode(prompt), 12, stop_ids=tok.stop_ids))
    res = run_cli("generate", prompt, "-n", "12", "--kv-dtype", "int8")
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected + "\n"


@needs_default
def test_chat_keeps_the_cache_across_turns(default):
    from kvformer import generate
    from kvformer.runtime.session import ChatSession
    model, tok = default
    session = ChatSession(model, tok, max_len=512)
    first = "".join(session.send("Hi! My name is Ada.", 16))
    assert first and session.reused_tokens == 0
    second = "".join(session.send("What is my name?", 16))
    # the whole first turn came from the cache: only the new message was fed
    assert session.reused_tokens > 30
    # and the answer equals a fresh, uncached run over the whole conversation
    messages = session.messages[:-1]
    ids = tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True),
                     add_special_tokens=False)
    fresh = tok.decode(generate(model, ids, 16, stop_ids=tok.stop_ids, use_cache=False))
    assert second == fresh


@needs_default
def test_chat_verb_reads_turns_until_eof():
    res = run_cli("chat", "-n", "16", stdin="Say hello.\nSay goodbye.\n")
    assert res.returncode == 0, res.stderr
    assert len([line for line in res.stdout.splitlines() if line.strip()]) >= 2


@needs_default
def test_info_reports_gqa_and_cache_bytes():
    res = run_cli("info")
    assert res.returncode == 0, res.stderr
    assert "grouped-query (GQA): 9 query heads, 3 KV heads, group size 3" in res.stdout
    # per token: 2 · 30 layers · 3 KV heads · a head's row (64 numbers; + int8's one bf16
    # scale, int4's two per 32 numbers)
    rows = {"fp32": 64 * 4, "bf16": 64 * 2, "int8": 64 + 2, "int4": 32 + 8}
    line = " · ".join(f"{d} {2 * 30 * 3 * row:,} B" for d, row in rows.items())
    assert line in res.stdout
    assert "134,515,008" in res.stdout


@pytest.mark.parametrize("args, words", [
    (["generate", "hi", "--model", "/nonexistent/model.gguf"], ["not found"]),
    (["generate", "one two three four five six seven eight nine", "-c", "8", "--dtype",
      "fp32"], ["the prompt is 9 tokens", "context holds 8", "-c/--ctx-size"]),
    (["chat", "-c", "9000", "--dtype", "fp32"], ["-c/--ctx-size 9000", "context of 8192"]),
    (["generate", "-p", "hi", "there"], ["two prompts given"]),
    (["generate", "-f", "/nonexistent/prompt.txt"], ["No such file", "prompt.txt"]),
    (["info", "/nonexistent"], ["not found"]),
    (["info", "-m", "no-such-model"], ["not found", "kvformer models"]),
])
def test_user_errors_are_one_line_exit_2(args, words):
    if "--model" not in args and not HAVE_DEFAULT:
        pytest.skip("needs the default model")
    res = run_cli(*args)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvformer: error:"), res.stderr
    assert "Traceback" not in res.stderr
    for w in words:
        assert w in lines[0]


def test_corrupt_gguf_is_one_line(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    res = run_cli("generate", "hi", "--model", str(bad))
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "broken.gguf" in res.stderr


@pytest.mark.parametrize("args, prog, words", [
    (["generate", "hi", "--dtype", "int9"], "kvformer generate", ["--dtype", "'int9'"]),
    (["chat", "--kv-dtype", "int9"], "kvformer chat", ["--kv-dtype", "'int9'"]),
    (["serve", "--kv-dtype", "fp8"], "kvformer serve", ["--kv-dtype", "'fp8'"]),
    (["nosuchverb"], "kvformer", ["invalid choice", "'nosuchverb'"]),
    (["serve", "--port", "x"], "kvformer serve", ["--port", "'x'"]),
    (["train", "--steps", "many"], "kvformer train", ["--steps", "'many'"]),
])
def test_bad_command_lines_are_one_line_exit_2(args, prog, words, capsys):
    """argparse's own errors too: one line naming the problem, no usage block."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error:"), lines
    assert lines[0].endswith(f"(see {prog} --help)")
    for w in words:
        assert w in lines[0]


# ----------------------------------------------------------------------------- common flags
def _options(parser, verb):
    """dest -> the option strings of the verb's first flag with that dest."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    found = {}
    for a in sub.choices[verb]._actions:
        found.setdefault(a.dest, tuple(a.option_strings))
    return found


@needs_default
def test_int8_activations_reach_the_kernels_and_equal_the_library():
    """--activations int8: the int4 kernels take one level of x, and the CLI's tokens are
    the library's in that mode (which are not always the default mode's)."""
    from kvformer import generate
    from kvformer.formats.load import load
    from kvformer.runtime import native

    if not native.available():
        pytest.skip("no native kernels: torch's int4 matmul has no activation levels")
    model, tok = load("default", dtype="auto")
    prompt = "The three primary colors are"
    before = native.activations()
    native.activations("int8")
    try:
        expected = tok.decode(generate(model, tok.encode(prompt), 12, stop_ids=tok.stop_ids))
    finally:
        native.activations(before)
    res = run_cli("generate", prompt, "-n", "12", "--activations", "int8", "--stats")
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected + "\n"
    assert "(int8 into int4)" in res.stderr


MODEL_VERBS = ["generate", "chat", "attention", "explain", "serve", "info"]


def test_every_verb_that_loads_a_model_takes_the_same_flags():
    from kvformer.cli.arguments import COMMON_FLAGS
    from kvformer.cli.main import build_parser

    parser = build_parser()
    for verb in MODEL_VERBS:
        actions = _options(parser, verb)
        takes = [name for name in COMMON_FLAGS if name in actions]
        assert "model" in takes, verb
        for name in takes:  # one definition: the same spelling and meaning everywhere
            flags, options = COMMON_FLAGS[name]
            assert actions[name] == flags, (verb, name)
        if verb not in ("info",):
            assert "threads" in takes, verb
        if verb in ("generate", "chat"):
            assert set(takes) == set(COMMON_FLAGS), verb


def test_common_flags_parse_with_llama_cpp_names():
    from kvformer.cli.common import model_arg as _model_arg
    from kvformer.cli.main import build_parser

    parser = build_parser()
    args = parser.parse_args(["generate", "-m", "x.gguf", "-t", "3", "-c", "100", "-n", "5",
                              "--temp", "0.5", "--top-k", "4", "--top-p", "0.9", "--seed", "7",
                              "-q", "hi"])
    assert (args.model, args.threads, args.ctx_size, args.max_new_tokens, args.temperature,
            args.top_k, args.top_p, args.seed, args.quiet, args.prompt) == (
        "x.gguf", 3, 100, 5, 0.5, 4, 0.9, 7, True, "hi")
    assert parser.parse_args(["generate", "--temperature", "0.25"]).temperature == 0.25
    chat = parser.parse_args(["chat", "--context", "300"])  # the old name still works
    assert chat.ctx_size == 300 and chat.max_new_tokens == 256 and chat.ctx_default == 4096
    assert parser.parse_args(["chat", "--ctx-size", "200"]).ctx_size == 200
    assert _model_arg(parser.parse_args(["info", "-m", "foo"])) == "foo"
    assert _model_arg(parser.parse_args(["info", "foo"])) == "foo"
    assert _model_arg(parser.parse_args(["info"])) == "default"
    a = parser.parse_args(["attention", "-m", "foo", "some text"])
    assert (_model_arg(a), a.text) == ("foo", "some text")
    a = parser.parse_args(["attention", "foo", "some text"])
    assert (_model_arg(a), a.text) == ("foo", "some text")
    a = parser.parse_args(["attention", "some text"])
    assert (_model_arg(a), a.text) == ("default", "some text")
    assert parser.parse_args(["serve", "-m", "y", "-t", "2"]).threads == 2
    assert parser.parse_args(["explain", "cache", "-t", "1"]).threads == 1


@pytest.mark.parametrize("args, words", [
    (["generate", "-t", "0.8", "hi"], ["-t/--threads", "use --temp"]),
    (["generate", "-t", "0", "hi"], ["-t/--threads", "1 or more"]),
    (["chat", "-c", "-5"], ["-c/--ctx-size", "below 0"]),
    (["generate", "hi", "--temperature", "-1"], ["--temp/--temperature", "at least 0"]),
    (["generate", "hi", "--top-p", "2"], ["--top-p", "(0, 1]"]),
    (["generate", "hi", "--min-p", "1.5"], ["--min-p", "[0, 1]"]),
    (["chat", "--repeat-penalty", "0"], ["--repeat-penalty", "above 0"]),
    (["generate", "hi", "-n", "-2"], ["-n/--max-new-tokens", "below -1"]),
    # llama.cpp's spellings: -ngl is a flag of its own, not -n with "gl"; no abbreviations
    (["generate", "-ngl", "x", "hi"], ["-ngl/--n-gpu-layers", "'x'"]),
    (["generate", "--n", "8", "hi"], ["unrecognized arguments: --n"]),
    (["generate", "-cnv", "hi"], ["-cnv", "kvformer chat"]),
    (["chat", "--bogus"], ["kvformer chat: error: unrecognized arguments: --bogus",
                           "(see kvformer chat --help)"]),
])
def test_bad_common_flags_say_what_to_do(args, words, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    for w in words:
        assert w in err


def test_version():
    import torch

    import kvformer

    res = run_cli("--version")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"kvformer {kvformer.__version__} (torch {torch.__version__},")


def test_physical_cores_against_lscpu():
    import os
    import shutil

    from kvformer.cli.arguments import physical_cores

    if not shutil.which("lscpu") or not hasattr(os, "sched_getaffinity"):
        pytest.skip("needs lscpu and sched_getaffinity (Linux)")
    allowed = os.sched_getaffinity(0)
    out = subprocess.run(["lscpu", "-p=CPU,CORE,SOCKET"], capture_output=True, text=True).stdout
    cores = {tuple(line.split(",")[1:]) for line in out.splitlines()
             if line and not line.startswith("#") and int(line.split(",")[0]) in allowed}
    assert physical_cores() == len(cores)


@needs_default
def test_threads_reach_torch():
    from kvformer.cli.arguments import physical_cores

    for flags, n in ((["-t", "1"], 1), ([], physical_cores())):
        res = run_cli("generate", "hi", "-n", "2", "--dtype", "fp32", "--stats", *flags)
        assert res.returncode == 0, res.stderr
        assert f", {n} thread{'' if n == 1 else 's'}]" in res.stderr


def test_chat_ctx_size_sets_the_cache(tmp_path):
    if not HAVE_DEFAULT:
        pytest.skip("needs the default model")
    res = run_cli("chat", "-c", "64", "--dtype", "fp32", "-t", "1", stdin="/stats\n")
    assert res.returncode == 0, res.stderr
    assert "KV cache: 0 of 64 tokens" in res.stderr and res.stdout == ""


# ----------------------------------------------------------------------------- models
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A models directory: the default GGUF under another name, a Hugging Face directory
    (MQA), a kvformer directory saved as int8 (GQA), a broken GGUF and a stray file."""
    import os

    import torch

    root = tmp_path_factory.mktemp("models")
    if HAVE_DEFAULT:
        (root / "smol.gguf").symlink_to(default_model_path())
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=1, max_position_embeddings=128)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "tiny-hf")

    from kvformer import ModelConfig, Transformer
    from kvformer.runtime.quant import quantize_model

    model = Transformer(ModelConfig.preset("tiny"))  # 4 query heads, 2 KV heads
    quantize_model(model, "int8")
    kvformer.save(model, root / "tiny-int8")
    (root / "broken.gguf").write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    (root / "notes.txt").write_text("not a model")
    os.makedirs(root / "empty-folder")
    return root


def _dir_size(path):
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def test_models_lists_what_it_finds(model_dir):
    import os

    from kvformer.fileio import human_bytes

    res = subprocess.run([sys.executable, "-m", "kvformer", "models"], capture_output=True,
                         text=True, timeout=600,
                         env={**os.environ, "KVFORMER_MODELS": str(model_dir)})
    assert res.returncode == 0, res.stderr
    rows = {line.split()[0]: line for line in res.stdout.splitlines()[1:] if line.strip()}

    def row(name, *cells):
        for cell in cells:
            assert cell in rows[name], (name, cell, rows[name])

    row("tiny-hf", human_bytes(_dir_size(model_dir / "tiny-hf")), "LlamaForCausalLM",
        "MQA, group 4", "fp32", str(model_dir / "tiny-hf"))
    row("tiny-int8", human_bytes(_dir_size(model_dir / "tiny-int8")), "kvformer",
        "GQA, group 2", "int8")
    if HAVE_DEFAULT:
        size = human_bytes(default_model_path().stat().st_size)
        row("default", size, "llama", "GQA, group 3", "Q4_1")
        row("smol", size, "llama", "GQA, group 3", "Q4_1", str(model_dir / "smol.gguf"))
    assert "broken: cannot be read:" in res.stdout and "notes" not in rows
    assert "empty-folder" not in rows
    assert str(model_dir) in res.stderr


def test_a_listed_name_is_a_model(model_dir, default):
    import os

    from kvformer import generate

    env = {**os.environ, "KVFORMER_MODELS": str(model_dir)}
    res = subprocess.run([sys.executable, "-m", "kvformer", "info", "-m", "tiny-hf"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr
    assert "multi-query (MQA): 4 query heads, 1 KV heads" in res.stdout
    if not HAVE_DEFAULT:
        return
    model, tok = default
    prompt = "The capital of France is"
    expected = tok.decode(generate(model, tok.encode(prompt), 8, stop_ids=tok.stop_ids))
    res = subprocess.run([sys.executable, "-m", "kvformer", "generate", "-m", "smol", "-n", "8",
                          "--dtype", "fp32", "-t", "1", prompt], capture_output=True, text=True,
                         timeout=600, env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected + "\n"


def _patch_tensor_info(data: bytearray, name: str, type_id=None, offset=None) -> None:
    """Rewrite one GGUF tensor info in place: after the name come n_dims (u32), the dims
    (u64 each), the type (u32) and the data offset (u64)."""
    import struct

    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key) + len(key)
    (n_dims,) = struct.unpack_from("<I", data, at)
    at += 4 + 8 * n_dims
    if type_id is not None:
        struct.pack_into("<I", data, at, type_id)
    if offset is not None:
        struct.pack_into("<Q", data, at + 4, offset)


@needs_default
@pytest.mark.parametrize("damage", ["cut at 18/20", "offset past the end", "unknown type"])
def test_info_fails_like_generate_on_a_damaged_file(damage, tmp_path):
    """`info` checks what it prints against the file: one line naming the problem, exit 2,
    as `generate` does on the same file."""
    from kvformer.formats.load import resolve

    data = bytearray(resolve("default")[1].read_bytes())
    if damage == "cut at 18/20":
        data = data[:len(data) * 18 // 20]
        expect = "truncated"
    elif damage == "offset past the end":
        _patch_tensor_info(data, "blk.29.ffn_down.weight", offset=len(data) * 2 // 32 * 32)
        expect = "file ends at"
    else:
        _patch_tensor_info(data, "blk.3.attn_q.weight", type_id=250)
        expect = "cannot"
    bad = tmp_path / "damaged.gguf"
    bad.write_bytes(bytes(data))
    for argv in (["info", str(bad)], ["generate", "-m", str(bad), "-n", "1", "hi"]):
        res = run_cli(*argv)
        assert res.returncode == 2, (argv, res.stdout, res.stderr)
        err = res.stderr.strip()
        assert err.startswith("kvformer: error: ") and "\n" not in err, err
        assert expect in err and "Traceback" not in err, err


@pytest.mark.parametrize("template, words", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
     "ran for more than 1 s"),
    ("{% set a = ['a' * 1000000] * 1000000 %}{{ a }}", "counting each reference in full"),
    ("{% set a = ['a' * 1000000] * 1000000 %}{{ a|unique|list|length }}",
     "counting each reference in full"),
])
def test_a_hostile_chat_template_is_one_line_in_the_cli(tmp_path, template, words):
    """A model directory whose chat template loops forever or prints a million references
    to a million characters: `generate --chat` stops it (the time limit, the size checks)
    and says so in one line, exit 2."""
    import time

    import torch

    from kvformer import ModelConfig, Transformer
    from kvformer.formats.tokenizer.tokenizer import ByteTokenizer

    torch.manual_seed(0)
    tok = ByteTokenizer(["<|im_start|>", "<|im_end|>"], chat_template=template)
    cfg = ModelConfig(vocab_size=258, d_model=32, n_layer=1, n_head=2, n_kv_head=1)
    kvformer.save(Transformer(cfg).eval(), tmp_path / "m", tokenizer=tok)
    t0 = time.monotonic()
    res = run_cli("generate", "--chat", "-m", str(tmp_path / "m"), "-n", "2", "hi")
    assert res.returncode == 2, res.stderr
    err = res.stderr.strip().splitlines()[-1]
    assert err.startswith("kvformer: error: ") and words in err, res.stderr
    assert "Traceback" not in res.stderr
    assert time.monotonic() - t0 < 60


def _with_closed(fd: int, *args):
    """The command with standard stream ``fd`` closed, as a shell's ``<&-`` / ``>&-`` does."""
    import os

    out = subprocess.PIPE if fd != 1 else None
    return subprocess.run([sys.executable, "-m", "kvformer", *args], stdout=out,
                          stderr=subprocess.PIPE, stdin=subprocess.DEVNULL if fd else None,
                          preexec_fn=lambda: os.close(fd), text=True, timeout=600)


@needs_default
def test_closed_standard_streams_are_one_line_errors():
    """`kvformer generate <&-` (no prompt to read), `chat <&-` and `generate hi >&-` (nowhere
    to write) say so in one line and exit 2, with no traceback; with stderr closed the
    answer still comes out."""
    for fd, args, words in ((0, ("generate", "-n", "4"), "stdin (which is closed)"),
                            (0, ("chat", "-n", "4"), "standard input is closed"),
                            (1, ("generate", "-n", "4", "hi"), "standard output is closed")):
        res = _with_closed(fd, *args)
        assert res.returncode == 2, (args, res.stderr)
        assert words in res.stderr and "Traceback" not in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    res = _with_closed(2, "generate", "-n", "4", "hi")
    assert res.returncode == 0 and res.stdout.strip()


# ----------------------------------------------------------------------------- llama.cpp's ways
@needs_default
def test_generate_stops_at_the_end_of_the_context_with_a_note(default, tmp_path):
    """`-c 64 "Hello"` (and -n -1): the answer runs until the context is full, then a note;
    the tokens are the library's for as many as fit."""
    from kvformer import generate

    model, tok = default
    ids = tok.encode("Hello")
    expected = tok.decode(generate(model, ids, 64 - len(ids), stop_ids=tok.stop_ids))
    for n in ("128", "-1"):
        res = run_cli("generate", "-c", "64", "-n", n, "--dtype", "fp32", "-t", "1", "Hello")
        assert res.returncode == 0, res.stderr
        assert res.stdout == expected + "\n"
        assert "[stopped: the context of 64 tokens is full" in res.stderr
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Hello")
    for flags in (["-p", "Hello"], ["-f", str(prompt)]):  # the same prompt, other ways
        res = run_cli("generate", "-c", "64", "-n", "4", "--dtype", "fp32", "-t", "1",
                      "-ngl", "99", *flags)
        assert res.returncode == 0, res.stderr
        assert res.stdout == tok.decode(generate(model, ids, 4, stop_ids=tok.stop_ids)) + "\n"
        assert "note: -ngl/--n-gpu-layers is taken" in res.stderr
        assert "[stopped" not in res.stderr  # -n ended it, not the context


@needs_default
def test_generate_stats_time_the_prompt_and_the_answer_apart(default):
    _, tok = default
    prompt = "The three primary colors are"
    res = run_cli("generate", prompt, "-n", "6", "--dtype", "fp32", "-t", "1", "--stats")
    assert res.returncode == 0, res.stderr
    err = res.stderr
    n_prompt = len(tok.encode(prompt))
    n_out = len(tok.encode(res.stdout.rstrip("\n")))
    load = float(re.search(r"load: +([\d.]+) s", err).group(1))
    m = re.search(rf"prompt: +{n_prompt} tokens in ([\d.]+) s \(([\d.]+) tokens/s\)", err)
    first, rate = float(m.group(1)), float(m.group(2))
    assert rate == pytest.approx(n_prompt / first, rel=0.05, abs=0.5)
    assert re.search(r"answer: +\d+ tokens in [\d.]+ s \([\d.]+ tokens/s after the first\)", err)
    assert f"first token: {first:.2f} s" in err and load > 0 and n_out >= 1


@needs_default
def test_top_k_0_is_off_and_min_p_and_the_repeat_penalty_reach_the_sampler(default):
    """--top-k 0 samples as no --top-k; --min-p and --repeat-penalty give the library's
    tokens with the same settings (and greedy with a penalty differs from greedy)."""
    from kvformer import generate

    model, tok = default
    ids = tok.encode("Once upon a time")
    base = ["generate", "Once upon a time", "-n", "12", "--dtype", "fp32", "-t", "1"]
    sampled = run_cli(*base, "--temp", "0.9", "--seed", "3", "--top-k", "0").stdout
    assert sampled == tok.decode(generate(model, ids, 12, temperature=0.9, seed=3,
                                          stop_ids=tok.stop_ids)) + "\n"
    res = run_cli(*base, "--temp", "0.9", "--seed", "3", "--min-p", "0.1",
                  "--repeat-penalty", "1.3")
    assert res.stdout == tok.decode(generate(model, ids, 12, temperature=0.9, seed=3,
                                             min_p=0.1, repeat_penalty=1.3,
                                             stop_ids=tok.stop_ids)) + "\n"
    penalized = generate(model, ids, 24, repeat_penalty=1.5, stop_ids=tok.stop_ids)
    assert penalized != generate(model, ids, 24, stop_ids=tok.stop_ids)
    assert run_cli(*base[:3], "24", *base[4:], "--repeat-penalty", "1.5").stdout == \
        tok.decode(penalized) + "\n"


def test_chat_samples_as_the_model_says_else_as_llama_cpp():
    """chat's sampling: the flags given, else the model's own settings, else llama.cpp's
    defaults; the flags' "off" values (--top-k 0, --top-p 1, --min-p 0) reach the sampler
    as None."""
    from types import SimpleNamespace

    from kvformer.cli.arguments import sampling_kwargs
    from kvformer.cli.chat import sampling_settings
    from kvformer.cli.main import build_parser

    parser = build_parser()
    model = SimpleNamespace(sampling_defaults={"temperature": 0.3, "top_p": 0.9})
    args = parser.parse_args(["chat"])
    assert sampling_settings(args, model) == {"temperature": 0.3, "top_k": 40, "top_p": 0.9,
                                              "min_p": 0.05, "repeat_penalty": 1.1}
    assert sampling_settings(args, SimpleNamespace())["temperature"] == 0.8
    args = parser.parse_args(["chat", "--temp", "0", "--top-k", "0", "--top-p", "1",
                              "--min-p", "0", "--repeat-penalty", "1"])
    assert sampling_kwargs(sampling_settings(args, model)) == {
        "temperature": 0.0, "top_k": None, "top_p": None, "min_p": None,
        "repeat_penalty": 1.0}
    g = parser.parse_args(["generate", "hi"])  # generate stays greedy, nothing filtered
    assert (g.temperature, g.top_k, g.top_p, g.min_p, g.repeat_penalty) == (
        0.0, None, None, None, 1.0)
    s = parser.parse_args(["serve", "--max-tokens", "512", "-ngl", "99"])
    assert (s.max_tokens, s.n_gpu_layers) == (512, 99)


@needs_default
def test_chat_takes_ollamas_commands():
    """/?, /clear, /set parameter NAME VALUE (checked as the flag is), /show info and
    /show parameters, beside kvformer's own."""
    script = ("/set parameter top_k 5\n/set parameter num_predict -1\n/show parameters\n"
              "/show info\n/?\n/clear\n/set parameter temperature -1\n")
    res = run_cli("chat", "--dtype", "fp32", "-t", "1", "-c", "64", stdin=script)
    assert res.returncode == 2, res.stderr  # piped: the last, bad, line ends it
    err = res.stderr
    assert "set top_k to 5" in err and re.search(r"top_k +5\n", err)
    assert re.search(r"num_predict +-1\n", err) and re.search(r"temperature +0.8\n", err)
    assert re.search(r"context length +8,192\n", err) and "KV cache          fp32, 64 tokens" in err
    assert "/set parameter NAME VALUE" in err and "new conversation (KV cache cleared)" in err
    assert err.rstrip().endswith("kvformer: error: /set parameter temperature (as --temp): "
                                 "-1 is not at least 0")
