"""Text <-> token ids: `Tokenizer` and `ByteTokenizer`, read from GGUF or tokenizer.json.

`Tokenizer` wraps a Hugging Face `tokenizers.Tokenizer` (the BPE itself runs in Rust: byte-level
BPE as GPT-2, Llama 3, Qwen and SmolLM use, and SentencePiece BPE as Llama 2, Mistral, Phi-3
and Gemma use) and adds
what an inference engine needs around it: which token starts and ends a sequence, which tokens
stop generation, a decoder that streams whole characters (`stream`), and chat templates rendered
in a sandbox (`template`; templates ship inside model files, so they are untrusted code).

Sources: a GGUF file's metadata (`Tokenizer.from_gguf`; SentencePiece vocabularies are built by
`sentencepiece`), a Hugging Face tokenizer directory
(`Tokenizer.from_dir`) or a bare `tokenizer.json` (`Tokenizer.from_file`). `ByteTokenizer` is the
same interface over raw UTF-8 bytes, for models trained from scratch.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from types import EllipsisType
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from kvformer.errors import CheckpointError
from kvformer.formats.gguf.reader import read_metadata
from kvformer.formats.tokenizer.sentencepiece import (
    _NORMAL,
    _added_tokens,
    _sentencepiece_backend,
)
from kvformer.formats.tokenizer.stream import StreamDecoder
from kvformer.formats.tokenizer.template import (
    CHAT_ROLES,
    CHATML_TEMPLATE,
    _check_messages,
    _plain,
    render_chat_template,
)

__all__ = [
    "ByteTokenizer",
    "Tokenizer",
]

# Tokens that end a turn in common chat formats; any of them in a vocabulary stops generation.
END_MARKERS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|endoftext|>", "<|end_of_text|>", "<|end|>",
    "<end_of_turn>", "<end_of_utterance>", "<EOT>", "<｜end▁of▁sentence｜>",
)

# encode_chat's placeholder for a special token's spelling inside a message: two Unicode
# noncharacters around the index of the escaped text (a noncharacter in the text is escaped too)
_ESC_OPEN, _ESC_CLOSE = "\ufdd0", "\ufdd1"
_ESC_SPLIT = re.compile(f"{_ESC_OPEN}(\\d+){_ESC_CLOSE}")


# --------------------------------------------------------------------------------------------
# Byte-level BPE building blocks
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def byte_alphabet() -> tuple[str, ...]:
    """GPT-2's printable stand-in for each byte value (index = byte).

    Bytes that are visible Latin-1 characters stand for themselves; the rest (controls, space,
    0x7F-0xA0, 0xAD) are moved to U+0100 onwards in byte order, so every byte has a visible,
    whitespace-free spelling. Byte-level vocabularies are written in this alphabet.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    spelled = {b: chr(b) for b in kept}
    extra = 0
    for b in range(256):
        if b not in spelled:
            spelled[b] = chr(256 + extra)
            extra += 1
    return tuple(spelled[b] for b in range(256))


def _vocab(tokens: list[str], raw: set[int], alphabet: frozenset[str],
           table: tuple[str, ...]) -> dict[str, int]:
    """token -> id, each ordinary token in its byte-alphabet spelling (a later duplicate
    wins). Most files store every ordinary token spelled so already: one scan of all of
    them says so, and only the others are looked at one by one."""
    vocab = dict(zip(tokens, range(len(tokens))))
    if len(vocab) == len(tokens) and set("".join(tokens)) <= alphabet:
        return vocab  # raw (added) tokens in the alphabet are spelled the same either way
    return {token if index in raw else _respell(token, alphabet, table): index
            for index, token in enumerate(tokens)}


def _respell(token: str, alphabet: frozenset[str], table: tuple[str, ...]) -> str:
    """A token written in raw text becomes its byte-alphabet spelling (others pass unchanged)."""
    if set(token) <= alphabet:
        return token
    return "".join(table[b] for b in token.encode("utf-8"))


