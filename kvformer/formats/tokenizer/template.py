"""Chat templates: Jinja templates rendered in a sandbox with a time and size budget.

Templates ship inside model files, so they are untrusted code: `render_chat_template` runs one
in a locked-down Jinja environment that stops escape attempts, runaway loops and huge
allocations, and sees only plain copies of the messages and variables it is given.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache, wraps
from types import EllipsisType
from typing import Any

from jinja2 import Environment, meta
from jinja2.compiler import CodeGenerator
from jinja2.exceptions import SecurityError, TemplateSyntaxError
from jinja2.ext import Extension, loopcontrols
from jinja2.nodes import EvalContext
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from kvformer.errors import ChatTemplateError
from kvformer.formats.tokenizer.isolated import TemplateWorkers

__all__ = [
    "CHATML_TEMPLATE",
    "CHAT_ROLES",
    "TEMPLATE_MEMORY_MB",
    "TEMPLATE_TIME_LIMIT",
    "render_chat_template",
    "set_template_limits",
]

#: The message roles `Tokenizer.encode_chat` (and so the server) accepts by default.
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")

#: Used when a model ships no chat template: ChatML, the format most small chat models use.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Rendering limits: a template ships inside a model file, so it is untrusted code; it must not
# be able to exhaust memory or time. Every string or list it builds (by `~`, `+`, `*`, `%`,
# a call or a filter) is checked against _MAX_RENDER_CHARS, the ones whose size can be known
# beforehand before they are built; all it builds together against _MAX_BUILT_CHARS; every
# loop iteration, block and call against a deadline (render_chat_template's time_limit).
_MAX_RENDER_CHARS = 4_000_000
_MAX_BUILT_CHARS = 64_000_000
_MAX_REPEAT_ITEMS = 1_000_000
_MAX_POWER_EXPONENT = 1_000
_MAX_INDENT_CHARS = 64
#: Seconds a chat template may take to render (the server and the CLI use it).
TEMPLATE_TIME_LIMIT = 1.0
#: Megabytes of memory a chat template may take beyond its worker process's own.
TEMPLATE_MEMORY_MB = 256


class _Limits:
    """What a render gets unless told otherwise (``set_template_limits``): its time limit,
    and whether it runs in a worker process (``isolated.py``) with a memory cap."""

    time_limit: float | None = TEMPLATE_TIME_LIMIT
    memory_mb: int = TEMPLATE_MEMORY_MB
    isolate: bool = os.name == "posix" and os.environ.get("KVFORMER_TEMPLATE_WORKERS") != "0"
    workers = None  # the isolated.TemplateWorkers, made on the first isolated render


_limits = _Limits()


def set_template_limits(time_limit: float | None = TEMPLATE_TIME_LIMIT,
                        memory_mb: int = TEMPLATE_MEMORY_MB,
                        isolate: bool | None = None) -> None:
    """The limits every later render gets by default: ``time_limit`` seconds (None: none)
    and, in a worker process (``isolate``, on by default on POSIX systems), ``memory_mb``
    megabytes beyond the worker's own size (0: no cap)."""
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"the chat template time limit must be > 0 seconds, not {time_limit}")
    if memory_mb < 0:
        raise ValueError(f"the chat template memory limit must be >= 0 MB, not {memory_mb}")
    with _limits_lock:
        old = _limits.workers
        if old is not None and (memory_mb != _limits.memory_mb or isolate is False):
            _limits.workers = None
            old.close()
        _limits.time_limit, _limits.memory_mb = time_limit, memory_mb
        if isolate is not None:
            _limits.isolate = isolate


_limits_lock = threading.Lock()


def warm_template_workers() -> None:
    """Start a worker now if renders are isolated (a server, so that its first chat request
    does not wait ~0.1 s for one)."""
    if _limits.isolate and _limits.time_limit is not None:
        template_workers().warm()


def template_workers():
    """The worker processes isolated renders run in (started as they are needed)."""
    with _limits_lock:
        if _limits.workers is None:
            _limits.workers = TemplateWorkers(_limits.memory_mb)
        return _limits.workers
