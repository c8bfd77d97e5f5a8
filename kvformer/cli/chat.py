"""``kvformer chat``: the prompt loop around a ChatSession, as people who use llama.cpp or
Ollama expect it at a terminal.

- Ctrl-C during an answer stops it after the current token, and while a long prompt is
  read, at once (between two operations of the forward: the message is then not sent); a
  partial answer stays in the conversation, marked cut, and the prompt comes back. Answers
  cut by -n or by a full context are marked the same way. Ctrl-C at an empty prompt asks
  to press it again (or Ctrl-D) to leave; with text typed it clears the line.
- Multi-line messages: a paste arrives whole (readline's bracketed paste, or lines that
  arrive together), and a message between lines of three double quotes is one message,
  as in Ollama.
- A full context drops the oldest turns (the system message stays), with a note.
- Slash commands: /help lists them, Ollama's (/?, /clear, /set parameter, /show info)
  among them. A message that starts with '/' is sent as '//...'.
- Line editing and history with the standard library's readline where the platform has it
  (the history is kept in ~/.cache/kvformer/chat_history, see loading.cache_dir).
- What is typed while an answer streams is not echoed into it nor sent afterwards: it is
  dropped, and a note shows what was dropped.

Answers go to stdout and everything else to stderr, so `kvformer chat > answers.txt`
keeps only the answers. With stdin not a terminal (a pipe, a file), each line is a message
or a command, an error ends the program, and Ctrl-C ends it as for any other program.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import sys

import torch

from kvformer.cli.arguments import at_least, number, sampling_kwargs
from kvformer.cli.common import context_size, load_model, speculative_options
from kvformer.cli.status import plural
from kvformer.errors import ContextOverflowError, KvformerError
from kvformer.fileio import cache_dir, human_bytes
from kvformer.formats import sampling_defaults
from kvformer.formats.catalog import attention_label
from kvformer.runtime.session import ChatSession

COMMANDS = {  # name: (argument, what it does)
    "/help": ("", "this list (so does /?)"),
    "/reset": ("", "start a new conversation on an empty cache (the system message stays; "
                   "so does /clear)"),
    "/system": ("[TEXT]", "set the system message (without TEXT: show it)"),
    "/set": ("parameter NAME VALUE", "change a sampling setting: temperature, top_k, top_p, "
                                     "min_p, repeat_penalty, seed, num_predict (as Ollama)"),
    "/show": ("info|parameters|system", "the model, the sampling settings, the system "
                                        "message"),
    "/save": ("FILE", "write the conversation to FILE as JSON"),
    "/load": ("FILE", "replace the conversation with one written by /save"),
    "/stats": ("", "tokens, KV-cache use, the load time and the last answer's speeds"),
    "/exit": ("", "leave (so do /quit, /bye and Ctrl-D)"),
}
ALIASES = {"/?": "/help", "/clear": "/reset"}  # Ollama's names
EXITS = ("/exit", "/quit", "/bye")
BLOCK = '"""'  # a message between two of these may span lines (Ollama's)
PASTE_WAIT_S = 0.03  # lines that arrive this soon after a line came with it (a paste)
# /set parameter NAME VALUE: Ollama's names, checked as the flags are
PARAMETERS = {"temperature": ("--temp", number(0)),
              "top_k": ("--top-k", at_least(0)),
              "top_p": ("--top-p", number(0, 1, above=True)),
              "min_p": ("--min-p", number(0, 1)),
              "repeat_penalty": ("--repeat-penalty", number(0, above=True)),
              "seed": ("--seed", at_least(0)),
              "num_predict": ("-n", at_least(-1, off=-1))}


def sampling_settings(args, model) -> dict:
    """The flags given, else the model's own settings, else llama.cpp's defaults."""
    chosen = sampling_defaults.resolve(getattr(model, "sampling_defaults", None))
    for name in chosen:
        value = getattr(args, name, None)
        if value is not None:
            chosen[name] = value
    return chosen


