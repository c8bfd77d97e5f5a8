"""``kvformer chat``: the prompt loop around a ChatSession, as people who use llama.cpp or
Ollama expect it at a terminal.

- Ctrl-C during an answer stops it after the current token (a second Ctrl-C stops even a
  long prompt that is still being read); the partial answer stays in the conversation,
  marked cut, and the prompt comes back. Ctrl-C at an empty prompt asks to press it again
  (or Ctrl-D) to leave; with text typed it clears the line.
- Slash commands: /help lists them. A message that starts with '/' is sent as '//...'.
- Line editing and history with the standard library's readline where the platform has it
  (the history is kept in ~/.cache/kvformer/chat_history, see loading.cache_dir).
- What is typed while an answer streams is neither echoed into it nor sent afterwards.

Answers go to stdout and everything else to stderr, so `kvformer chat > answers.txt`
keeps only the answers. With stdin not a terminal (a pipe, a file), each line is a message
or a command, an error ends the program, and Ctrl-C ends it as for any other program.
"""

from __future__ import annotations

import contextlib
import signal
import sys

from kvformer.cli.common import context_size, load_model, speculative_options
from kvformer.errors import ContextOverflowError, KvformerError
from kvformer.fileio import human_bytes
from kvformer.formats.catalog import attention_label
from kvformer.formats.load import cache_dir
from kvformer.runtime.sampling import validate_sampling
from kvformer.runtime.session import ChatSession

COMMANDS = {  # name: (argument, what it does)
    "/help": ("", "this list"),
    "/reset": ("", "start a new conversation on an empty cache (the system message stays)"),
    "/system": ("[TEXT]", "set the system message (without TEXT: show it)"),
    "/save": ("FILE", "write the conversation to FILE as JSON"),
    "/load": ("FILE", "replace the conversation with one written by /save"),
    "/stats": ("", "tokens, KV-cache use and the speed of the last answer"),
    "/exit": ("", "leave (so do /quit, /bye and Ctrl-D)"),
}
EXITS = ("/exit", "/quit", "/bye")


def run(args) -> int:
    validate_sampling(args.temperature, args.top_k, args.top_p)
    if sys.stdin is None:  # started with `<&-`: no messages can come
        raise KvformerError("standard input is closed: chat reads its messages there; run "
                            "it at a terminal or pipe the messages in")
    model, tok = load_model(args)
    if tok is None:
        raise KvformerError(f"{args.model}: no tokenizer found beside the model; "
                            "chat needs tokenizer.json or a GGUF with a vocabulary")
    spec, draft, _ = speculative_options(args, model, tok)
    session = ChatSession(model, tok, system=args.system,
                          max_len=context_size(args, model),
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                          seed=args.seed, spec=spec, spec_k=args.spec_k, draft=draft)
    interactive = sys.stdin.isatty()
    if interactive and not args.quiet:
        cache = session.cache
        kv = cache.format.name
        print(f"kvformer chat: {model.display_name} ({getattr(model, 'mode', '?')} weights)\n"
              f"  attention {attention_label(model.cfg, long=True)}\n"
              f"  KV cache {kv}, {cache.max_len} tokens ({human_bytes(cache.nbytes)})\n"
              "/help lists the commands; Ctrl-C stops an answer; Ctrl-D leaves.",
              file=sys.stderr, flush=True)
    return ChatLoop(session, args.max_new_tokens, model.display_name, interactive).run()


def say(text: str = "") -> None:
    """Everything that is not an answer goes to stderr."""
    print(text, file=sys.stderr, flush=True)


class StopOnCtrlC:
    """While an answer streams, Ctrl-C asks it to stop after the current token instead of
    raising wherever Python happens to be; a second Ctrl-C raises KeyboardInterrupt (to
    stop a long prompt read). The session keeps its cache consistent either way."""

    def __init__(self):
        self.presses = 0

    def __enter__(self) -> StopOnCtrlC:
        self.presses = 0
        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def _on_sigint(self, signum, frame):
        self.presses += 1
        if self.presses > 1:
            raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def __call__(self) -> bool:
        return self.presses > 0


@contextlib.contextmanager
def typing_hidden():
    """Keys typed while an answer streams are not echoed into it, and are dropped at its
    end (TCSAFLUSH) rather than sent as the next message. Ctrl-C still signals."""
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
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSAFLUSH, saved)


