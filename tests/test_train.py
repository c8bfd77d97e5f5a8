"""Training: data pipeline, loss, metrics, exact resume, checkpoint safety, DDP, fine-tuning."""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import kvformer
from kvformer import CheckpointError, KvformerError, ModelConfig, Transformer
from kvformer.formats.tokenizer.tokenizer import ByteTokenizer
from kvformer.train import (
    BatchSampler,
    TrainConfig,
    list_checkpoints,
    load_checkpoint,
    lr_at,
    prepare_data,
    read_metrics,
    train,
)
from kvformer.train.checkpoint import verify_checkpoint
from kvformer.train.data import token_dtype, val_ranges

ROOT = Path(__file__).resolve().parents[1]
MICRO = dict(vocab_size=256, d_model=32, n_layer=2, n_head=4, n_kv_head=2, d_ff=64,
             max_seq_len=64)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is as fast, and far faster on a loaded machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 80 KB of real text: a few standard-library modules, plus some non-ASCII."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join((stdlib / name).read_text(encoding="utf-8")
                   for name in ("textwrap.py", "shlex.py", "fnmatch.py", "string.py",
                                "bisect.py", "colorsys.py"))
    text += "# naïve café — 🙂 unicode survives\n"
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    return path


def micro_config(out, corpus, **kw) -> TrainConfig:
    base = dict(config=dict(MICRO), data=[str(corpus)], out=str(out), steps=12, batch_size=4,
                seq_len=32, lr=3e-3, warmup=2, log_every=1, eval_every=4, eval_tokens=512,
                save_every=5, sample_tokens=8, verbose=False, plot=False, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def train_losses(path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in read_metrics(path) if m["type"] == "train"}


# ------------------------------------------------------------------------------ data pipeline
def test_memmap_tokens_decode_back_to_the_text(tmp_path):
    a = tmp_path / "a.txt"
    b = tmp_path / "sub" / "b.md"
    b.parent.mkdir()
    a.write_text("héllo wörld 🙂\n" * 6000, encoding="utf-8")
    b.write_text("second document, no final newline", encoding="utf-8")
    tok = ByteTokenizer()
    data = prepare_data([str(a), str(tmp_path / "sub")], tok, tmp_path / "data", 0.1)
    assert data.train.dtype == np.uint16 and isinstance(data.train, np.memmap)
    ranges = [tuple(r) for r in data.meta["val_ranges"]]
    assert ranges == val_ranges(len(data.train) + len(data.val), 0.1) and len(ranges) > 1
    # put the held-out pieces back where they came from: the stream is the original text
    stream, ti, vi, pos = [], 0, 0, 0
    for lo, hi in ranges:
        stream.append(data.train[ti:ti + lo - pos])
        ti += lo - pos
        stream.append(data.val[vi:vi + hi - lo])
        vi += hi - lo
        pos = hi
    stream.append(data.train[ti:])
    ids = np.concatenate(stream).tolist()
    expected = a.read_text(encoding="utf-8") + b.read_text(encoding="utf-8") + "\n"
    assert tok.decode(ids) == expected
    assert ids == tok.encode(expected)  # the fast byte path gives the tokenizer's own ids

    # reused when nothing changed, rebuilt when a file changes
    mtime = (tmp_path / "data" / "train.bin").stat().st_mtime_ns
    prepare_data([str(a), str(tmp_path / "sub")], tok, tmp_path / "data", 0.1)
    assert (tmp_path / "data" / "train.bin").stat().st_mtime_ns == mtime
    b.write_text("changed\n", encoding="utf-8")
    again = prepare_data([str(a), str(tmp_path / "sub")], tok, tmp_path / "data", 0.1)
    assert again.meta["train_tokens"] + again.meta["val_tokens"] == len(expected.encode()) - 26
    assert not list((tmp_path / "data").glob(".*tmp*"))


def test_tokenizer_with_eos_separates_documents(tmp_path):
    (tmp_path / "x.txt").write_text("one\n" * 200)
    (tmp_path / "y.txt").write_text("two\n" * 200)
    tok = ByteTokenizer(eos_token="<eos>")
    data = prepare_data([str(tmp_path / "x.txt"), str(tmp_path / "y.txt")], tok,
                        tmp_path / "d", 0.05)
    ids = np.concatenate([data.train, data.val]).tolist()
    assert ids.count(tok.eos_id) == 2 and sorted(ids)[-1] == 256
    assert token_dtype(256) == np.uint16 and token_dtype(70_000) == np.uint32


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(KvformerError, match="no such file"):
        prepare_data([str(tmp_path / "nope.txt")], ByteTokenizer(), tmp_path / "d")


def test_ranks_read_disjoint_slices_of_the_global_batch():
    tokens = np.arange(5000, dtype=np.uint16) % 256
    whole = BatchSampler(tokens, 16, seed=1).next_batch(8)[0]
    parts = [BatchSampler(tokens, 16, seed=1).next_batch(8, rank=r, world=2)[0]
             for r in range(2)]
    assert torch.equal(torch.cat(parts), whole)
    starts = BatchSampler(tokens, 16, seed=1).window_starts(0, 1000)
    assert len(set(starts[:300])) == 300  # one epoch: every window once


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    lrs = [lr_at(s, 1.0, 10, 100, 0.1) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)


# ------------------------------------------------------------------------------ a training run
def test_loss_falls_metrics_and_a_loadable_model(tmp_path, corpus):
    out = tmp_path / "run"
    res = train(micro_config(out, corpus, steps=40, lr=1e-2, warmup=4, eval_every=20,
                             save_every=0, log_every=5, plot=True))
    assert not res.interrupted and res.step == 40
    metrics = read_metrics(out / "metrics.jsonl")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(metrics)  # one JSON object per line
    train_m = [m for m in metrics if m["type"] == "train"]
    evals = [m for m in metrics if m["type"] == "eval"]
    assert [m["step"] for m in train_m] == list(range(5, 41, 5))
    for m in train_m:
        assert isinstance(m["step"], int) and math.isfinite(m["loss"]) and m["lr"] > 0
    assert [m["step"] for m in evals] == [0, 20, 40]
    assert all("sample" in m for m in evals[1:])
    assert train_m[-1]["loss"] < train_m[0]["loss"] - 1.0
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    assert (out / "loss.png").stat().st_size > 1000

    from kvformer.formats.load import load
    from kvformer.runtime.generation import generate

    model, tok = load(out / "model")
    assert model.cfg == ModelConfig(**MICRO)
    new = generate(model, tok.encode("def "), 10)
    assert len(new) == 10 and isinstance(tok.decode(new), str)


def test_resume_after_sigint_or_step_limit_logs_the_same_losses(tmp_path, corpus):
    full = train(micro_config(tmp_path / "full", corpus))
    reference = train_losses(full.metrics)
    assert sorted(reference) == list(range(1, 13))

    def sigint_at_7(step, loss):  # a real SIGINT: the run finishes the step, saves, returns
        if step == 7:
            os.kill(os.getpid(), signal.SIGINT)

    for name, hook, stopped in (("sig", sigint_at_7, 7), ("hook", lambda s, _: s == 3, 3)):
        cut = train(micro_config(tmp_path / name, corpus), on_step=hook)
        assert cut.interrupted and cut.step == stopped and cut.model_dir is None
        assert cut.checkpoint.name == f"step-{stopped:08d}"
        with pytest.raises(KvformerError, match="--resume"):
            train(micro_config(tmp_path / name, corpus))
        done = train(micro_config(tmp_path / name, corpus, resume=True))
        assert done.step == 12 and not done.interrupted
        resumed = train_losses(done.metrics)
        assert sorted(resumed) == sorted(reference)
        for step, loss in reference.items():
            assert abs(resumed[step] - loss) <= 1e-6, (name, step)
        evals = [m["val_loss"] for m in read_metrics(done.metrics) if m["type"] == "eval"]
        ref_evals = [m["val_loss"] for m in read_metrics(full.metrics) if m["type"] == "eval"]
        assert np.allclose(evals, ref_evals, atol=1e-6)
        final = load_checkpoint(done.checkpoint)[1]
        ref_final = load_checkpoint(full.checkpoint)[1]
        assert all(torch.allclose(final[k], ref_final[k], atol=1e-6) for k in ref_final)


def test_corrupt_checkpoint_is_named_and_the_previous_one_kept(tmp_path, corpus, monkeypatch):
    out = tmp_path / "run"
    train(micro_config(out, corpus, steps=8, save_every=4, eval_every=0))
    (s4, p4), (s8, p8) = list_checkpoints(out / "checkpoints")
    assert (s4, s8) == (4, 8)

    # a save that dies half-way leaves no new checkpoint and the old ones intact
    import kvformer.train.checkpoint as ckpt_mod

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        train(micro_config(out, corpus, steps=9, save_every=4, eval_every=0, resume=True))
    monkeypatch.undo()
    assert [s for s, _ in list_checkpoints(out / "checkpoints")] == [4, 8]
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]

    # flip one byte in the newest checkpoint's weights
    weights = p8 / "model" / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-7] ^= 0xFF
    weights.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as err:
        train(micro_config(out, corpus, steps=12, save_every=4, eval_every=0, resume=True))
    message = str(err.value)
    assert str(weights) in message and str(p4) in message and "step 4" in message
    verify_checkpoint(p4)  # the previous good one is untouched
    # truncated trainer state is caught as well
    state = p4 / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="trainer_state.pt"):
        load_checkpoint(p4)


