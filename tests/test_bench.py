"""`kvformer bench`'s workers: each task runs in a fresh process, and the parent reads that
process's peak RSS from the kernel."""

import math

import torch

from kvformer import ModelConfig, Transformer
from kvformer.bench import run_worker
from kvformer.generate import perplexity


def test_workers_report_their_results_and_the_kernels_peak_rss(tmp_path):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layer=2, n_head=4, n_kv_head=2,
                      max_seq_len=64)
    model = Transformer(cfg).eval()
    model.save(tmp_path / "m")
    text = [int(t) for t in torch.randint(0, 64, (40,))]
    spec = {"engine": "kvformer", "dtype": "fp32", "model": str(tmp_path / "m"),
            "threads": 1, "new_tokens": 4, "ids": {"short": text[:5], "text": text}}

    memory = run_worker({**spec, "task": "memory"})
    assert set(memory) == {"peak_rss"}
    # a process that imported torch holds far more than 50 MB; the figure is in MB, not KB
    assert 50 < memory["peak_rss"] < 4096

    quality = run_worker({**spec, "task": "quality"})
    assert math.isclose(quality["ppl"], perplexity(model, text), rel_tol=1e-4)
    assert quality["peak_rss"] > 50