def run(args) -> int:
    if sys.stdin is None:  # started with `<&-`: no messages can come
        raise KvformerError("standard input is closed: chat reads its messages there; run "
                            "it at a terminal or pipe the messages in")
    model, tok = load_model(args)
    if tok is None:
        raise KvformerError(f"{args.model}: no tokenizer found beside the model; "
                            "chat needs tokenizer.json or a GGUF with a vocabulary")
    spec, draft, _ = speculative_options(args, model, tok)
    settings = sampling_settings(args, model)
    if spec and settings.get("repeat_penalty") not in (None, 1.0):
        if args.repeat_penalty is not None:
            raise KvformerError("--spec keeps the model's own distribution, which a repeat "
                                "penalty changes: give --repeat-penalty 1 with it")
        settings["repeat_penalty"] = 1.0  # the default's, turned off for the guesses' sake
        if not args.quiet:
            print("kvformer chat: note: --spec turns the default repeat penalty off",
                  file=sys.stderr)
    session = ChatSession(model, tok, system=args.system,
                          max_len=context_size(args, model),
                          seed=args.seed, spec=spec, spec_k=args.spec_k, draft=draft,
                          **sampling_kwargs(settings))
    interactive = sys.stdin.isatty()
    if interactive and not args.quiet:
        cache = session.cache
        kv = cache.format.name
        print(f"kvformer chat: {model.display_name} ({getattr(model, 'mode', '?')} weights)\n"
              f"  attention {attention_label(model.cfg, long=True)}\n"
              f"  KV cache {kv}, {plural(cache.max_len, 'token')} "
              f"({human_bytes(cache.nbytes)})\n"
              "/help lists the commands; Ctrl-C stops an answer; Ctrl-D leaves.",
              file=sys.stderr, flush=True)
    loop = ChatLoop(session, args.max_new_tokens, model.display_name, interactive)
    loop.stats_after = args.stats
    return loop.run()


def say(text: str = "") -> None:
    """Everything that is not an answer goes to stderr."""
    print(text, file=sys.stderr, flush=True)


class StopOnCtrlC:
    """While an answer streams, Ctrl-C asks it to stop after the current token instead of
    raising wherever Python happens to be; a second Ctrl-C raises KeyboardInterrupt at
    once. While the prompt is still read (``answering`` False), Ctrl-C raises at once: the
    forward stops between two of its operations (or after the C++ step's call of at most
    256 rows), which keeps the prompt in one fast forward instead of chunks. The session
    keeps its cache consistent either way."""

    def __init__(self):
        self.presses = 0
        self.answering = False

    def __enter__(self) -> StopOnCtrlC:
        self.presses, self.answering = 0, False
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame):
        self.presses += 1
        if self.presses > 1 or not self.answering:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def __call__(self) -> bool:
        return self.presses > 0


@contextlib.contextmanager
def typing_hidden():
    """Keys typed while an answer streams are not echoed into it, and are dropped at its
    end rather than sent as the next message; the list it gives then holds what was
    dropped, for a note. Ctrl-C still signals."""
    try:
        import termios

        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
    except (ImportError, OSError, ValueError, AttributeError):
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO  # lflag
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    dropped: list[str] = []  # filled at the end, for the caller's note
    try:
        yield dropped
    finally:
        typed = _pending(fd)
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)
        shown = " ".join(typed.decode("utf-8", "replace").split())
        if shown:
            dropped.append(shown)


def _pending(fd: int) -> bytes:
    """What the terminal holds that nobody has read yet (without waiting for more)."""
    got = b""
    with contextlib.suppress(OSError, ValueError):
        while select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            got += chunk
    return got


def _arrives_soon(stream) -> bool:
    """True when more input is already there, or comes within PASTE_WAIT_S: the lines of a
    paste that the terminal did not bracket arrive together."""
    try:
        return bool(select.select([stream], [], [], PASTE_WAIT_S)[0])
    except (OSError, ValueError, TypeError):
        return False