def test_fine_tune_a_pretrained_model_then_save_and_reload(tmp_path, corpus):
    from kvformer.formats.load import load

    torch.manual_seed(0)
    cfg = ModelConfig(**{**MICRO, "norm": "layernorm", "pos": "learned", "mlp": "gelu",
                         "bias": True, "tie_embeddings": True})
    pretrained = Transformer(cfg)
    kvformer.save(pretrained, tmp_path / "pretrained", ByteTokenizer())
    before = {k: v.clone() for k, v in pretrained.state_dict().items()}

    res = train(micro_config(tmp_path / "ft", corpus, config="gpt2", init=str(
        tmp_path / "pretrained"), steps=3, lr=1e-3, eval_every=0, sample_tokens=0))
    model, tok = load(res.model_dir)
    assert model.cfg == cfg  # the pretrained shape, not --config
    after = model.state_dict()
    assert set(after) == set(before)
    assert any(not torch.equal(after[k], before[k]) for k in before)
    saved = load_checkpoint(res.checkpoint)[1]
    assert all(torch.equal(after[k], saved[k]) for k in saved)
    assert tok.decode(tok.encode("fine-tuned ✓")) == "fine-tuned ✓"


# ------------------------------------------------------------------------------ CLI
def test_cli_verbs_register_and_errors_exit_2(tmp_path, corpus, capsys):
    from kvformer.cli.train import main, register

    parser = argparse.ArgumentParser(prog="kvformer")
    register(parser.add_subparsers(dest="verb", required=True))
    args = parser.parse_args(["train", "--data", str(corpus), "--out", str(tmp_path),
                              "--steps", "5", "--resume", "--bf16", "--grad-accum", "2"])
    assert callable(args.func) and args.steps == 5 and args.resume and args.bf16
    args = parser.parse_args(["experiment", "positions", "--steps", "10"])
    assert callable(args.func) and args.which == "positions"

    assert main(["--data", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_bf16_and_grad_accum_run(tmp_path, corpus):
    res = train(micro_config(tmp_path / "r", corpus, steps=3, bf16=True, grad_accum=2,
                             eval_every=0, sample_tokens=0))
    assert res.step == 3 and math.isfinite(res.loss)


# ------------------------------------------------------------------------------ DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one_with_the_same_global_batch(tmp_path, corpus):
    cfg_file = tmp_path / "micro.json"
    cfg_file.write_text(json.dumps(MICRO))
    flags = ["--config", str(cfg_file), "--data", str(corpus), "--steps", "4",
             "--batch-size", "4", "--seq-len", "32", "--lr", "3e-3", "--warmup", "2",
             "--log-every", "1", "--eval-every", "2", "--eval-tokens", "512",
             "--sample-tokens", "0", "--save-every", "0", "--no-progress", "--seed", "3"]
    torchrun = Path(sys.executable).with_name("torchrun")  # the venv's torchrun, or the same
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m",
                                                          "torch.distributed.run"]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [*launcher, "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(_free_port()), "-m", "kvformer.train", *flags,
         "--out", str(tmp_path / "ddp")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stderr
    one = train(micro_config(tmp_path / "one", corpus, config=str(cfg_file), steps=4,
                             eval_every=2, save_every=0, sample_tokens=0))
    ddp, single = train_losses(tmp_path / "ddp" / "metrics.jsonl"), train_losses(one.metrics)
    assert sorted(ddp) == sorted(single) == [1, 2, 3, 4]
    for step in single:
        assert abs(ddp[step] - single[step]) <= 1e-5
    ddp_eval = [m["val_loss"] for m in read_metrics(tmp_path / "ddp" / "metrics.jsonl")
                if m["type"] == "eval"]
    one_eval = [m["val_loss"] for m in read_metrics(one.metrics) if m["type"] == "eval"]
    assert np.allclose(ddp_eval, one_eval, atol=1e-5)
    assert len(list_checkpoints(tmp_path / "ddp" / "checkpoints")) == 1  # rank 0 only


# ------------------------------------------------------------------------------ Ctrl-C, for real
def test_ctrl_c_saves_a_checkpoint_and_the_same_command_resumes_exactly(tmp_path, corpus):
    from kvformer.cli.train import main

    cfg_file = tmp_path / "micro.json"
    cfg_file.write_text(json.dumps(MICRO))
    out = tmp_path / "run"
    flags = ["--config", str(cfg_file), "--data", str(corpus), "--steps", "150",
             "--batch-size", "4", "--seq-len", "32", "--log-every", "1", "--eval-every", "50",
             "--eval-tokens", "512", "--sample-tokens", "0", "--save-every", "1000",
             "--no-progress", "--threads", "1", "--seed", "5"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "kvformer.train", *flags, "--out", str(out)],
                            env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(1200):  # wait for the first logged steps, then press Ctrl-C
            if len(train_losses(out / "metrics.jsonl")) >= 3 or proc.poll() is not None:
                break
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-2000:]
    assert "SIGINT: finishing step" in err and "--resume" in err and "Traceback" not in err
    (stopped, path), = list_checkpoints(out / "checkpoints")
    assert 3 <= stopped < 150 and f"stopped at step {stopped}/150" in err

    assert main([*flags, "--out", str(out), "--resume", "--quiet"]) == 0
    assert main([*flags, "--out", str(tmp_path / "straight"), "--quiet"]) == 0
    resumed = train_losses(out / "metrics.jsonl")
    straight = train_losses(tmp_path / "straight" / "metrics.jsonl")
    assert sorted(resumed) == sorted(straight) == list(range(1, 151))
    assert max(abs(resumed[s] - straight[s]) for s in straight) <= 1e-6


# ------------------------------------------------------------------------------ experiments
def test_experiment_writes_a_report_and_plots(tmp_path):
    from kvformer.tools.experiments import Settings, run_experiments

    s = Settings(steps=3, batch_size=4, seq_len=16, warmup=1, eval_every=3, eval_tokens=256,
                 final_windows=8, corpus_mb=0.15, d_model=16, n_layer=1, n_head=4, d_ff=32,
                 bench_rounds=1, bench_steps=1)
    r = run_experiments("positions", out=tmp_path / "docs", settings=s, verbose=False)
    md = (tmp_path / "docs" / "experiments.md").read_text()
    assert "n/a: no learned vector past position 15" in md
    assert "| sinusoidal |" in md and "| RoPE |" in md and "Seed check" in md
    assert (tmp_path / "docs" / "img" / "exp_positions.png").stat().st_size > 1000
    assert set(r["groups"]) == {"positions"} and len(r["runs"]) == 3
