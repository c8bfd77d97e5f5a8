"""Text files -> token ids on disk -> batches.

``prepare_data`` tokenizes every text file once into flat arrays of token ids stored as raw
little-endian ``uint16`` (vocabularies up to 65,536) or ``uint32`` files, read back with
``numpy.memmap`` so a corpus never has to fit in memory. Everything is written under temporary
names and renamed, so a crash mid-way never leaves a half-written data set that a later run
would trust.

The validation split is taken from everywhere in the corpus, not only its end: the token stream
is cut into (up to) ten equal segments and the last ``val_fraction`` of each is held out. A small
single-file corpus still gets a representative held-out set, and a sorted multi-file corpus does
not hold out only its alphabetically last files.

``BatchSampler`` walks the training tokens in non-overlapping windows of ``seq_len + 1`` tokens,
in a fresh random order each epoch (with a random start offset, so window edges move). The
order is a pure function of (seed, epoch), so the whole data position is one integer: the
number of windows consumed. A global batch of ``batch_size`` windows is split into equal,
disjoint slices, one per rank.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kvformer.errors import KvformerError
from kvformer.fileio import write_atomic
from kvformer.formats.tokenizer.tokenizer import ByteTokenizer

META = "meta.json"
DATA_VERSION = 1
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".csv", ".html", ".xml",
                 ".c", ".h", ".js", ".ts", ".java", ".go", ".rs", ".toml", ".yaml", ".yml",
                 ".tex", ".org", ".cfg", ".ini", ".sh")
SEGMENTS = 10


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


# ---------------------------------------------------------------------------------- inputs
def expand_paths(paths) -> list[Path]:
    """Files named directly, plus the text files found (recursively) in named directories and
    glob patterns, sorted within each argument and deduplicated: the same arguments always give
    the same list in the same order."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    found: list[Path] = []
    for arg in paths:
        arg = str(arg)
        if any(ch in arg for ch in "*?["):
            matches = sorted(Path(p) for p in glob.glob(arg, recursive=True))
            files = [p for p in matches if p.is_file()]
            if not files:
                raise KvformerError(f"--data {arg}: the pattern matches no files")
            found.extend(files)
            continue
        path = Path(arg).expanduser()
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file()
                           and p.suffix.lower() in TEXT_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not files:
                raise KvformerError(f"--data {path}: the directory holds no text files "
                                    f"({', '.join(TEXT_SUFFIXES[:5])}, ...)")
            found.extend(files)
        else:
            raise KvformerError(f"--data {arg}: no such file or directory")
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise KvformerError("no training data: give --data with at least one text file")
    return unique


