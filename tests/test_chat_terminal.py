"""`kvformer chat` and `generate` as people use them: the real program in a pseudo-terminal,
real Ctrl-C (the terminal's ^C, so the kernel sends SIGINT), real keys for line editing.
The conversation the program saves is then checked against the model run here without a
cache: the answer after a cut equals a fresh recomputation of the whole history."""

import json
import os
import re
import sys
from pathlib import Path

import pytest

pexpect = pytest.importorskip("pexpect")

from helpers import needs_default  # noqa: E402

from kvformer import generate  # noqa: E402

pytestmark = [needs_default,
              pytest.mark.skipif(sys.platform == "win32", reason="needs a POSIX terminal"),
              pytest.mark.usefixtures("one_thread")]

STORY = "Tell me a long story about a dragon."
# fp32, greedy and no repeat penalty (chat's defaults sample): answers the library's
# generate() gives too
EXACT = ("--dtype", "fp32", "-t", "1", "--temp", "0", "--repeat-penalty", "1")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\r")


@pytest.fixture(scope="module")
def default():
    from kvformer.formats.load import load
    return load("default")  # fp32, as the programs below are run


@pytest.fixture
def env(tmp_path):
    """The user's environment, but kvformer's cache (history, models) in tmp_path; the
    native build is shared so that nothing is compiled again."""
    from kvformer.runtime import native

    cache = tmp_path / "cache"
    cache.mkdir()
    lib = native.library_path()
    if lib is not None:
        (cache / "native").symlink_to(lib.parents[1], target_is_directory=True)
    models = tmp_path / "models"
    models.mkdir()
    return {**os.environ, "KVFORMER_CACHE": str(cache), "KVFORMER_MODELS": str(models),
            "TERM": "xterm", "PYTHONUNBUFFERED": "1"}


def spawn(args, env, **kw):
    return pexpect.spawn(args[0], args[1:], env=env, encoding="utf-8", timeout=180,
                         dimensions=(24, 200), **kw)


def kvformer(*args):
    return [sys.executable, "-m", "kvformer", *args]


def plain(text: str) -> str:
    return ANSI.sub("", text)


def template_ids(tok, messages):
    plain_messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    return tok.encode(tok.apply_chat_template(plain_messages, add_generation_prompt=True),
                      add_special_tokens=False)


def uncached(model, tok, messages, n):
    """The reference: the whole history recomputed for every token, no cache."""
    return tok.decode(generate(model, template_ids(tok, messages), n, stop_ids=tok.stop_ids,
                               use_cache=False))


def test_ctrl_c_cuts_the_answer_and_the_chat_goes_on(default, env, tmp_path):
    model, tok = default
    child = spawn(kvformer("chat", *EXACT, "-n", "24"), env)
    child.expect("Ctrl-D leaves")
    banner = plain(child.before)
    assert "kvformer chat: SmolLM2-135M-Instruct.Q4_1" in banner
    assert "GQA (9 query heads share 3 KV heads, group size 3)" in banner
    assert "KV cache fp32, 4,096 tokens" in banner
    child.expect_exact("> ")

    # Ctrl-C while the answer streams: it stops, is marked cut, and the prompt returns
    child.sendline(STORY)
    child.expect_exact(STORY)
    child.expect(r"\w+ \w+ \w+ ")  # a few words of the answer have arrived
    shown_cut = child.before + child.after
    child.sendintr()
    child.expect("answer cut")
    shown_cut = plain(shown_cut + child.before)
    child.expect_exact("> ")

    # Ctrl-C at the empty prompt asks before leaving
    child.sendintr()
    child.expect("press Ctrl-C again or Ctrl-D to leave")
    child.expect_exact("> ")
    child.sendline(f"/save {tmp_path / 'cut.json'}")
    child.expect("saved 2 messages")
    child.expect_exact("> ")

    # the conversation goes on from the cut answer
    # (and keys typed while it streams are neither shown in it nor sent after it: a note
    # after the answer shows what was dropped)
    child.sendline("What was the dragon called?")
    child.expect_exact("called?")
    child.expect(r"\w+ \w+ ")
    shown_next = child.before + child.after
    child.sendline("typed too soon")
    child.expect_exact("(dropped what was typed during the answer: 'typed too soon'")
    shown_next = plain(shown_next + child.before).strip()
    assert "typed too soon" not in shown_next
    child.expect_exact("> ")
    child.sendline("/stats")
    child.expect(r"KV cache: (\d+) of 4096 tokens")
    cached = int(child.match.group(1))
    child.expect_exact("> ")
    child.sendline(f"/save {tmp_path / 'all.json'}")
    child.expect("saved 4 messages")
    child.expect_exact("> ")

    # text typed at the prompt: Ctrl-C clears it and does not count towards leaving
    child.send("half a thought")
    child.expect_exact("half a thought")  # readline has it (a person types slower than this)
    child.sendintr()
    child.expect_exact("> ")
    assert "press Ctrl-C again" not in child.before
    child.sendintr()
    child.expect("press Ctrl-C again")
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before

    cut = json.loads((tmp_path / "cut.json").read_text())["messages"]
    assert [m["role"] for m in cut] == ["user", "assistant"] and cut[1]["cut"] is True
    partial = cut[1]["content"]
    assert partial.strip() and partial.strip() in shown_cut
    full = tok.decode(generate(model, template_ids(tok, cut[:1]), 24, stop_ids=tok.stop_ids))
    assert full.startswith(partial) and len(partial) < len(full)  # the model's answer, cut

    talk = json.loads((tmp_path / "all.json").read_text())["messages"]
    assert talk[:2] == cut and [m["role"] for m in talk[2:]] == ["user", "assistant"]
    # the answer given after the cut, from the cache, is the uncached recomputation's
    expected = uncached(model, tok, talk[:3], 24)
    made = generate(model, template_ids(tok, talk[:3]), 24, stop_ids=tok.stop_ids)
    assert talk[3]["content"] == expected
    assert talk[3].get("cut", False) == (len(made) == 24)  # cut by -n, and marked so
    assert shown_next == expected.strip()
    assert cached > len(tok.encode(partial))