# a width or precision of 7+ digits in a %-format or a str.format spec (builds >= 1e6 chars)
_WIDE_FORMAT = re.compile(r"%[-#0 +]*(?:\*|\d{7,})|%[-#0 +]*\d*\.(?:\*|\d{7,})|"
                          r"\{[^{}]*:[^{}]*?\d{7,}")


class _Budget(threading.local):
    """Per thread: the deadline and the characters built by the render running in it."""

    deadline: float | None = None
    time_limit: float = 0.0
    built: int = 0


_budget = _Budget()


def _tick() -> None:
    deadline = _budget.deadline
    if deadline is not None and time.monotonic() > deadline:
        raise SecurityError(f"the template ran for more than {_budget.time_limit:g} s")


def _weight(value: Any, limit: int) -> int:
    """The items and characters a container holds, every reference counted at its full size
    (a list of a million references to one string of a million characters weighs 10^12: what
    printing, sorting or hashing it would cost); stops counting once past ``limit``."""
    total, todo = 0, [value]
    while todo:
        v = todo.pop()
        if isinstance(v, str):
            total += len(v)
        elif isinstance(v, (list, tuple)):
            total += len(v)
            todo.extend(v)
        elif isinstance(v, dict):
            total += len(v)
            todo.extend(v.keys())
            todo.extend(v.values())
        if total > limit:
            break
    return total


def _sized(value: Any) -> Any:
    """Count what a template built against the limits; return it unchanged."""
    if isinstance(value, (str, list, tuple, dict)):
        n = len(value)
        if n > _MAX_RENDER_CHARS:
            raise SecurityError(f"the template built a value of {n:,} items or characters "
                                  f"(the limit is {_MAX_RENDER_CHARS:,})")
        if not isinstance(value, str) and _weight(value, _MAX_RENDER_CHARS) > _MAX_RENDER_CHARS:
            raise SecurityError(f"the template built a value that holds more than "
                                f"{_MAX_RENDER_CHARS:,} items and characters (counting each "
                                "reference in full)")
        _budget.built += n
        if _budget.built > _MAX_BUILT_CHARS:
            raise SecurityError(f"the template built more than {_MAX_BUILT_CHARS:,} "
                                  "characters in all")
    return value


def _would_build(n: int) -> None:
    """Refuse before building a value whose size is known to be too large."""
    if n > _MAX_RENDER_CHARS:
        raise SecurityError(f"the template would build a value of {n:,} items or characters "
                              f"(the limit is {_MAX_RENDER_CHARS:,})")


def _check_numbers(args: Iterable[Any]) -> None:
    """No call needs a number beyond the size limit (`'x'.ljust(10**9)`, `center(10**9)`)."""
    for a in args:
        if isinstance(a, int) and not isinstance(a, bool) and abs(a) > _MAX_RENDER_CHARS:
            raise SecurityError(f"the template passes the number {a} to a call (the limit "
                                  f"is {_MAX_RENDER_CHARS:,})")


def _check_format(fmt: Any) -> None:
    if isinstance(fmt, str) and _WIDE_FORMAT.search(fmt):
        raise SecurityError("the template formats with a width or precision of a million "
                              "characters or more")


def _joined_size(items: Any, sep: Any) -> int:
    if not isinstance(items, (list, tuple)):
        return 0
    sep_len = len(sep) if isinstance(sep, str) else 0
    return sum(len(x) if isinstance(x, str) else 24 for x in items) + sep_len * len(items)


def _replaced_size(text: Any, old: Any, new: Any) -> int:
    if not (isinstance(text, str) and isinstance(old, str) and isinstance(new, str)):
        return 0
    hits = text.count(old) if old else len(text) + 1
    return len(text) + hits * (len(new) - len(old))


def _guard_filter(name: str, func):
    """A Jinja filter with the size checks above before and after it runs."""

    @wraps(func)  # keeps jinja's pass_context / pass_eval_context marks
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _tick()
        _check_numbers([*args, *kwargs.values()])
        # drop the context / eval context / environment jinja passes first (an Undefined
        # raises on hasattr, so test the type)
        plain = [a for a in args if not isinstance(a, (Context, EvalContext, Environment))]
        value = plain[0] if plain else None
        rest = plain[1:]
        if name == "join":
            _would_build(_joined_size(value, rest[0] if rest else kwargs.get("d", "")))
        elif name == "replace" and len(rest) >= 2:
            _would_build(_replaced_size(value, rest[0], rest[1]))
        elif name in ("format", "indent") and isinstance(value, str):
            if name == "format":
                _check_format(value)
            else:
                width = rest[0] if rest else kwargs.get("width", 4)
                per_line = len(width) if isinstance(width, str) else width
                if isinstance(per_line, int):
                    _would_build(len(value) + per_line * (value.count("\n") + 1))
        return _sized(func(*args, **kwargs))

    return guarded


