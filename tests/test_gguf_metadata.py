"""Every GGUF metadata value that changes the computation is honoured or refused.

gguf-py's ``Keys`` lists every per-architecture key a GGUF file can carry. Each one, set on
an otherwise ordinary tiny llama file, must either change kvformer's config the way
llama.cpp reads it (HONOURED, checked below), be inert (INERT, each with the reason), or
make the load fail with one line naming the key: never be read past silently.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from kvformer.errors import CheckpointError, UnsupportedArchitectureError  # noqa: E402
from kvformer.formats.gguf.config import (  # noqa: E402
    GGUF_ARCH_KEYS,
    GGUF_NEUTRAL_KEYS,
    config_from_gguf,
)
from kvformer.formats.gguf.reader import read_metadata  # noqa: E402
from kvformer.formats.gguf.tensors import iter_gguf_tensors  # noqa: E402

BASE = {
    "general.architecture": "llama", "general.name": "tiny", "general.file_type": 0,
    "llama.block_count": 2, "llama.context_length": 256, "llama.embedding_length": 64,
    "llama.feed_forward_length": 96, "llama.attention.head_count": 4,
    "llama.attention.head_count_kv": 2, "llama.rope.freq_base": 10000.0,
    "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 97,
    "llama.rope.dimension_count": 16,
}


def _all_arch_keys() -> list[str]:
    """Every '{arch}.' key gguf-py defines, as suffixes."""
    def walk(cls):
        for value in vars(cls).values():
            if isinstance(value, str) and value.startswith("{arch}."):
                yield value[len("{arch}."):].replace("{dense}", "dense_2")
            elif isinstance(value, type):
                yield from walk(value)
    return sorted(set(walk(gguf.Keys)))


def _cfg(**changes):
    meta = dict(BASE)
    meta.update({f"llama.{k}": v for k, v in changes.items()})
    return config_from_gguf(meta)


BASELINE = _cfg()
# key -> (the metadata that exercises it, what the config must then hold)
HONOURED = {
    "vocab_size": ({"vocab_size": 50}, lambda c: c.vocab_size == 50),
    "context_length": ({"context_length": 77}, lambda c: c.max_seq_len == 77),
    "embedding_length": ({"embedding_length": 128, "rope.dimension_count": 32},
                         lambda c: (c.d_model, c.head_dim) == (128, 32)),
    "block_count": ({"block_count": 3}, lambda c: c.n_layer == 3),
    "feed_forward_length": ({"feed_forward_length": 40}, lambda c: c.d_ff == 40),
    "attention.head_count": ({"attention.head_count": 8, "rope.dimension_count": 8},
                             lambda c: (c.n_head, c.head_dim) == (8, 8)),
    "attention.head_count_kv": ({"attention.head_count_kv": 1}, lambda c: c.n_kv_head == 1),
    "attention.key_length": ({"attention.key_length": 32, "attention.value_length": 32,
                              "rope.dimension_count": 32}, lambda c: c.head_dim == 32),
    "attention.value_length": ({"attention.key_length": 32, "attention.value_length": 32,
                                "rope.dimension_count": 32}, lambda c: c.head_dim == 32),
    "attention.layer_norm_rms_epsilon": ({"attention.layer_norm_rms_epsilon": 1e-3},
                                         lambda c: c.norm_eps == 1e-3),
    "attention.scale": ({"attention.scale": 0.25}, lambda c: c.attn_scale == 0.25),
    "attention.sliding_window": ({"attention.sliding_window": 9},
                                 lambda c: (c.sliding_window, c.sliding_layers) == (9, None)),
    "attention.sliding_window_pattern": (
        {"attention.sliding_window": 9, "attention.sliding_window_pattern": 2},
        lambda c: c.sliding_layers == (0,)),
    "rope.dimension_count": ({"rope.dimension_count": 16}, lambda c: c.head_dim == 16),
    "rope.freq_base": ({"rope.freq_base": 777.0}, lambda c: c.rope_theta == 777.0),
    "rope.freq_base_swa": ({"attention.sliding_window": 9, "rope.freq_base_swa": 55.0},
                           lambda c: c.local_rope_theta == 55.0),
    "rope.scaling.type": ({"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
                           "rope.scaling.original_context_length": 64},
                          lambda c: c.rope_scaling["type"] == "yarn"),
    # llama.cpp divides the frequencies by rope.scaling.factor whatever the type says
    "rope.scaling.factor": ({"rope.scaling.factor": 2.0},
                            lambda c: c.rope_scaling == {"type": "linear", "factor": 2.0}),
    "rope.scaling.original_context_length": (
        {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
         "rope.scaling.original_context_length": 64},
        lambda c: c.rope_scaling["original_max_position_embeddings"] == 64),
    "rope.scaling.yarn_beta_fast": (
        {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
         "rope.scaling.original_context_length": 64, "rope.scaling.yarn_beta_fast": 16.0},
        lambda c: c.rope_scaling["beta_fast"] == 16.0),
    "rope.scaling.yarn_beta_slow": (
        {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0,
         "rope.scaling.original_context_length": 64, "rope.scaling.yarn_beta_slow": 2.0},
        lambda c: c.rope_scaling["beta_slow"] == 2.0),
    # Phi-3's LongRoPE attention factor (with its factor tensors: test_architectures)
    "rope.scaling.attn_factor": ({"rope.scaling.attn_factor": 1.0},
                                 lambda c: c.rope_scaling is None),
}
INERT = {
    # only YaRN and LongRoPE read the original context (Phi-3 files always write it)
    "rope.scaling.original_context_length": "alone, with no scaling that reads it",
    "rope.scaling.finetuned": "a note on how the model was trained",
    "rope.freq_base_swa": "alone: no windowed layer to use it",
}


@pytest.mark.parametrize("key", _all_arch_keys())
def test_every_key_is_honoured_or_refused(key):
    if key in HONOURED:
        meta, holds = HONOURED[key]
        cfg = _cfg(**meta)
        assert holds(cfg), key
        if cfg == BASELINE:  # some honoured keys are exercised at their baseline value
            assert key in ("rope.dimension_count", "rope.scaling.attn_factor")
        return
    try:  # alone, with a value that is not the harmless one (7: gguf-py's uint32 keys)
        cfg = _cfg(**{key: 7})
    except (CheckpointError, UnsupportedArchitectureError) as exc:
        assert f"llama.{key}" in str(exc) or key.split(".")[-1] in str(exc), str(exc)
        assert "\n" not in str(exc)
        return
    assert key in INERT, f"llama.{key} = 7 was read past silently"
    assert cfg == BASELINE, key


def test_the_tables_name_real_keys():
    """kvformer's key tables use gguf-py's names (a typo would refuse a real file's key)."""
    known = set(_all_arch_keys()) | {"rope.scale_linear"}  # the older name llama.cpp reads
    assert set(GGUF_ARCH_KEYS) <= known
    assert set(GGUF_NEUTRAL_KEYS) <= known
    assert set(GGUF_ARCH_KEYS) <= set(HONOURED) | set(INERT) | {
        "rope.scale_linear", "attention.layer_norm_epsilon", "attn_logit_softcapping",
        "final_logit_softcapping"}  # the last three: honoured by gpt2 / gemma files


def test_older_and_harmful_values():
    assert _cfg(**{"rope.scale_linear": 4.0}).rope_scaling == {"type": "linear", "factor": 4.0}
    assert _cfg(expert_count=0, expert_used_count=0, **{"attention.causal": True}) == BASELINE
    for key, value, words in (
            ("rope.scaling.type", "mrope", ["'mrope'", "not one kvformer implements"]),
            ("rope.scaling.type", "yarn", ["YaRN", "original_context_length"]),
            ("attention.causal", False, ["attention.causal"]),
            ("expert_count", 8, ["expert_count"]),
            ("attention.layer_norm_epsilon", 1e-5, ["layer_norm_epsilon"]),
            ("rope.dimension_count", 8, ["partial rotary"])):
        with pytest.raises((CheckpointError, UnsupportedArchitectureError)) as info:
            _cfg(**{key: value})
        assert all(w in str(info.value) for w in words), str(info.value)


@pytest.mark.parametrize("key, value, words", [
    ("general.type", "adapter", ["general.type", "adapter"]),
    ("split.count", 3, ["split", "merge"]),
    ("adapter.lora.alpha", 16.0, ["adapter.lora.alpha"]),
    ("qwen2.block_count", 2, ["qwen2.block_count"]),  # another architecture's key
])
def test_other_namespaces(key, value, words):
    with pytest.raises((CheckpointError, UnsupportedArchitectureError)) as info:
        config_from_gguf({**BASE, key: value})
    assert all(w in str(info.value) for w in words), str(info.value)


# ----------------------------------------------------------------------------- tensors
def _write(path, extra_tensors=(), extra_kv=None):
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in {**BASE, **(extra_kv or {})}.items():
        if key == "general.architecture":
            continue
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, int):
            w.add_uint32(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_string(key, value)
    rng = np.random.default_rng(0)

    def t(*shape):
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    w.add_tensor("token_embd.weight", t(97, 64))
    w.add_tensor("output_norm.weight", 1 + t(64))
    for i in range(2):
        for name, shape in (("attn_norm", (64,)), ("attn_q", (64, 64)), ("attn_k", (32, 64)),
                            ("attn_v", (32, 64)), ("attn_output", (64, 64)),
                            ("ffn_norm", (64,)), ("ffn_gate", (96, 64)), ("ffn_up", (96, 64)),
                            ("ffn_down", (64, 96))):
            w.add_tensor(f"blk.{i}.{name}.weight", t(*shape))
    for name, arr in extra_tensors:
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unknown_tensor_is_refused(tmp_path):
    path = _write(tmp_path / "extra.gguf", [("blk.0.attn_rot_embd.weight",
                                             np.ones(8, np.float32))])
    cfg = config_from_gguf(read_metadata(path), path)
    with pytest.raises(UnsupportedArchitectureError, match="attn_rot_embd"):
        list(iter_gguf_tensors(path, cfg))


def test_rope_freqs_become_the_config_and_must_match_it(tmp_path):
    factors = np.linspace(1.0, 8.0, 8).astype(np.float32)
    path = _write(tmp_path / "freqs.gguf", [("rope_freqs.weight", factors)])
    cfg = config_from_gguf(read_metadata(path), path)
    assert cfg.rope_scaling == {"type": "factors", "factors": factors.tolist()}
    names = [n for n, _ in iter_gguf_tensors(path, cfg)]
    assert "rope_freqs.weight" not in names and len(names) == 20
    blind = config_from_gguf(read_metadata(path))  # metadata alone cannot see the tensor
    with pytest.raises(CheckpointError, match="rope_freqs.weight"):
        list(iter_gguf_tensors(path, blind))
    # the factors divide the frequencies, as llama.cpp's rope with freq_factors does
    from kvformer.model.positions import rope_frequencies
    got, _ = rope_frequencies(16, 10000.0, cfg.rope_scaling)
    want = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16)) / torch.from_numpy(factors)
    torch.testing.assert_close(got, want)
    path = _write(tmp_path / "both.gguf", [("rope_freqs.weight", factors)],
                  {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0,
                   "llama.rope.scaling.original_context_length": 64})
    with pytest.raises(UnsupportedArchitectureError, match="rope_freqs"):
        config_from_gguf(read_metadata(path), path)