# The split regexes below are the models' own definitions (the same ones llama.cpp and the
# models' tokenizer.json files use). They differ in how they group digits and punctuation.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_split():
    """GPT-2's own split: letters, runs of digits, punctuation, each with one leading space."""
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2_split():
    """GPT-2's split after isolating every digit (StarCoder and SmolLM vocabularies)."""
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


# llama.cpp's split for a byte-level file that names no pre-tokenizer (or "default"): runs of
# punctuation (and $+<=>^~|) first, then GPT-2's split of each remaining piece, then runs of
# digits, then groups of three ASCII digits. Each regex splits the pieces the previous ones
# left, and text no regex matches stays a piece of its own.
_LLAMA_CPP_DEFAULT_SPLITS = (
    r"[\p{P}\$\+<=>\^~\|]+",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
    r"\p{N}+",
    r"[0-9][0-9][0-9]",
)


def _regex_split(*patterns: str):
    def build():
        return pre_tokenizers.Sequence([
            *(pre_tokenizers.Split(Regex(p), behavior="isolated") for p in patterns),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    return build


# tokenizer.ggml.pre names, grouped as llama.cpp groups them:
# (names, pre-tokenizer factory, ignore_merges, add BOS when the file does not say).
# Llama 3 looks whole words up in the vocabulary before merging (ignore_merges) and adds BOS.
# "default" (a file that names no pre-tokenizer) gets llama.cpp's default split, so that a
# GGUF file encodes as llama.cpp encodes it ("gpt2", kvformer's own alias, is GPT-2's split).
_PRE_TOKENIZER_FAMILIES = (
    (("default",), _regex_split(*_LLAMA_CPP_DEFAULT_SPLITS), False, False),
    (("gpt2", "gpt-2", "phi-2", "mpt", "olmo"), _gpt2_split, False, False),
    (("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"),
     _digits_then_gpt2_split, False, False),
    (("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "lfm2"),
     _regex_split(_LLAMA3_SPLIT), True, True),
    (("qwen2", "deepseek-r1-qwen", "kormo", "megrez"), _regex_split(_QWEN2_SPLIT), False, False),
)
_GGUF_PRE_TOKENIZERS = {name: spec for names, *spec in _PRE_TOKENIZER_FAMILIES for name in names}


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

def _not_unicode() -> ValueError:
    return ValueError("the text is not valid Unicode (it contains lone surrogates, e.g. from "
                      "bytes decoded with errors='surrogateescape'); clean it before encoding")


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: unreadable JSON ({exc}); the file may be corrupt") from exc


def _token_content(value: Any) -> str | None:
    """tokenizer_config.json spells a special token as a string or as {'content': ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _added_by_post_processor(backend: tokenizers.Tokenizer) -> tuple[int | None, int | None]:
    """The single id a tokenizer.json's post-processor puts before / after the text, if any."""
    plain = backend.encode("a", add_special_tokens=False).ids
    full = backend.encode("a", add_special_tokens=True).ids
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            before, after = full[:start], full[start + len(plain):]
            return (before[0] if len(before) == 1 else None,
                    after[0] if len(after) == 1 else None)
    return None, None


def _template_from_config(value: Any) -> str | None:
    """`chat_template` is a string, or a list of named templates of which 'default' is used."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, Mapping)}
        chosen = named.get("default") or next(iter(named.values()), None)
        return chosen if isinstance(chosen, str) else None
    return None

# Texts longer than this are encoded with `encode_batch`, which releases the GIL (`encode`
# holds it: a megabyte held a server's event loop for seconds, even from another thread).
_LONG_TEXT = 4096

# the parts of a tokenizers pipeline that keep every character of the text (a normalizer or
# pre-tokenizer of another kind may drop some: whitespace collapsing, a charsmap, a split
# that removes its matches)
_KEEPING_STEPS = {"Sequence", "Prepend", "ByteLevel", "Metaspace", "Digits", "Split",
                  "Punctuation", "UnicodeScripts"}


def _keeps_every_char(step: Any) -> bool:
    if step is None:
        return True
    if step.get("type") not in _KEEPING_STEPS or step.get("behavior") == "Removed":
        return False
    inner = step.get("normalizers") or step.get("pretokenizers") or ()
    return all(_keeps_every_char(s) for s in inner)


def _max_chars_per_token(backend: tokenizers.Tokenizer) -> int | None:
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or (model.get("unk_token") and model.get("fuse_unk")):
        return None
    if not (_keeps_every_char(spec.get("normalizer"))
            and _keeps_every_char(spec.get("pre_tokenizer"))):
        return None
    return max(map(len, backend.get_vocab(with_added_tokens=True)), default=1) or 1


class Tokenizer:
    """A tokenizer plus the model's conventions around it (BOS/EOS, stop tokens, chat format).

    Build it with `from_gguf`, `from_dir` or `from_file`; `save` writes a directory that
    `from_dir` reads back. Ids are plain ints; `id_to_token` returns the vocabulary's spelling
    (byte-level BPE writes a space as 'Ġ'), `decode` returns text.
    """

    def __init__(self, backend: tokenizers.Tokenizer, *, bos_id: int | None = None,
                 eos_id: int | None = None, pad_id: int | None = None, add_bos: bool = False,
                 add_eos: bool = False, chat_template: str | None = None,
                 extra_stop_ids: Iterable[int] = ()):
        self._backend = backend
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        for name, value in (("bos", bos_id), ("eos", eos_id), ("pad", pad_id)):
            if value is not None and not 0 <= value < self._vocab_size:
                raise CheckpointError(f"the {name} token id {value} is outside the vocabulary "
                                      f"(size {self._vocab_size}); the tokenizer files disagree")
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.add_bos = bool(add_bos) and bos_id is not None
        self.add_eos = bool(add_eos) and eos_id is not None
        self.chat_template = chat_template
        stops = {i for i in extra_stop_ids if 0 <= i < self._vocab_size}
        if eos_id is not None:
            stops.add(eos_id)
        for marker in END_MARKERS:
            marker_id = backend.token_to_id(marker)
            if marker_id is not None:
                stops.add(marker_id)
        self._stop_ids = frozenset(stops)

    # ---- construction ------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path_or_metadata: str | os.PathLike | Mapping[str, Any]) -> Tokenizer:
        """Build from a GGUF file (or its metadata from `checkpoints.gguf.read_metadata`).

        Supports SentencePiece BPE vocabularies (`tokenizer.ggml.model == 'llama'`: scores,
        byte fallback, the '▁' space; see `_sentencepiece_backend`) and byte-level BPE
        vocabularies (`tokenizer.ggml.model == 'gpt2'`) whose
        `tokenizer.ggml.pre` is in `_PRE_TOKENIZER_FAMILIES` (default, gpt2, smollm and other
        digit-splitting ones, llama-bpe and qwen2 with their aliases); others are refused.
        Control and unknown tokens (types 3 and 2) become special tokens and user-defined ones
        (type 4) added tokens, so chat markers in text map to one id each. The ids are
        llama.cpp's for the same file (tests/test_tokenizer_llama_cpp.py).
        """
        if isinstance(path_or_metadata, Mapping):
            meta, where = path_or_metadata, "GGUF metadata"
        else:
            meta, where = read_metadata(path_or_metadata), os.fspath(path_or_metadata)

        model = meta.get("tokenizer.ggml.model")
        if model is None:
            raise CheckpointError(f"{where}: the file has no tokenizer (tokenizer.ggml.model is "
                                  "missing); load the tokenizer from a tokenizer.json directory")
        if model == "llama":
            return cls._from_gguf_backend(_sentencepiece_backend(meta, where), meta, True)
        if model != "gpt2":
            raise CheckpointError(
                f"{where}: tokenizer.ggml.model is {model!r}, which kvformer does not read from "
                "GGUF (it reads byte-level BPE, 'gpt2', and SentencePiece BPE, 'llama'); load "
                "the original model's tokenizer.json with Tokenizer.from_dir instead")
        pre = meta.get("tokenizer.ggml.pre") or "default"
        if pre not in _GGUF_PRE_TOKENIZERS:
            raise CheckpointError(
                f"{where}: unknown pre-tokenizer tokenizer.ggml.pre = {pre!r} (supported: "
                f"{', '.join(sorted(_GGUF_PRE_TOKENIZERS))}); tokenizing with the wrong split "
                "would silently change the ids, so load the model's tokenizer.json instead")
        split, ignore_merges, bos_default = _GGUF_PRE_TOKENIZERS[pre]

        tokens = meta.get("tokenizer.ggml.tokens")
        merges = meta.get("tokenizer.ggml.merges")
        if not tokens or merges is None:
            raise CheckpointError(f"{where}: the tokenizer has no "
                                  f"{'tokens' if not tokens else 'merges'}; the file is incomplete")
        types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        if len(types) != len(tokens):
            raise CheckpointError(f"{where}: {len(tokens)} tokens but {len(types)} token types; "
                                  "the file is corrupt")

        # Ordinary tokens must be in the byte alphabet for BPE to reach them; added tokens stay
        # raw (that is how they are matched in text), keeping their ids either way.
        table = byte_alphabet()
        alphabet = frozenset(table)
        matched = _added_tokens(tokens, types)
        raw = {index for index, _, _ in matched}
        vocab = _vocab(tokens, raw, alphabet, table)
        added = [AddedToken(token, special=special, normalized=False)
                 for _, token, special in matched]
        pairs = [tuple(merge.split(" ")) for merge in merges]
        for merge, pair in zip(merges, pairs):
            if len(pair) != 2:
                raise CheckpointError(f"{where}: malformed merge {merge!r}; the file is corrupt")

        backend = tokenizers.Tokenizer(models.BPE(
            vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False,
            ignore_merges=ignore_merges))
        backend.pre_tokenizer = split()
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([t for t in added if t.special])
        backend.add_tokens([t for t in added if not t.special])
        return cls._from_gguf_backend(backend, meta, bos_default)

    @classmethod
    def _from_gguf_backend(cls, backend: tokenizers.Tokenizer, meta: Mapping[str, Any],
                           bos_default: bool) -> Tokenizer:
        """The special ids, BOS/EOS flags and chat template a GGUF's metadata gives."""
        add_bos = meta.get("tokenizer.ggml.add_bos_token")
        extra_stops = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")]
        return cls(
            backend,
            bos_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_id=meta.get("tokenizer.ggml.eos_token_id"),
            pad_id=meta.get("tokenizer.ggml.padding_token_id"),
            add_bos=bos_default if add_bos is None else add_bos,
            add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
            extra_stop_ids=[i for i in extra_stops if isinstance(i, int)],
        )

    @classmethod
    def from_file(cls, tokenizer_json: str | os.PathLike) -> Tokenizer:
        """Build from a bare `tokenizer.json`; BOS/EOS are guessed from its post-processor."""
        return cls._from_json(os.fspath(tokenizer_json), {}, None, ())

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Build from a Hugging Face-style directory (or one written by `save`).

        Reads `tokenizer.json`, `tokenizer_config.json` (special tokens, add_bos/eos_token, chat
        template), `chat_template.jinja` / `chat_template.json` if present, and the eos ids of
        `generation_config.json` as extra stop tokens.
        """
        path = os.fspath(path)
        json_path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(json_path):
            hint = (" (it has a SentencePiece tokenizer.model, which kvformer does not read)"
                    if os.path.isfile(os.path.join(path, "tokenizer.model")) else "")
            raise CheckpointError(f"{path}: no tokenizer.json{hint}; a tokenizer directory needs "
                                  "one (transformers' save_pretrained writes it)")
        config_path = os.path.join(path, "tokenizer_config.json")
        config = _read_json(config_path) if os.path.isfile(config_path) else {}
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: expected a JSON object; the file is corrupt")

        template = _template_from_config(config.get("chat_template"))
        jinja_path = os.path.join(path, "chat_template.jinja")
        legacy_path = os.path.join(path, "chat_template.json")
        if os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        elif os.path.isfile(legacy_path):
            legacy = _read_json(legacy_path)
            template = _template_from_config(
                legacy.get("chat_template") if isinstance(legacy, dict) else None) or template

        stops: list[int] = []
        gen_path = os.path.join(path, "generation_config.json")
        if os.path.isfile(gen_path):
            gen = _read_json(gen_path)
            eos = gen.get("eos_token_id") if isinstance(gen, dict) else None
            stops = [eos] if isinstance(eos, int) else [i for i in eos or () if isinstance(i, int)]
        return cls._from_json(json_path, config, template, stops)

    @classmethod
    def _from_json(cls, json_path: str, config: Mapping[str, Any], template: str | None,
                   stops: Iterable[int]) -> Tokenizer:
        if not os.path.isfile(json_path):
            raise CheckpointError(f"{json_path}: no such tokenizer file")
        try:
            backend = tokenizers.Tokenizer.from_file(json_path)
        except Exception as exc:  # the Rust side raises a bare Exception
            raise CheckpointError(f"{json_path}: not a readable tokenizer.json ({exc}); the file "
                                  "may be corrupt or from a newer `tokenizers`") from exc

        def lookup(key: str) -> int | None:
            token = _token_content(config.get(key))
            if token is None:
                return None
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise CheckpointError(f"{json_path}: tokenizer_config's {key} {token!r} is not in "
                                      "the vocabulary; the tokenizer files do not match")
            return token_id

        bos_id, eos_id, pad_id = lookup("bos_token"), lookup("eos_token"), lookup("pad_token")
        # The flags in tokenizer_config win; otherwise the post-processor says what it adds.
        head, tail = _added_by_post_processor(backend)
        bos_id = head if bos_id is None else bos_id
        eos_id = tail if eos_id is None else eos_id
        add_bos = config.get("add_bos_token")
        if add_bos is None:
            add_bos = head is not None and head == bos_id
        add_eos = config.get("add_eos_token")
        if add_eos is None:
            add_eos = tail is not None and tail == eos_id
        backend.post_processor = None  # encode() adds BOS/EOS itself, once
        extra = [backend.token_to_id(t) for t in config.get("kvformer_stop_tokens", ())]
        return cls(backend, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id, add_bos=add_bos,
                   add_eos=add_eos, chat_template=template,
                   extra_stop_ids=[*stops, *(i for i in extra if i is not None)])

    def save(self, path: str | os.PathLike) -> None:
        """Write `tokenizer.json` and `tokenizer_config.json` (with the chat template) to `path`.

        The directory reads back with `from_dir`, and with transformers' AutoTokenizer.
        """
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self._backend.save(os.path.join(path, "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self._spelling(self.bos_id),
            "eos_token": self._spelling(self.eos_id),
            "pad_token": self._spelling(self.pad_id),
            "add_bos_token": self.add_bos,
            "add_eos_token": self.add_eos,
            "kvformer_stop_tokens": sorted(self._spelling(i) for i in self._stop_ids),
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)
            f.write("\n")

    # ---- vocabulary ----------------------------------------------------------------------------

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer` (its post-processor is off: see `encode`)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def max_chars_per_token(self) -> int | None:
        """The most characters of text one token can stand for: the longest vocabulary entry
        (a byte-level entry spells one byte per character, a SentencePiece one a character
        per character or a byte as '<0xNN>', an added token its text). None where no such
        bound holds: a normalizer or pre-tokenizer that may drop characters (collapsing
        spaces, a charsmap), or unknown characters fused into one token. A text longer than
        ``n * max_chars_per_token`` has more than ``n`` tokens, known without encoding it."""
        if getattr(self, "_max_chars", False) is False:
            self._max_chars = _max_chars_per_token(self._backend)
        return self._max_chars

    @property
    def stop_ids(self) -> frozenset[int]:
        """Ids that end generation: EOS plus every end-of-turn marker in the vocabulary."""
        return self._stop_ids

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def _spelling(self, token_id: int | None) -> str | None:
        return None if token_id is None else self._backend.id_to_token(token_id)

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special (control) tokens."""
        decoder = self._backend.get_added_tokens_decoder()
        return frozenset(i for i, t in decoder.items() if t.special)

    def token_bytes(self) -> list[bytes]:
        """What each id (the list's index) adds to generated text, as bytes, whole or part
        of a character: what a grammar matches tokens against. Byte-level vocabularies spell
        bytes in `byte_alphabet`; SentencePiece ones write a space as '▁' and a byte as
        '<0xNN>'; added tokens (special ones too) are their text. A gap in the ids is b''."""
        if getattr(self, "_token_bytes", None) is None:
            decoder = json.dumps(json.loads(self._backend.to_str()).get("decoder"))
            if '"ByteLevel"' in decoder:
                index = {c: b for b, c in enumerate(byte_alphabet())}

                def spell(piece: str) -> bytes:
                    if all(c in index for c in piece):
                        return bytes(index[c] for c in piece)
                    return piece.encode("utf-8")
            elif '"ByteFallback"' in decoder or "▁" in decoder:
                def spell(piece: str) -> bytes:
                    if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
                        return bytes([int(piece[3:5], 16)])
                    return piece.replace("▁", " ").encode("utf-8")
            else:
                raise ValueError("token_bytes knows byte-level BPE and SentencePiece "
                                 f"vocabularies; this tokenizer's decoder is {decoder}")
            added = self._backend.get_added_tokens_decoder()
            table = []
            for i in range(self._vocab_size):
                piece = self._backend.id_to_token(i)
                table.append(b"" if piece is None else added[i].content.encode("utf-8")
                             if i in added else spell(piece))
            self._token_bytes = table
        return self._token_bytes

    def _token_text(self, token_id: int | None) -> str | None:
        """A token as text (what a template should write to produce it), not its spelling."""
        if token_id is None:
            return None
        return self._backend.decode([token_id], skip_special_tokens=False)

    @property
    def bos_token(self) -> str | None:
        return self._token_text(self.bos_id)

    @property
    def eos_token(self) -> str | None:
        return self._token_text(self.eos_id)

    # ---- text <-> ids --------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their single ids.

        With `add_special_tokens`, BOS/EOS are added only if the model asks for them, and BOS is
        not doubled when the text already starts with it (as rendered chat prompts often do).
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._encode_text(text)
        if add_special_tokens:
            if self.add_bos and (not ids or ids[0] != self.bos_id):
                ids.insert(0, self.bos_id)
            if self.add_eos:
                ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 (e.g. a cut-off emoji) becomes U+FFFD."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self._vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary (size "
                                 f"{self._vocab_size}); mask logits past vocab_size when sampling")
        return self._decode_ids(ids, skip_special_tokens)

    def _encode_text(self, text: str) -> list[int]:
        try:
            if len(text) > _LONG_TEXT:  # the batch call lets go of the GIL while it runs
                return self._backend.encode_batch([text], add_special_tokens=False)[0].ids
            return self._backend.encode(text, add_special_tokens=False).ids
        except TypeError:  # the Rust side refuses lone surrogates this way
            raise _not_unicode() from None

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """An incremental decoder for generation: `.push(id) -> str`, `.flush() -> str`."""
        return StreamDecoder(self, skip_special_tokens)

    # ---- chat ----------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True, **extra: Any) -> str:
        """Render `messages` ([{'role': ..., 'content': ...}, ...]) into a prompt string.

        Uses the model's own template, or ChatML (`CHATML_TEMPLATE`) when the model ships none.
        The template runs sandboxed: escape attempts, `raise_exception(...)` calls and render
        failures raise ChatTemplateError; malformed messages raise ValueError. `extra` reaches
        the template as variables (e.g. `tools=[...]`). Encode the result with
        `add_special_tokens=False` when the template writes the BOS itself.
        """
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                     "pad_token": self._token_text(self.pad_id) or ""}
        variables.update(extra)
        return render_chat_template(self.chat_template or CHATML_TEMPLATE, messages,
                                    add_generation_prompt, **variables)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]],
                    add_generation_prompt: bool = True, *,
                    roles: Iterable[str] | None = CHAT_ROLES,
                    time_limit: float | None | EllipsisType = ..., **extra: Any) -> list[int]:
        """The token ids of a conversation's prompt, where only the template's own markup
        becomes control tokens: a special token written inside a message (or a tool
        description) is encoded as its plain characters, so no one can forge a turn of
        another role by typing its markers. `roles` are the accepted message roles (None:
        any); an unknown one is a ValueError. No BOS is added beyond what the template writes.
        """
        checked = _check_messages(messages)
        if roles is not None:
            allowed = tuple(roles)
            for i, m in enumerate(checked):
                if m["role"] not in allowed:
                    raise ValueError(f"messages[{i}] has the role {m['role']!r}; use one of "
                                     f"{', '.join(allowed)}")
        literals: list[str] = []
        guard = self._guard_pattern()

        def escape(value: Any) -> Any:  # each protected spelling -> a numbered placeholder
            if isinstance(value, str):
                def keep(match: re.Match) -> str:
                    literals.append(match.group())
                    return f"{_ESC_OPEN}{len(literals) - 1}{_ESC_CLOSE}"

                return guard.sub(keep, value)
            if isinstance(value, Mapping):
                return {k: escape(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [escape(v) for v in value]
            return value

        safe = escape(checked)
        for key in ("tools", "documents"):
            if key in extra:
                extra[key] = escape(_plain(extra[key], key))
        variables = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "",
                     "pad_token": self._token_text(self.pad_id) or ""}
        variables.update(extra)
        text = render_chat_template(self.chat_template or CHATML_TEMPLATE, safe,
                                    add_generation_prompt, time_limit=time_limit, **variables)
        # The template's special tokens cut the prompt into stretches of text, each encoded as
        # a whole with the escaped spellings put back as plain characters: the ids `encode`
        # would give if those spellings were not special (a stretch's '▁' prefix and its
        # pre-tokenizer split do not see the escapes).
        ids: list[int] = []
        stretch: list[str] = []

        def flush() -> None:
            joined = "".join(stretch)
            if joined:
                ids.extend(self.encode_plain(joined))
            stretch.clear()

        specials = self._guard_pattern(markers=False)
        pieces = _ESC_SPLIT.split(text)  # text, index, text, index, ..., text
        for i, piece in enumerate(pieces):
            if i % 2:
                stretch.append(literals[int(piece)])
                continue
            start = 0
            for match in specials.finditer(piece) if specials else ():
                stretch.append(piece[start:match.start()])
                flush()
                ids.append(self.token_to_id(match.group()))
                start = match.end()
            stretch.append(piece[start:])
        flush()
        return ids

    def _guard_pattern(self, markers: bool = True) -> re.Pattern | None:
        """The spellings encode_chat escapes: the special tokens' (longest first), and with
        `markers` its own markers; None for no special token and no markers."""
        cache = "_guard_re" if markers else "_specials_re"
        if getattr(self, cache, None) is None:
            spelled = sorted(self.special_strings, key=len, reverse=True)
            spelled = [*map(re.escape, spelled), *((_ESC_OPEN, _ESC_CLOSE) if markers else ())]
            setattr(self, cache, re.compile("|".join(spelled)) if spelled else False)
        return getattr(self, cache) or None

    @property
    def special_strings(self) -> tuple[str, ...]:
        """How the special (control) tokens are spelled: text that `encode` turns into
        control tokens, and that `encode_plain` and `encode_chat` keep as characters."""
        decoder = self._backend.get_added_tokens_decoder()
        return tuple(t.content for _, t in sorted(decoder.items()) if t.special)

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` with no special tokens: their spellings are just characters."""
        if not any(s in text for s in self.special_strings):
            return self._encode_text(text)
        if getattr(self, "_plain_backend", None) is None:
            plain = tokenizers.Tokenizer.from_str(self._backend.to_str())
            plain.encode_special_tokens = True
            self._plain_backend = plain
        try:
            if len(text) > _LONG_TEXT:  # as in _encode_text: without the GIL
                return self._plain_backend.encode_batch([text], add_special_tokens=False)[0].ids
            return self._plain_backend.encode(text, add_special_tokens=False).ids
        except TypeError:
            raise _not_unicode() from None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, add_bos={self.add_bos})")


class ByteTokenizer(Tokenizer):
    """Every UTF-8 byte is a token (ids 0-255); `specials` get ids 256, 257, ... in order.

    For models trained from scratch: no vocabulary to learn and any text round-trips. Encoding is
    `text.encode('utf-8')` with specials cut out first (longest match wins); decoding is
    `bytes.decode('utf-8', errors='replace')`, both in plain Python, which beats a BPE pass over
    every byte. `bos_token`/`eos_token`/`pad_token`, if given, join the specials when missing.
    `save` writes an equivalent byte-level tokenizer.json, so `Tokenizer.from_dir` reads it back.
    """

    def __init__(self, specials: Iterable[str] = (), *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 add_bos: bool = False, chat_template: str | None = None):
        names = list(dict.fromkeys(specials))
        names += [t for t in (bos_token, eos_token, pad_token) if t is not None and t not in names]
        if not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"special tokens must be non-empty strings, got {names!r}")
        table = byte_alphabet()
        backend = tokenizers.Tokenizer(models.BPE(
            vocab={char: byte for byte, char in enumerate(table)}, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
        self._special_ids = {name: 256 + i for i, name in enumerate(names)}
        self._special_names = names
        longest_first = sorted(names, key=len, reverse=True)
        self._special_re = (re.compile("|".join(map(re.escape, longest_first)))
                            if names else None)
        ids = self._special_ids
        super().__init__(backend, bos_id=ids.get(bos_token), eos_id=ids.get(eos_token),
                         pad_id=ids.get(pad_token), add_bos=add_bos, chat_template=chat_template)

    def _encode_text(self, text: str) -> list[int]:
        try:
            if self._special_re is None:
                return list(text.encode("utf-8"))
            ids: list[int] = []
            start = 0
            for match in self._special_re.finditer(text):
                ids.extend(text[start:match.start()].encode("utf-8"))
                ids.append(self._special_ids[match.group()])
                start = match.end()
            ids.extend(text[start:].encode("utf-8"))
            return ids
        except UnicodeEncodeError:
            raise _not_unicode() from None

    def encode_plain(self, text: str) -> list[int]:
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError:
            raise _not_unicode() from None

    def token_bytes(self) -> list[bytes]:
        return [bytes([i]) for i in range(256)] + [n.encode("utf-8") for n in self._special_names]

    def _decode_ids(self, ids: list[int], skip_special_tokens: bool) -> str:
        parts: list[str] = []
        pending = bytearray()  # bytes run together across skipped specials, as in a full decode
        for i in ids:
            if i < 256:
                pending.append(i)
            elif not skip_special_tokens:
                parts.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
                parts.append(self._special_names[i - 256])
        parts.append(pending.decode("utf-8", errors="replace"))
        return "".join(parts)