def _raise_exception(message: Any = "") -> None:
    """`raise_exception('...')` in a template: the template rejects the conversation."""
    raise ChatTemplateError(str(message))


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(str(fmt))


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    """Plain JSON (Jinja's own `tojson` HTML-escapes, which corrupts prompts)."""
    if isinstance(indent, str) and len(indent) > _MAX_INDENT_CHARS:
        raise SecurityError(f"tojson's indent is longer than {_MAX_INDENT_CHARS} characters")
    if isinstance(indent, int) and indent > _MAX_INDENT_CHARS:
        raise SecurityError(f"tojson's indent is more than {_MAX_INDENT_CHARS}")
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def _make_dict(*args: Any, **kwargs: Any) -> dict:
    """`dict(...)` for templates, without handing them the `dict` type itself."""
    return dict(*args, **kwargs)


class GenerationTag(Extension):
    """`{% generation %}` marks assistant text for training masks; render its body as is."""

    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


class SafeNamespace(Namespace):
    """`namespace()` that refuses underscore names, so it cannot shadow Python internals."""

    def __init__(*args: Any, **kwargs: Any):  # `self` travels in args, as in Namespace
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            SafeNamespace._check(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        SafeNamespace._check(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r} is not allowed")


class BudgetedCode(CodeGenerator):
    """Jinja's compiler, with a deadline check at the start of every block (so every loop
    iteration and macro call) and a size check on every `~` concatenation."""

    def blockvisit(self, nodes, frame) -> None:
        self.writeline("environment.kvf_tick()")
        super().blockvisit(nodes, frame)

    def visit_Concat(self, node, frame) -> None:
        self.write("environment.kvf_sized(")
        super().visit_Concat(node, frame)
        self.write(")")


class ChatSandbox(ImmutableSandboxedEnvironment):
    code_generator_class = BudgetedCode
    kvf_tick = staticmethod(_tick)
    kvf_sized = staticmethod(_sized)

    # Jinja's sandbox turns a forbidden attribute into a silent Undefined (`{{ x.__class__ }}`
    # renders as ''). A template that reaches for internals is hostile: stop it outright.
    def unsafe_undefined(self, obj: Any, attribute: str):
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed")

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    if len(seq) * n > _MAX_REPEAT_ITEMS:
                        raise SecurityError("the template builds a value that is too large")
        elif (operator == "**" and isinstance(right, (int, float))
              and abs(right) > _MAX_POWER_EXPONENT):
            raise SecurityError("the template raises a number to a too large power")
        elif operator == "+" and isinstance(left, (str, list, tuple)) \
                and isinstance(right, (str, list, tuple)):
            _would_build(len(left) + len(right))
        elif operator == "%" and isinstance(left, str):
            _check_format(left)
            _check_numbers(right if isinstance(right, tuple) else (right,))
        return _sized(super().call_binop(context, operator, left, right))

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
        _tick()
        _check_numbers([*args, *kwargs.values()])
        method = getattr(getattr(__obj, "__wrapped__", __obj), "__name__", "")
        owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
        if isinstance(owner, str):
            if method in ("format", "format_map"):
                _check_format(owner)
            elif method == "join" and args:
                _would_build(_joined_size(list(args[0]) if isinstance(args[0], (
                    list, tuple)) else args[0], owner))
            elif method == "replace" and len(args) >= 2:
                _would_build(_replaced_size(owner, args[0], args[1]))
        return _sized(super().call(__context, __obj, *args, **kwargs))


@lru_cache(maxsize=1)
def _sandbox():
    """The one Jinja environment chat templates run in."""
    env = ChatSandbox(trim_blocks=True, lstrip_blocks=True,
                      extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       namespace=SafeNamespace, dict=_make_dict)
    return env


@lru_cache(maxsize=16)
def _compile(template: str):
    try:
        return _sandbox().from_string(template)
    except TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"the chat template does not parse (line {exc.lineno}: {exc.message}); "
            "fix the template or pass another one") from None