class ChatLoop:
    def __init__(self, session: ChatSession, max_new_tokens: int, model_name: str,
                 interactive: bool):
        self.session, self.max_new_tokens = session, max_new_tokens
        self.model_name, self.interactive = model_name, interactive
        self.readline = None
        self.stats_after = False  # --stats: /stats after each answer
        self._typed = ""  # what was on the line when Ctrl-C was pressed at the prompt
        self.history = cache_dir() / "chat_history"

    # -- reading lines ---------------------------------------------------------------------
    def _setup_readline(self) -> None:
        try:
            import readline
        except ImportError:  # not on every platform: plain input() then
            return
        self.readline = readline
        with contextlib.suppress(OSError):
            readline.read_history_file(self.history)
        readline.set_history_length(1000)
        names = [*COMMANDS, *ALIASES, "/quit", "/bye"]
        readline.set_completer(
            lambda text, i: ([n for n in names if n.startswith(text)] + [None])[i]
            if text.startswith("/") else None)
        readline.set_completer_delims(" \t\n")
        if "libedit" in (readline.__doc__ or ""):  # macOS's readline speaks another language
            readline.parse_and_bind("bind ^I rl_complete")
        else:
            readline.parse_and_bind("tab: complete")

    def _save_history(self) -> None:
        if self.readline is not None:
            with contextlib.suppress(OSError):
                self.history.parent.mkdir(parents=True, exist_ok=True)
                self.readline.write_history_file(self.history)

    def _read(self, prompt: str = "> ") -> str:
        if not self.interactive:
            return input("")
        self._typed = ""
        previous = signal.signal(signal.SIGINT, self._on_sigint_at_prompt)
        try:
            if sys.stdout.isatty():
                return input(prompt)
            sys.stderr.write(prompt)  # stdout holds only the answers
            sys.stderr.flush()
            return input("")
        finally:
            signal.signal(signal.SIGINT, previous)

    def read_message(self) -> str:
        """One message or command: a line, with the lines pasted with it, or a \"\"\" block."""
        line = self._read()
        if self.interactive:
            while _arrives_soon(sys.stdin):  # the rest of a paste
                line += "\n" + self._read("")
        if not line.lstrip().startswith(BLOCK):
            return line
        text = line.lstrip()[len(BLOCK):]
        lines = []
        try:
            while not text.rstrip().endswith(BLOCK):
                lines.append(text)
                text = self._read("... ")
        except EOFError:  # the end of the input ends the block too
            text = BLOCK
        except KeyboardInterrupt:
            if not self.interactive:
                raise
            say("\n(the message was discarded)")
            return ""
        lines.append(text.rstrip()[:-len(BLOCK)])
        return "\n".join(lines).strip("\n")

    def _on_sigint_at_prompt(self, signum, frame):
        # Runs before readline forgets the line, so Ctrl-C can tell "clear what I typed"
        # from "I want to leave".
        if self.readline is not None:
            self._typed = self.readline.get_line_buffer()
        raise KeyboardInterrupt

    # -- the loop --------------------------------------------------------------------------
    def run(self) -> int:
        if self.interactive:
            self._setup_readline()
        try:
            return self._loop()
        finally:
            self._save_history()

    def _loop(self) -> int:
        leaving = False  # Ctrl-C was pressed at an empty prompt
        while True:
            try:
                line = self.read_message()
            except EOFError:
                if self.interactive:
                    say()
                return 0
            except KeyboardInterrupt:
                if not self.interactive:
                    raise
                say()
                if self._typed:
                    leaving = False
                elif leaving:
                    return 0
                else:
                    say("(press Ctrl-C again or Ctrl-D to leave; /help lists the commands)")
                    leaving = True
                continue
            leaving = False
            try:
                if not self.handle(line):
                    return 0
            except KeyboardInterrupt:
                if not self.interactive:
                    raise
                say()
            except (KvformerError, ValueError, OSError) as exc:
                if not self.interactive:
                    raise
                message = " ".join(str(exc).split())
                if isinstance(exc, ContextOverflowError):
                    message += " (shorten it, or raise -c/--ctx-size)"
                say(f"kvformer: error: {message}")

    def handle(self, line: str) -> bool:
        """One line: a command or a message. False to leave."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/") and not text.startswith("//"):
            name, _, arg = text.partition(" ")
            name = ALIASES.get(name, name)
            if name in EXITS:
                return False
            command = getattr(self, "cmd_" + name[1:], None) if name in COMMANDS else None
            if command is None:
                say(f"unknown command {name}; /help lists them (start a message with // "
                    "to send one that begins with /)")
                return True
            command(arg.strip())
            return True
        self.answer(line[1:] if text.startswith("//") else line)
        return True

    def answer(self, text: str) -> None:
        out = sys.stdout
        hidden = typing_hidden() if self.interactive else contextlib.nullcontext()
        stop = StopOnCtrlC() if self.interactive else None
        if self.readline is not None and "\n" in text:
            self.readline.add_history(text)  # a block or paste: Up brings the whole back
        stream = self.session.send(text, self.max_new_tokens, stop=stop, stop_prompt=False)
        started, dropped = False, None
        try:
            with hidden as dropped, (stop or contextlib.nullcontext()):
                for piece in stream:
                    if not started:  # the turn is set up: say what it dropped
                        started = True
                        self._say_dropped()
                    elif stop is not None:  # the prompt has been read: Ctrl-C cuts
                        stop.answering = True
                    out.write(piece)
                    out.flush()
        except KeyboardInterrupt:
            if not self.interactive:
                raise
        finally:
            stream.close()  # a stream left part way records its partial answer now
        last = self.session.last
        if last is not None and last.cut_by == "prompt":
            say("[stopped while the prompt was read: the message was not sent]")
            return
        out.write("\n")
        out.flush()
        for typed in dropped or ():
            say(f"(dropped what was typed during the answer: {typed[:60]!r}"
                f"{'...' if len(typed) > 60 else ''}; type or paste it again)")
        if last is not None and last.cut:
            say({"length": f"[answer cut at -n {self.max_new_tokens}: it stays in the "
                           "conversation as far as it went]",
                 "context": f"[answer cut: the context of {self.session.cache.max_len} tokens "
                            "is full; the next message drops the oldest turns]",
                 }.get(last.cut_by, "[answer cut: it stays in the conversation as far as it "
                                    "went]"))
        if self.stats_after:
            self.cmd_stats("")

    def _say_dropped(self) -> None:
        last = self.session.last
        if last is not None and last.dropped:
            kept = "; the system message stays" if self.session.system else ""
            say(f"[the context of {self.session.cache.max_len} tokens is full: the oldest "
                f"{plural(last.dropped, 'message')} dropped{kept}]")

    # -- commands --------------------------------------------------------------------------
    def cmd_help(self, arg: str) -> None:
        width = max(len(f"{n} {a}") for n, (a, _) in COMMANDS.items())
        for name, (argument, what) in COMMANDS.items():
            say(f"  {f'{name} {argument}':<{width}}  {what}")
        say(f'  {BLOCK} starts a message of several lines and {BLOCK} ends it; a paste arrives '
            "whole.\n  Ctrl-C stops an answer; Ctrl-D leaves.")

    def cmd_reset(self, arg: str) -> None:
        self.session.reset()
        say("new conversation (KV cache cleared" +
            ("; the system message stays)" if self.session.system else ")"))

    def cmd_system(self, arg: str) -> None:
        if not arg:
            say(f"system message: {self._system_shown()}")
            return
        self.session.set_system(arg)
        say("system message set (the next answer reads the conversation with it)")

    def _system_shown(self) -> str:
        if self.session.system:
            return self.session.system
        default = self.session.template_system()
        return (f"(none given; the model's chat template adds its own: {default!r})"
                if default else "(none)")

    def cmd_set(self, arg: str) -> None:
        words = arg.split()
        if words[:1] == ["system"]:  # Ollama's /set system TEXT
            self.cmd_system(arg[len("system"):].strip())
            return
        if len(words) != 3 or words[0] != "parameter":
            raise KvformerError("use /set parameter NAME VALUE (NAME: "
                                f"{', '.join(PARAMETERS)}) or /set system TEXT")
        _, name, text = words
        if name == "num_ctx":
            raise KvformerError("the context size is fixed once the cache is made: start "
                                "chat again with -c/--ctx-size")
        if name not in PARAMETERS:
            raise KvformerError(f"/set parameter {name}: not one kvformer takes; it takes "
                                f"{', '.join(PARAMETERS)}")
        flag, parse = PARAMETERS[name]
        try:
            value = parse(text)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise KvformerError(f"/set parameter {name} (as {flag}): {exc}") from None
        if name == "seed":
            self.session.generator = torch.Generator().manual_seed(value)
        elif name == "num_predict":
            self.max_new_tokens = value
        else:
            self.session.sampling.update(sampling_kwargs({name: value}))
        say(f"set {name} to {text}")

    def cmd_show(self, arg: str) -> None:
        if arg == "info":
            model, cache = self.session.model, self.session.cache
            cfg = model.cfg
            for key, value in (
                    ("model", self.model_name),
                    ("parameters", f"{cfg.num_params():,}"),
                    ("layers", cfg.n_layer), ("context length", f"{cfg.max_seq_len:,}"),
                    ("embedding length", cfg.d_model),
                    ("attention", attention_label(cfg, long=True)),
                    ("weights", getattr(model, "mode", "?")),
                    ("KV cache", f"{cache.format.name}, {plural(cache.max_len, 'token')} "
                                 f"({human_bytes(cache.nbytes)})")):
                say(f"  {key:<17} {value}")
        elif arg == "parameters":
            settings = {**self.session.sampling, "num_predict": (
                -1 if self.max_new_tokens is None else self.max_new_tokens)}
            for key, value in settings.items():
                say(f"  {key:<17} {'off' if value is None else value}")
        elif arg == "system":
            say(f"system message: {self._system_shown()}")
        else:
            raise KvformerError("use /show info, /show parameters or /show system")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise KvformerError("/save needs a file name: /save FILE")
        path = self.session.save(arg, model=self.model_name)
        say(f"saved {plural(len(self.session.messages), 'message')} to {path}")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise KvformerError("/load needs a file name: /load FILE")
        n = self.session.load(arg)
        say(f"loaded {plural(n, 'message')} from {arg}")

    def cmd_stats(self, arg: str) -> None:
        for line in stats_lines(self.session):
            say(line)


def stats_lines(session: ChatSession) -> list[str]:
    cache = session.cache
    answers = sum(m["role"] == "assistant" for m in session.messages)
    used = cache.nbytes * cache.length // cache.max_len
    lines = [f"conversation: {plural(len(session.messages), 'message')}, "
             f"{plural(answers, 'answer')}, {plural(session.total_new_tokens, 'token')} "
             "generated",
             f"KV cache: {cache.length} of {cache.max_len} tokens "
             f"({100 * cache.length / cache.max_len:.1f}%), {human_bytes(used)} of "
             f"{human_bytes(cache.nbytes)} ({cache.format.name})"]
    load_s = getattr(session.model, "load_s", None)
    if load_s is not None:
        lines.append(f"load: {load_s:.2f} s")
    last = session.last
    if last is not None:
        rate, read = last.tokens_per_s, last.prompt_tokens_per_s
        lines.append(f"last prompt: {plural(last.fed, 'token')} read in {last.prefill_s:.2f} s"
                     + (f" ({read:.1f} tokens/s)" if read else "")
                     + f", {plural(last.reused, 'token')} reused from the cache")
        lines.append(
            f"last answer: {plural(last.new_tokens, 'token')} in "
            f"{last.prefill_s + last.decode_s:.2f} s"
            + (f" ({rate:.1f} tokens/s after the first)" if rate else "")
            + (f", cut ({last.cut_by})" if last.cut else ""))
        if last.new_tokens:
            lines.append(f"first token: {last.prefill_s:.2f} s after the message was sent")
    if session.spec:
        lines.append(session.spec_stats.line())
    return lines