def test_slash_commands_line_editing_and_history(env, tmp_path):
    child = spawn(kvformer("chat", "--dtype", "fp32", "-t", "1", "--system", "Be kind."), env)
    child.expect_exact("> ")
    child.sendline("/help")
    child.expect(r"/save FILE\s+write the conversation")
    child.expect_exact("> ")
    child.sendline("/system")
    child.expect("system message: Be kind.")
    child.expect_exact("> ")
    child.send("/system be brif")
    child.send("\x1b[D")  # the left arrow: back over the 'f'
    child.send("e\r")
    child.expect("system message set")
    child.expect_exact("> ")
    child.send("\x1b[A\x1b[A\r")  # up twice: the /system before last, as typed then
    child.expect("system message: be brief")
    child.expect_exact("> ")
    child.sendline("/nonsense")
    child.expect("unknown command /nonsense; /help lists them")
    child.expect_exact("> ")
    child.sendline("/load /nonexistent.json")
    child.expect("kvformer: error: .*nonexistent.json")  # one line, and the chat goes on
    child.expect_exact("> ")
    child.sendline("/reset")
    child.expect(r"new conversation \(KV cache cleared; the system message stays\)")
    child.expect_exact("> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    history = (Path(env["KVFORMER_CACHE"]) / "chat_history").read_text()
    assert "/system be brief" in history and "/help" in history


def test_status_on_the_terminal_and_only_the_answer_on_stdout(default, env, tmp_path):
    """stderr is the terminal (the status line shows there while the model loads); stdout
    goes to a file and holds the answer and nothing else."""
    model, tok = default
    prompt = "The three primary colors are"
    expected = tok.decode(generate(model, tok.encode(prompt), 12, stop_ids=tok.stop_ids))
    out = tmp_path / "out.txt"
    command = " ".join(kvformer("generate", "--dtype", "fp32", "-t", "1", "-n", "12",
                                f"'{prompt}'"))
    for quiet in (False, True):
        child = spawn(["/bin/sh", "-c", f"{command}{' -q' if quiet else ''} > {out}"], env)
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0, child.before
        assert out.read_text() == expected + "\n"
        terminal = child.before
        if quiet:
            assert terminal.strip() == ""
        else:
            assert "kvformer: loading SmolLM2-135M-Instruct.Q4_1..." in terminal
            assert terminal.rstrip(" ").endswith("\x1b[K")  # and wiped before the answer


def test_chat_with_stdout_redirected_writes_only_answers(default, env, tmp_path):
    model, tok = default
    out = tmp_path / "answers.txt"
    command = " ".join(kvformer("chat", *EXACT, "-n", "10"))
    child = spawn(["/bin/sh", "-c", f"{command} > {out}"], env)
    child.expect("Ctrl-D leaves")
    child.expect_exact("> ")  # on stderr: stdout is the file
    child.sendline("Say hello.")
    child.expect_exact("> ")
    child.sendline("/stats")
    child.expect("KV cache:")
    child.expect_exact("> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    expected = uncached(model, tok, [{"role": "user", "content": "Say hello."}], 10)
    assert out.read_text() == expected + "\n"


def saved_messages(child, path):
    child.sendline(f"/save {path}")
    child.expect("saved")
    child.expect_exact("> ")
    return json.loads(Path(path).read_text())["messages"]


def test_multi_line_messages_arrive_whole(env, tmp_path):
    """A bracketed paste, a paste the terminal did not bracket (lines that arrive together)
    and a \"\"\" block: each is one message, no line lost."""
    child = spawn(kvformer("chat", *EXACT, "-n", "1"), env)
    child.expect_exact("> ")
    child.send("\x1b[200~first line\nsecond line\nthird line\x1b[201~")
    child.expect_exact("third line")
    child.send("\r")
    child.expect_exact("> ")
    child.send("alpha\nbeta\ngamma\r")  # one write: as a terminal without bracketed paste
    child.expect_exact("> ")
    child.sendline('"""')
    child.expect_exact("... ")
    child.sendline("one")
    child.expect_exact("... ")
    child.sendline('two"""')
    child.expect_exact("> ")
    messages = saved_messages(child, tmp_path / "talk.json")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    assert [m["content"] for m in messages if m["role"] == "user"] == [
        "first line\nsecond line\nthird line", "alpha\nbeta\ngamma", "one\ntwo"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3


def test_ctrl_c_while_the_prompt_is_read_stops_at_once(default, env, tmp_path):
    """A long message, Ctrl-C a second into reading it: the prompt comes back within a
    fraction of a second (not when the whole prompt has been read), the message is not
    sent, and the next answer equals an uncached recomputation (the cache stayed exact)."""
    import time

    model, tok = default
    child = spawn(kvformer("chat", *EXACT, "-n", "8"), env)
    child.expect_exact("> ")
    long = "The sea is wide and the waves are high. " * 300  # ~3,000 tokens: many seconds
    child.send("\x1b[200~" + long + "\x1b[201~\r")
    time.sleep(1.5)
    sent = time.monotonic()
    child.sendintr()
    child.expect_exact("stopped while the prompt was read")
    took = time.monotonic() - sent
    child.expect_exact("> ")
    assert took < 1.0, f"{took:.2f} s from Ctrl-C to the prompt"  # between two operations
    child.sendline("/stats")
    child.expect(r"KV cache: (\d+) of 4096 tokens")
    cached = int(child.match.group(1))
    child.expect_exact("> ")
    child.sendline("Say hello.")
    child.expect_exact("> ")
    messages = saved_messages(child, tmp_path / "talk.json")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    assert cached < len(tok.encode(long))  # stopped before the message was all read
    assert [m["content"] for m in messages if m["role"] == "user"] == ["Say hello."]
    assert messages[1]["content"] == uncached(model, tok, messages[:1], 8)
    print(f"Ctrl-C to prompt: {took:.3f} s")


def test_a_full_context_slides(default, env, tmp_path):
    """chat -c 160: the oldest turns go, with a note, the conversation goes on, and the
    answer after the drop equals an uncached run over what was kept."""
    model, tok = default
    child = spawn(kvformer("chat", *EXACT, "-n", "40", "-c", "160"), env)
    child.expect_exact("> ")
    notes = []
    for animal in ("cat", "dog", "bird", "fish"):
        child.sendline(f"Tell me a story about a {animal}.")
        child.expect_exact("> ")
        notes += re.findall(r"the oldest (\d+) messages? dropped", plain(child.before))
    messages = saved_messages(child, tmp_path / "talk.json")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    assert notes and sum(int(n) for n in notes) >= 2
    users = [m["content"] for m in messages if m["role"] == "user"]
    assert users[-1].endswith("a fish.") and not users[0].endswith("a cat.")
    assert messages[-1]["content"] == uncached(model, tok, messages[:-1], 40)


def test_generate_says_it_reads_the_prompt_from_a_terminal(default, env):
    """No prompt and a terminal on stdin: a line says so at once (not a status line that
    looks hung), and what is typed up to Ctrl-D is the prompt."""
    model, tok = default
    child = spawn(kvformer("generate", "--dtype", "fp32", "-t", "1", "-n", "6"), env)
    child.expect_exact("kvformer: reading the prompt from stdin (Ctrl-D to end)", timeout=20)
    assert "importing torch" not in child.before
    child.send("The three primary colors are")
    child.sendeof()
    child.sendeof()  # the line had no newline: the first Ctrl-D only hands it over
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    expected = tok.decode(generate(model, tok.encode("The three primary colors are"), 6,
                                   stop_ids=tok.stop_ids))
    assert expected.strip() in plain(child.before)