@lru_cache(maxsize=16)
def template_variables(template: str) -> frozenset[str]:
    """The variables a chat template reads from outside (e.g. whether it renders `tools`),
    found by parsing it: nothing of the template runs."""
    try:
        return frozenset(meta.find_undeclared_variables(_sandbox().parse(template)))
    except TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"the chat template does not parse (line {exc.lineno}: {exc.message}); "
            "fix the template or pass another one") from None


def _plain(value: Any, where: str) -> Any:
    """A fresh copy made of JSON types only, so a template sees no objects with methods to abuse."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(k, where): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise ValueError(f"{where} is a {type(value).__name__}; chat templates accept only "
                     "str, int, float, bool, None, lists and dicts")


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of dicts, got a {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty; a chat prompt needs at least one message")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', "
                             f"got a {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{i}] needs a non-empty string 'role' "
                             "(e.g. 'system', 'user', 'assistant')")
        content = message.get("content")
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise ValueError(f"messages[{i}] ({role}) needs a string 'content', "
                             f"got {type(content).__name__}")
        # Drop None fields: templates test for a key's presence, and would print 'None'.
        plain = {k: v for k, v in message.items() if v is not None}
        checked.append(_plain(plain, f"messages[{i}]"))
    return checked


def render_chat_template(template: str, messages: Sequence[Mapping[str, Any]],
                         add_generation_prompt: bool = True, *,
                         time_limit: float | None | EllipsisType = ...,
                         **variables: Any) -> str:
    """Render a chat template in a sandbox; any failure or escape attempt is a ChatTemplateError.

    Templates see `messages`, `add_generation_prompt`, `tools`/`documents` (None unless given),
    whatever else is passed in `variables` (e.g. `bos_token`), the `raise_exception` and
    `strftime_now` functions, and a JSON `tojson` filter. Everything they see is a plain copy.
    A render that runs longer than `time_limit` seconds (None: no limit; left out: the
    limit of `set_template_limits`, 1 s unless changed) or builds too much (see
    _MAX_RENDER_CHARS, _MAX_BUILT_CHARS) is stopped with a ChatTemplateError. A render with
    a time limit runs in a worker process (see isolated.py) that is killed if it outlasts
    the limit or uses more than `set_template_limits`'s memory, whatever the template does.
    """
    if time_limit is ...:
        time_limit = _limits.time_limit
    checked = _check_messages(messages)
    plain_variables = _plain(variables, "chat template variables")
    if time_limit is not None and _limits.isolate:
        return template_workers().render(template, checked, bool(add_generation_prompt),
                                         time_limit, plain_variables)
    context = {"tools": None, "documents": None}
    context.update(plain_variables)
    context.update(messages=checked, add_generation_prompt=bool(add_generation_prompt))
    compiled = _compile(template)
    outer = (_budget.deadline, _budget.time_limit, _budget.built)
    if time_limit is not None:
        _budget.deadline, _budget.time_limit = time.monotonic() + time_limit, time_limit
    _budget.built = 0
    try:
        parts, size = [], 0
        for chunk in compiled.generate(context):
            size += len(chunk)
            if size > _MAX_RENDER_CHARS:
                raise SecurityError(f"the rendered prompt exceeds {_MAX_RENDER_CHARS:,} "
                                    "characters")
            parts.append(chunk)
    except ChatTemplateError:
        raise
    except SecurityError as exc:
        raise ChatTemplateError(
            f"the chat template was stopped ({exc}); the model file's template is untrusted: "
            "pass a template you trust") from None
    except (RecursionError, MemoryError) as exc:
        raise ChatTemplateError(
            f"the chat template was stopped ({type(exc).__name__}: it recursed or allocated "
            "too much); pass a template you trust") from None
    except Exception as exc:  # UndefinedError, TypeError... from inside the template
        raise ChatTemplateError(
            f"the chat template failed to render ({type(exc).__name__}: {exc}); check the "
            "messages it expects or pass another template") from None
    finally:
        _budget.deadline, _budget.time_limit, _budget.built = outer
    return "".join(parts)