class ChatLoop:
    def __init__(self, session: ChatSession, max_new_tokens: int, model_name: str,
                 interactive: bool):
        self.session, self.max_new_tokens = session, max_new_tokens
        self.model_name, self.interactive = model_name, interactive
        self.readline = None
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
        names = [*COMMANDS, "/quit", "/bye"]
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

    def _read(self) -> str:
        if not self.interactive:
            return input("")
        self._typed = ""
        previous = signal.signal(signal.SIGINT, self._on_sigint_at_prompt)
        try:
            if sys.stdout.isatty():
                return input("> ")
            sys.stderr.write("> ")  # stdout holds only the answers
            sys.stderr.flush()
            return input("")
        finally:
            signal.signal(signal.SIGINT, previous)

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
                line = self._read()
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
                    message += " (/reset starts a new conversation; -c sets the context size)"
                say(f"kvformer: error: {message}")

    def handle(self, line: str) -> bool:
        """One line: a command or a message. False to leave."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/") and not text.startswith("//"):
            name, _, arg = text.partition(" ")
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
        stream = self.session.send(text, self.max_new_tokens, stop=stop)
        try:
            with hidden, (stop or contextlib.nullcontext()):
                for piece in stream:
                    out.write(piece)
                    out.flush()
        except KeyboardInterrupt:
            if not self.interactive:
                raise
        finally:
            stream.close()  # a stream left part way records its partial answer now
        out.write("\n")
        out.flush()
        last = self.session.last
        if last is not None and last.cut:
            say("[answer cut: it stays in the conversation as far as it went]")

    # -- commands --------------------------------------------------------------------------
    def cmd_help(self, arg: str) -> None:
        width = max(len(f"{n} {a}") for n, (a, _) in COMMANDS.items())
        for name, (argument, what) in COMMANDS.items():
            say(f"  {f'{name} {argument}':<{width}}  {what}")
        say("  Ctrl-C stops an answer; Ctrl-D leaves.")

    def cmd_reset(self, arg: str) -> None:
        self.session.reset()
        say("new conversation (KV cache cleared" +
            ("; the system message stays)" if self.session.system else ")"))

    def cmd_system(self, arg: str) -> None:
        if not arg:
            say(f"system message: {self.session.system or '(none)'}")
            return
        self.session.set_system(arg)
        say("system message set (the next answer reads the conversation with it)")

    def cmd_save(self, arg: str) -> None:
        if not arg:
            raise KvformerError("/save needs a file name: /save FILE")
        path = self.session.save(arg, model=self.model_name)
        say(f"saved {len(self.session.messages)} messages to {path}")

    def cmd_load(self, arg: str) -> None:
        if not arg:
            raise KvformerError("/load needs a file name: /load FILE")
        n = self.session.load(arg)
        say(f"loaded {n} messages from {arg}")

    def cmd_stats(self, arg: str) -> None:
        for line in stats_lines(self.session):
            say(line)


def stats_lines(session: ChatSession) -> list[str]:
    cache = session.cache
    answers = sum(m["role"] == "assistant" for m in session.messages)
    used = cache.nbytes * cache.length // cache.max_len
    lines = [f"conversation: {len(session.messages)} messages, {answers} answer"
             f"{'' if answers == 1 else 's'}, "
             f"{session.total_new_tokens} tokens generated",
             f"KV cache: {cache.length} of {cache.max_len} tokens "
             f"({100 * cache.length / cache.max_len:.1f}%), {human_bytes(used)} of "
             f"{human_bytes(cache.nbytes)} ({cache.format.name})"]
    last = session.last
    if last is not None:
        rate = last.tokens_per_s
        lines.append(
            f"last answer: {last.new_tokens} tokens in {last.prefill_s + last.decode_s:.2f} s"
            + (f" ({rate:.1f} tokens/s after the first)" if rate else "")
            + (", cut" if last.cut else ""))
        lines.append(f"last prompt: {last.fed} tokens read in {last.prefill_s:.2f} s, "
                     f"{last.reused} reused from the cache")
    if session.spec:
        lines.append(session.spec_stats.line())
    return lines
