"""The kb cache (kvformer/formats/gguf/kbcache.py): a big GGUF file's repacked form kept on
disk and mapped by later loads. Every test builds small files and lowers the size from which
the cache applies (KVFORMER_KB_CACHE_MIN_MB=0)."""

from __future__ import annotations

import os

import pytest
import torch

import kvformer
from kvformer.formats.gguf import kbcache
from kvformer.formats.gguf import tensors as gguf_tensors
from tests.test_kb import FILES, _kb_file


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    # only the kb directory moves: KVFORMER_CACHE would move the native build too (a rebuild)
    directory = tmp_path / "cache" / "kb"
    monkeypatch.setattr(kbcache, "_directory", lambda: directory)
    monkeypatch.setenv("KVFORMER_KB_CACHE_MIN_MB", "0")
    monkeypatch.delenv("KVFORMER_KB_CACHE", raising=False)
    return directory


def _entries(directory):
    return sorted(directory.glob("*.kb")) if directory.exists() else []


def _load(path):
    model, _ = kvformer.load(path, dtype="auto", progress=False)
    return model


def _logits(model):
    ids = torch.tensor([[1, 5, 9, 33, 2, 17, 60, 4]])
    with torch.inference_mode():
        return model(ids)


def _no_repack(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("repacked although the cache holds the file")

    monkeypatch.setattr(gguf_tensors, "to_kb", refuse)


@pytest.mark.parametrize("kind", ["k-quants", "legacy"])
def test_a_second_load_maps_the_cache_and_gives_the_same_model(tmp_path, cache, monkeypatch,
                                                               kind):
    """The first load writes the entry; the second repacks nothing (to_kb would fail) and
    holds exactly the bytes and logits of a load without the cache."""
    path = _kb_file(tmp_path, *FILES[kind])
    first = _load(path)
    assert len(_entries(cache)) == 1
    with monkeypatch.context() as m:
        m.setenv("KVFORMER_KB_CACHE", "0")
        plain = _load(path)
    with monkeypatch.context() as m:
        _no_repack(m)
        mapped = _load(path)
    want = plain.state_dict()
    for model in (first, mapped):
        got = model.state_dict()
        assert got.keys() == want.keys()
        assert all(torch.equal(got[k], want[k]) for k in want)
        assert torch.equal(_logits(model), _logits(plain))


def test_a_changed_file_is_repacked_and_a_broken_entry_is_a_miss(tmp_path, cache,
                                                                 monkeypatch):
    path = _kb_file(tmp_path, *FILES["k-quants"])
    want = _logits(_load(path))
    (entry,) = _entries(cache)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # replaced (or touched)
    calls = []
    real = gguf_tensors.to_kb
    monkeypatch.setattr(gguf_tensors, "to_kb", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(_logits(_load(path)), want)
    assert calls, "a file with another mtime must not be served from the old entry"
    new = [e for e in _entries(cache) if e != entry]
    assert len(new) == 1
    # cut the new entry short: the next load repacks, rewrites it, and gives the same model
    with open(new[0], "r+b") as fh:
        fh.truncate(os.path.getsize(new[0]) // 2)
    calls.clear()
    assert torch.equal(_logits(_load(path)), want)
    assert calls
    assert os.path.getsize(new[0]) > 0
    calls.clear()
    _load(path)
    assert not calls  # the rewritten entry serves again


def test_the_cache_is_bounded_and_can_be_turned_off(tmp_path, cache, monkeypatch):
    a = _kb_file(tmp_path, *FILES["k-quants"], name="a.gguf")
    b = _kb_file(tmp_path, *FILES["legacy"], name="b.gguf")
    _load(a)
    (first,) = _entries(cache)
    size = os.path.getsize(first)
    # room for one entry: writing b's deletes a's (the least recently used)
    monkeypatch.setenv("KVFORMER_KB_CACHE", str(1.5 * size / 1e9))
    _load(b)
    (only,) = _entries(cache)
    assert only != first
    monkeypatch.setenv("KVFORMER_KB_CACHE", "0")
    _load(a)
    assert _entries(cache) == [only]
    # small files are never cached by default (KVFORMER_KB_CACHE_MIN_MB: 256)
    monkeypatch.delenv("KVFORMER_KB_CACHE")
    monkeypatch.delenv("KVFORMER_KB_CACHE_MIN_MB")
    _load(a)
    assert _entries(cache) == [only]
