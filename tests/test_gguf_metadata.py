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


def test_a_long_unread_metadata_array_costs_no_memory(tmp_path):
    """A 256 MiB u8 array under a key nothing reads is left in the file (``LongArray``), not
    turned into 268 million Python ints (gigabytes): reading the header of such a file peaks
    within 64 MB of reading it without the array."""
    import struct
    import subprocess
    import sys

    def write(path, junk: int):
        def string(s: str) -> bytes:
            return struct.pack("<Q", len(s)) + s.encode()
        kvs = [string("general.architecture") + struct.pack("<I", 8) + string("llama")]
        if junk:
            kvs.append(string("general.junk") + struct.pack("<IIQ", 9, 0, junk))
        with open(path, "wb") as f:
            f.write(b"GGUF" + struct.pack("<IQQ", 3, 0, len(kvs)) + b"".join(kvs))
            if junk:
                f.truncate(f.tell() + junk)  # the array's bytes (zeros), without writing them
    code = ("import resource, sys\n"
            "from kvformer.formats.gguf.reader import GGUFFile, LongArray\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "with GGUFFile(sys.argv[1]) as f:\n"
            "    junk = f.metadata.get('general.junk')\n"
            "    assert junk is None or isinstance(junk, LongArray), type(junk)\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n")
    grown = {}
    for junk in (0, 256 << 20):
        path = tmp_path / f"junk{junk}.gguf"
        write(path, junk)
        res = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                             text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        grown[junk] = int(res.stdout) / 1024  # ru_maxrss is in KiB on Linux
    assert grown[256 << 20] - grown[0] < 64, grown