def _fingerprint(files: list[Path], tokenizer_id: str, val_fraction: float) -> str:
    h = hashlib.sha256()
    h.update(f"v{DATA_VERSION}|{tokenizer_id}|{val_fraction!r}".encode())
    for f in files:
        st = f.stat()
        h.update(f"|{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def tokenizer_id(tokenizer) -> str:
    """Identifies a tokenizer well enough to know when token files must be rebuilt."""
    backend = getattr(tokenizer, "backend", None)
    text = backend.to_str() if backend is not None else repr(tokenizer)
    extra = f"{getattr(tokenizer, 'eos_id', None)}|{getattr(tokenizer, 'vocab_size', None)}"
    return hashlib.sha256((text + extra).encode()).hexdigest()[:16]


def _is_plain_bytes(tokenizer) -> bool:
    """A ByteTokenizer without special tokens: ids are exactly the UTF-8 bytes."""
    return isinstance(tokenizer, ByteTokenizer) and tokenizer.vocab_size == 256


def encode_document(tokenizer, text: str) -> list[int] | np.ndarray:
    """One document's ids, with the end-of-sequence token after it when the vocabulary has one
    (so the model learns where documents end); byte vocabularies get a newline instead when the
    text does not end with one."""
    if _is_plain_bytes(tokenizer):  # same ids as tokenizer.encode(text), much faster
        raw = text.encode("utf-8")
        if raw and not raw.endswith(b"\n"):
            raw += b"\n"
        return np.frombuffer(raw, dtype=np.uint8)
    ids = tokenizer.encode(text, add_special_tokens=False)
    eos = getattr(tokenizer, "eos_id", None)
    if eos is not None:
        ids.append(eos)
    return ids


# ---------------------------------------------------------------------------------- splits
def val_ranges(n_tokens: int, val_fraction: float) -> list[tuple[int, int]]:
    """[start, end) ranges of the token stream held out for validation."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be between 0 and 1")
    n_val = int(n_tokens * val_fraction)
    segments = SEGMENTS if n_val >= SEGMENTS * 1024 else 1
    bounds = np.linspace(0, n_tokens, segments + 1).astype(np.int64)
    ranges = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        take = int((hi - lo) * val_fraction)
        if take:
            ranges.append((int(hi) - take, int(hi)))
    return ranges


@dataclass
class TokenData:
    """The prepared data set: memory-mapped train and validation token arrays."""
    dir: Path
    train: np.ndarray
    val: np.ndarray
    meta: dict

    @property
    def vocab_size(self) -> int:
        return self.meta["vocab_size"]


def _copy(fh, array: np.ndarray, pieces, chunk: int = 1 << 24) -> None:
    """Write array[lo:hi] for each (lo, hi) piece, a bounded chunk at a time."""
    for lo, hi in pieces:
        for start in range(lo, hi, chunk):
            fh.write(array[start:min(hi, start + chunk)].tobytes())


def _memmap(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if count == 0:
        return np.zeros(0, dtype=dtype)
    expected = count * dtype.itemsize
    if path.stat().st_size != expected:
        raise KvformerError(f"{path}: {path.stat().st_size} bytes, expected {expected}; the "
                            "token file is damaged; delete its directory to rebuild it")
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def open_data(data_dir: str | os.PathLike) -> TokenData:
    data_dir = Path(data_dir)
    try:
        meta = json.loads((data_dir / META).read_text())
    except (OSError, ValueError) as exc:
        raise KvformerError(f"{data_dir / META}: cannot read the data description ({exc}); "
                            "delete the directory to rebuild it") from exc
    dtype = np.dtype(meta["dtype"])
    return TokenData(data_dir, _memmap(data_dir / "train.bin", dtype, meta["train_tokens"]),
                     _memmap(data_dir / "val.bin", dtype, meta["val_tokens"]), meta)


def prepare_data(paths, tokenizer, data_dir: str | os.PathLike, val_fraction: float = 0.05,
                 log=None) -> TokenData:
    """Tokenize ``paths`` (files, directories, globs) into ``data_dir``/{train,val}.bin.

    Reuses what is there when the same files (same sizes and modification times), tokenizer and
    split were used before; otherwise rebuilds it."""
    files = expand_paths(paths)
    tok_id = tokenizer_id(tokenizer)
    fingerprint = _fingerprint(files, tok_id, val_fraction)
    data_dir = Path(data_dir)
    if (data_dir / META).is_file():
        try:
            existing = open_data(data_dir)
            if existing.meta.get("fingerprint") == fingerprint:
                return existing
        except (KvformerError, KeyError, ValueError):
            pass  # rebuild below
    data_dir.mkdir(parents=True, exist_ok=True)
    vocab = tokenizer.vocab_size
    dtype = token_dtype(vocab)

    # pass 1: every document's ids, appended to one temporary file
    fd, all_tmp = tempfile.mkstemp(prefix=".all.tmp-", dir=data_dir)
    all_tmp = Path(all_tmp)
    try:
        total, n_bytes = 0, 0
        with os.fdopen(fd, "wb") as fh:
            for i, f in enumerate(files):
                if log and len(files) > 1 and (i % 200 == 0):
                    log(f"tokenizing {i}/{len(files)} files")
                try:
                    raw = f.read_bytes()
                except OSError as exc:
                    raise KvformerError(f"{f}: cannot read ({exc})") from exc
                n_bytes += len(raw)
                ids = np.asarray(encode_document(tokenizer, raw.decode("utf-8", "replace")))
                if ids.size and int(ids.max()) >= vocab:
                    raise KvformerError(f"{f}: token id {int(ids.max())} >= vocab {vocab}")
                ids.astype(dtype).tofile(fh)
                total += ids.size
        ranges = val_ranges(total, val_fraction)
        n_val = sum(hi - lo for lo, hi in ranges)
        if total - n_val < 2 or n_val < 2:
            raise KvformerError(f"only {total} tokens of data: too little to train and "
                                "hold out a validation split; give more text")
        stream = _memmap(all_tmp, dtype, total)
        train_pieces, lo = [], 0
        for a, b in ranges:
            train_pieces.append((lo, a))
            lo = b
        train_pieces.append((lo, total))
        # the old description goes first and the new one is written last, after both token
        # files: a crash in between leaves no meta.json, so the next run rebuilds everything
        (data_dir / META).unlink(missing_ok=True)
        write_atomic(data_dir / "train.bin", lambda fh: _copy(fh, stream, train_pieces))
        write_atomic(data_dir / "val.bin", lambda fh: _copy(fh, stream, ranges))
        meta = {
            "version": DATA_VERSION, "dtype": dtype.name, "vocab_size": vocab,
            "tokenizer": tok_id, "train_tokens": total - n_val, "val_tokens": n_val,
            "val_fraction": val_fraction, "val_ranges": ranges, "text_bytes": n_bytes,
            "files": [str(f) for f in files], "fingerprint": fingerprint,
        }
        write_atomic(data_dir / META, lambda fh: fh.write(json.dumps(meta, indent=1).encode()))
    finally:
        all_tmp.unlink(missing_ok=True)
    return open_data(data_dir)


# ---------------------------------------------------------------------------------- batches
class BatchSampler:
    """Deterministic windows of ``seq_len + 1`` tokens from a token array.

    ``position`` counts the windows consumed so far (across all ranks); it is the sampler's
    entire state. Window k of epoch e starts at offset(e) + perm(e)[k] * seq_len."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int):
        self.tokens, self.seq_len, self.seed = tokens, seq_len, seed
        self.windows = (len(tokens) - 1 - seq_len) // seq_len
        if self.windows < 1:
            raise KvformerError(
                f"the training split has {len(tokens)} tokens: too few for even two windows of "
                f"seq_len={seq_len}; give more text or lower --seq-len")
        self.position = 0
        self._epoch, self._perm, self._offset = -1, None, 0

    def _order(self, epoch: int) -> None:
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._offset = int(rng.integers(0, self.seq_len))
            self._perm = rng.permutation(self.windows)
            self._epoch = epoch

    def window_starts(self, first: int, count: int) -> list[int]:
        starts = []
        for i in range(first, first + count):
            epoch, k = divmod(i, self.windows)
            self._order(epoch)
            starts.append(self._offset + int(self._perm[k]) * self.seq_len)
        return starts

    def epoch(self) -> float:
        return self.position / self.windows

    def next_batch(self, batch_size: int, rank: int = 0, world: int = 1):
        """This rank's slice (batch_size // world windows) of the next global batch, as
        (inputs, targets) int64 tensors [b, seq_len]; advances by the whole global batch."""
        per_rank = batch_size // world
        starts = self.window_starts(self.position + rank * per_rank, per_rank)
        self.position += batch_size
        return windows_to_batch(self.tokens, starts, self.seq_len)

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len,
                "windows": self.windows}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def windows_to_batch(tokens: np.ndarray, starts, seq_len: int):
    rows = np.stack([np.asarray(tokens[s:s + seq_len + 1], dtype=np.int64) for s in starts])
    t = torch.from_numpy(rows)
    return t[:, :-1], t[:, 1:]


def eval_starts(n_tokens: int, seq_len: int, max_windows: int) -> list[int]:
    """Evenly spaced, non-overlapping validation windows (the same every evaluation)."""
    available = (n_tokens - 1) // seq_len
    if available < 1:
        return []
    count = min(max_windows, available)
    step = available // count
    return [i * step * seq_len for i in range(count)]
