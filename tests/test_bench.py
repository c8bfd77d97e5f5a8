"""`kvformer bench`'s workers: each task runs in a fresh process, and the parent reads that
process's peak RSS from the kernel."""

import math
import subprocess
import sys

import torch

import kvformer
from kvformer import ModelConfig, Transformer
from kvformer.runtime.generation import perplexity
from kvformer.tools.bench.run import run_worker


def test_workers_report_their_results_and_the_kernels_peak_rss(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2,
                      max_seq_len=64)
    model = Transformer(cfg).eval()
    kvformer.save(model, tmp_path / "m")
    text = [int(t) for t in torch.randint(0, 64, (40,))]
    spec = {"engine": "kvformer", "dtype": "fp32", "model": str(tmp_path / "m"),
            "threads": 1, "new_tokens": 4, "ids": {"short": text[:5], "text": text}}

    memory = run_worker({**spec, "task": "memory"})
    assert set(memory) == {"peak_rss", "rss_base"}
    # a process that imported torch holds far more than 50 MB; the figure is in MB, not KB
    assert 50 < memory["peak_rss"] < 4096
    # the baseline is taken after torch and the native library, before the model
    assert 50 < memory["rss_base"] <= memory["peak_rss"]

    # the llama.cpp worker never imports torch (its memory is llama.cpp's own)
    probe = subprocess.run([sys.executable, "-c", "import sys, kvformer.tools.bench."
                            "llama_worker; print('torch' in sys.modules)"],
                           capture_output=True, text=True)
    assert probe.stdout.strip() == "False", probe.stderr

    quality = run_worker({**spec, "task": "quality"})
    assert math.isclose(quality["ppl"], perplexity(model, text), rel_tol=1e-4)
    assert quality["peak_rss"] > 50


def test_kv_comparison_measures_each_kv_dtype_against_bf16():
    """kvformer.tools.bench.kv on a small model: bf16 agrees with itself everywhere, and the
    figures of the other dtypes are what the functions they come from give (the text's
    1,000+ tokens of SmolLM2's tokenizer: tests/test_kvquant.py)."""
    from kvformer.formats.tokenizer.tokenizer import ByteTokenizer
    from kvformer.tools.bench import kv as kvbench

    assert kvbench.agreement([1, 2, 3, 4], [1, 2, 9, 4]) == (0.75, 2)
    assert kvbench.agreement([1, 2], [1, 2]) == (1.0, 2)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, d_model=64, n_layer=2, n_head=2, n_kv_head=1,
                      max_seq_len=8192)
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(10)
    tok = ByteTokenizer()
    result = kvbench.measure(model, tok, ["int8", "int4"], decode_ppl=False, speed=False,
                             new_tokens=6)
    rows = result["rows"]
    assert list(rows) == ["bf16", "int8", "int4"] and result["prompts"] == 2
    assert rows["bf16"]["agree"] == 1.0 and rows["bf16"]["first_diff"] == [6, 6]
    ids = kvbench.text_ids(tok)
    assert rows["int8"]["ppl"] == perplexity(model, ids, kv_dtype="int8")
    assert rows["int8"]["bytes_per_token"] == 2 * 2 * 1 * (32 + 2)
    prompt = kvbench.prompts(tok)[0]
    ref = kvbench.greedy(model, prompt, 6, "bf16")
    assert kvbench.forced_argmax(model, prompt, ref, "bf16") == ref  # fed back: itself
    table = "\n".join(kvbench.table(result))
    assert "| `int8` | 136 | 1.88× |" in table


def test_reference_engines_run_with_openmp_as_the_user_has_it(monkeypatch):
    """kvformer shortens OpenMP's spin for itself (kvformer/__init__.py); the bench's
    llama.cpp and transformers workers get the settings as they were before kvformer set
    them, and kvformer's workers keep kvformer's."""
    import subprocess

    import kvformer

    seen = {}

    class Stop(Exception):
        pass

    def fake_popen(cmd, env, **kw):
        seen[env.get("KVFORMER_THREADS", "")] = env
        raise Stop

    monkeypatch.setattr(subprocess, "Popen", fake_popen)
    monkeypatch.setitem(kvformer._OMP_ENV_BEFORE, "GOMP_SPINCOUNT", None)
    monkeypatch.setitem(kvformer._OMP_ENV_BEFORE, "KMP_BLOCKTIME", "7")
    monkeypatch.setenv("GOMP_SPINCOUNT", "20000")
    monkeypatch.setenv("KMP_BLOCKTIME", "0")
    monkeypatch.delenv("KVFORMER_THREADS", raising=False)
    for engine in ("llama.cpp", "kvformer"):
        try:
            run_worker({"engine": engine, "threads": 2})
        except Stop:
            pass
    ref, ours = seen["openmp"], seen[""]
    assert "GOMP_SPINCOUNT" not in ref and ref["KMP_BLOCKTIME"] == "7"
    assert ours["GOMP_SPINCOUNT"] == "20000" and ours["KMP_BLOCKTIME"] == "0"


def test_each_types_row_is_compared_with_the_llama_cpp_build_of_its_path():
    """--types with --llama-cpp-avx2: the avx2 row's ratios are against the AVX2-only
    llama.cpp, the avx512 row's against the default build (hand-computed ratios)."""
    from kvformer.tools.bench.run import _types_section

    summary = {"kvformer auto · avx512": {"decode": 200.0, "prefill": 300.0},
               "kvformer auto · avx2": {"decode": 120.0, "prefill": 150.0},
               "llama.cpp Q4_K": {"decode": 100.0, "prefill": 100.0},
               "llama.cpp Q4_K · avx2 build": {"decode": 60.0, "prefill": 50.0}}
    rows = [line for line in _types_section([("m", "Q4_K_M", summary)])
            if line.startswith("| m |")]
    assert rows[0].split(" | ")[2:5] == ["auto · avx512 vs default build", "2.00×", "–"]
    assert rows[1].split(" | ")[2:4] == ["auto · avx2 vs avx2 build", "2.00×"]
    assert rows[1].split(" | ")[6] == "3.00×"  # prefill 150 / 50