def test_info_shows_the_rotary_scaling_and_refuses_in_one_line(tmp_path, capsys):
    from kvformer.cli.main import main

    factors = np.linspace(1.0, 8.0, 8).astype(np.float32)
    path = _write(tmp_path / "freqs.gguf", [("rope_freqs.weight", factors)],
                  {"llama.attention.sliding_window": 33})
    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "theta 10000; factors scaling (factors [8 values, 1..8])" in out
    assert "sliding window 33 on every layer" in out
    bad = _write(tmp_path / "bad.gguf", extra_kv={"llama.rope.scaling.type": "mrope"})
    assert main(["info", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert "'mrope'" in err and len(err.splitlines()) == 1


def _with_first_kv(src, dst, key: str, value_header: bytes, payload_size: int = 0,
                   payload: bytes = b""):
    """``src`` (a GGUF v3 file) with one more key/value, first: its header, then
    ``payload_size`` zero bytes left as a hole in the file (not written), then ``payload``.
    The key is lengthened with 'x's to keep the tensor data aligned (the entry a multiple
    of 32 bytes), so that the rest of the file is copied as it is."""
    import struct

    key += "x" * (-(8 + len(key) + len(value_header) + payload_size + len(payload)) % 32)
    head = struct.pack("<Q", len(key)) + key.encode() + value_header
    data = src.read_bytes()
    (n_kv,) = struct.unpack_from("<Q", data, 16)
    with open(dst, "wb") as f:
        f.write(data[:16] + struct.pack("<Q", n_kv + 1) + head)
        f.seek(payload_size, 1)
        f.write(payload + data[24:])
    return dst


# what `load` does with a GGUF file but the tokenizer (these files have none): the
# metadata, the config checked against it, every tensor read; each file in a child forked
# after the imports, so that the peaks (VmHWM, which a child starts at its parent's) differ
# by the loads alone
_PEAK = """
import os, sys
import torch
from kvformer.formats.gguf.config import config_from_gguf
from kvformer.formats.gguf.reader import open_reader, read_metadata
from kvformer.formats.gguf.tensors import iter_gguf_tensors
for path in sys.argv[1:]:
    pid = os.fork()
    if pid == 0:
        reader = open_reader(path)
        cfg = config_from_gguf(read_metadata(reader), reader)
        weights = dict(iter_gguf_tensors(reader, cfg))
        assert cfg.d_model == 64 and len(weights) >= 19
        with open("/proc/self/status") as f:
            peak = [line.split()[1] for line in f if line.startswith("VmHWM:")][0]
        print(path, peak, flush=True)
        os._exit(0)
    assert os.waitpid(pid, 0)[1] == 0
"""


def test_unread_metadata_arrays_cost_no_memory(tmp_path):
    """Arrays under a key nothing reads stay in the file: a 256 MiB u8 array, 4 million
    two-byte strings (40 MB of file, ~240 MB as Python strings) and a million arrays of
    one number, each first in an otherwise ordinary model file. Loading each peaks within
    64 MB of loading the file without it (in a subprocess: its own peak RSS), and the
    header reader gives a ``LongArray`` for each, as for arrays nested 100,000 deep (once a
    RecursionError)."""
    import struct
    import subprocess
    import sys

    from kvformer.formats.gguf.reader import GGUFFile, LongArray

    base = _write(tmp_path / "base.gguf")
    key = "general.an_array_kvformer_does_not_read"
    u8 = _with_first_kv(base, tmp_path / "u8.gguf", key,
                        struct.pack("<IIQ", 9, 0, 256 << 20), payload_size=256 << 20)
    n = 4_000_000
    two = np.zeros(n, dtype=[("n", "<u8"), ("s", "S2")])
    two["n"], two["s"] = 2, b"ab"
    strings = _with_first_kv(base, tmp_path / "strings.gguf", key,
                             struct.pack("<IIQ", 9, 8, n), payload=two.tobytes())
    nested_items = struct.pack("<IQB", 0, 1, 7) * 1_000_000  # 13 bytes each
    nested = _with_first_kv(base, tmp_path / "nested.gguf", key,
                            struct.pack("<IIQ", 9, 9, 1_000_000), payload=nested_items)
    depth = 100_000
    deep = _with_first_kv(base, tmp_path / "deep.gguf", key,
                          struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * depth
                          + struct.pack("<IQ", 0, 0))
    expect = {u8: ("|u1", 256 << 20), strings: ("string", n), nested: ("array", 1_000_000),
              deep: ("array", 1)}
    for path, (dtype, count) in expect.items():
        with GGUFFile(path) as f:
            (junk,) = [v for k, v in f.metadata.items() if k.startswith(key)]
            assert isinstance(junk, LongArray) and (junk.dtype, junk.count) == (dtype, count)
            assert f.metadata["llama.block_count"] == 2 and len(f.tensors) == 20
    res = subprocess.run([sys.executable, "-c", _PEAK, str(base), str(u8), str(strings),
                          str(nested)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    peaks = {}  # MiB
    for line in res.stdout.splitlines():
        path, kib = line.split()
        peaks[path.rsplit("/", 1)[-1]] = int(kib) / 1024
    assert len(peaks) == 4, res.stdout
    assert max(peaks.values()) - peaks["base.gguf"] < 64, peaks
