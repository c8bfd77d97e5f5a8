"""Chat templates rendered in worker processes with a hard bound on time and memory.

The sandbox in ``template.py`` checks what a template builds and stops it at a deadline, but
those checks run between Python calls: a single C call (printing, sorting or hashing a huge
value) runs to its end before any of them sees it. A worker process bounds even that: its
address space is capped (``RLIMIT_AS``: the worker's own size plus ``memory_mb``) and a
render that outlasts its time limit plus a grace second is killed; a new worker replaces it.
The checks still run inside the worker, so a template that breaks a rule gets the same
message as before, at once.

The worker itself is ``python -m kvformer.formats.tokenizer.template_worker``: it reads
render requests on stdin and writes results on stdout until stdin closes.
"""

from __future__ import annotations

import marshal
import os
import queue
import select
import struct
import subprocess
import sys
import threading
import time
from typing import Any

from kvformer.errors import ChatTemplateError

_LEN = struct.Struct("<Q")
_OK, _TEMPLATE_ERROR = b"o", b"e"
#: the extra seconds a worker gets past the template's own time limit before it is killed
KILL_GRACE = 1.0


def _memory_in_use() -> int:
    """This process's address space in bytes (VmSize), 0 where /proc is not there."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class _Worker:
    """One worker process and its pipes."""

    def __init__(self, memory_mb: int):
        # the parent's import path, so that the worker finds this kvformer however the
        # parent found it
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvformer.formats.tokenizer.template_worker", str(memory_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env, start_new_session=True)  # a Ctrl-C in the terminal is the parent's
        self.out = self.proc.stdout.fileno()
        self.pending = b""  # read past the last answer (none: a worker answers one at a time)

    def _read(self, n: int, deadline: float) -> bytes:
        data = self.pending
        while len(data) < n:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.out], [], [], left)[0]:
                raise TimeoutError
            chunk = os.read(self.out, max(n - len(data), 1 << 16))
            if not chunk:
                raise EOFError
            data += chunk
        self.pending = data[n:]
        return data[:n]

    def render(self, request: bytes, deadline: float) -> tuple[bytes, str]:
        self.proc.stdin.write(_LEN.pack(len(request)) + request)
        self.proc.stdin.flush()
        head = self._read(1 + _LEN.size, deadline)
        (n,) = _LEN.unpack(head[1:])
        return head[:1], self._read(n, deadline).decode("utf-8", "surrogatepass")

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


class TemplateWorkers:
    """Up to ``size`` worker processes, started when first needed and kept for the next
    render; one that breaks a bound is killed and replaced on the next render."""

    def __init__(self, memory_mb: int = 256, size: int = 4, grace: float = KILL_GRACE):
        self.memory_mb, self.size, self.grace = memory_mb, size, grace
        self._idle: queue.LifoQueue[_Worker] = queue.LifoQueue()
        self._lock = threading.Lock()
        self._started = 0

    def _take(self) -> _Worker:
        with self._lock:
            try:
                return self._idle.get_nowait()
            except queue.Empty:
                pass
            if self._started < self.size:
                self._started += 1
                try:
                    return _Worker(self.memory_mb)
                except BaseException:
                    self._started -= 1
                    raise
        return self._idle.get()  # every worker busy: wait for one

    def _drop(self, worker: _Worker) -> None:
        worker.kill()
        with self._lock:
            self._started -= 1

    def warm(self) -> None:
        """Start one worker now (~0.1 s), so that the first chat request does not wait."""
        self._idle.put(self._take())

    def render(self, template: str, messages: list, add_generation_prompt: bool,
               time_limit: float, variables: dict[str, Any]) -> str:
        request = marshal.dumps((template, messages, add_generation_prompt, time_limit,
                                 variables))
        worker = self._take()
        try:
            status, text = worker.render(request, time.monotonic() + time_limit + self.grace)
        except TimeoutError:
            self._drop(worker)
            raise ChatTemplateError(
                f"the chat template was stopped (it ran for more than {time_limit:g} s); the "
                "model file's template is untrusted: pass a template you trust") from None
        except (EOFError, OSError):
            self._drop(worker)
            code = worker.proc.returncode
            raise ChatTemplateError(
                "the chat template was stopped (its worker process ended"
                f"{'' if code is None else f' with status {code}'}: most likely it used more "
                f"than {self.memory_mb} MB); pass a template you trust") from None
        except BaseException:
            self._drop(worker)
            raise
        self._idle.put(worker)
        if status != _OK:
            raise ChatTemplateError(text)
        return text

    def close(self) -> None:
        while True:
            try:
                self._drop(self._idle.get_nowait())
            except queue.Empty:
                return


