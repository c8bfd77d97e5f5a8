"""A chat-template worker process (``kvformer.formats.tokenizer.isolated`` starts it): render
requests on stdin, results on stdout, until stdin closes; its address space is capped at its
own size plus ``memory_mb`` once the sandbox is built."""

from __future__ import annotations

import marshal
import resource
import signal
import sys

from kvformer.errors import ChatTemplateError
from kvformer.formats.tokenizer import template
from kvformer.formats.tokenizer.isolated import _LEN, _OK, _TEMPLATE_ERROR, _memory_in_use


def _worker(memory_mb: int) -> None:
    template._sandbox()  # built once, outside the cap
    template._limits.isolate = False  # this process is the isolation
    if memory_mb > 0:
        base = _memory_in_use()
        if base:
            limit = base + memory_mb * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    while True:
        head = stdin.read(_LEN.size)
        if len(head) < _LEN.size:
            return
        (n,) = _LEN.unpack(head)
        source, messages, add_generation_prompt, time_limit, variables = marshal.loads(
            stdin.read(n))
        try:
            text = template.render_chat_template(source, messages, add_generation_prompt,
                                                 time_limit=time_limit, **variables)
            status = _OK
        except ChatTemplateError as exc:
            text, status = str(exc), _TEMPLATE_ERROR
        except MemoryError:
            text, status = ("the chat template was stopped (it allocated more than "
                            f"{memory_mb} MB); pass a template you trust"), _TEMPLATE_ERROR
        data = text.encode("utf-8", "surrogatepass")
        stdout.write(status + _LEN.pack(len(data)) + data)
        stdout.flush()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _worker(int(sys.argv[1]) if len(sys.argv) > 1 else 256)
