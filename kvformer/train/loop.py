"""The training loop: ``Trainer`` and ``train()``; AdamW, the warmup + cosine schedule,
clipping, accumulation, evaluation, DDP, checkpoints.

    train(TrainConfig(config="tiny", data=["corpus.txt"], out="runs/tiny", steps=300))

One optimizer step consumes ``grad_accum`` micro-batches of ``batch_size`` windows of
``seq_len`` tokens (``batch_size`` is the global micro-batch: under torchrun with K processes
each one reads its own disjoint ``batch_size / K`` windows of it, and DistributedDataParallel
averages the gradients, so K processes compute what one process would).

Everything a run depends on is either a pure function of the step (learning rate, data order)
or saved in the checkpoint (weights, optimizer moments, data position, RNG states), which is why
a run stopped at any step and resumed with ``--resume`` logs the same losses as one that never
stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from kvformer.config import ModelConfig
from kvformer.errors import KvformerError
from kvformer.formats.load import load
from kvformer.formats.native import save_native
from kvformer.formats.tokenizer.tokenizer import Tokenizer
from kvformer.model.transformer import Transformer
from kvformer.runtime.generation import generate
from kvformer.train.checkpoint import (
    MODEL,
    latest_checkpoint,
    list_checkpoints,
    remove_stale_temporaries,
    save_checkpoint,
)
from kvformer.train.config import TrainConfig, TrainResult, load_tokenizer, resolve_model_config
from kvformer.train.data import BatchSampler, eval_starts, open_data, prepare_data, windows_to_batch
from kvformer.train.dist import Dist, setup_distributed
from kvformer.train.metrics import plot_metrics, read_metrics

STATE_VERSION = 1


def lr_at(step: int, base_lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup from base_lr/warmup
    to base_lr over ``warmup`` steps, then a cosine down to base_lr * min_ratio at ``total``."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    min_lr = base_lr * min_ratio
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def rng_state() -> dict:
    """torch, numpy and python RNG states in a form torch.load(weights_only=True) accepts."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (1 << 32))
    random.seed(seed)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- trainer
class Trainer:
    def __init__(self, cfg: TrainConfig, on_step=None, dist_info: Dist | None = None):
        self.cfg = cfg
        self.on_step = on_step
        self.dist = dist_info or setup_distributed(cfg.device)
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / "checkpoints"
        self.metrics_path = self.out / "metrics.jsonl"
        self.stop_requested = False
        self._bar = None
        self._validate()

    # -------------------------------------------------------------- messages
    def log(self, msg: str) -> None:
        if not (self.cfg.verbose and self.dist.main):
            return
        if self._bar is not None:
            self._bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def _validate(self) -> None:
        c = self.cfg
        for name in ("steps", "batch_size", "grad_accum", "log_every", "eval_tokens"):
            value = getattr(c, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        for name in ("eval_every", "save_every", "keep", "sample_tokens"):
            value = getattr(c, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an integer >= 0")
        if c.seq_len is not None and c.seq_len < 1:
            raise ValueError(f"seq_len={c.seq_len} must be positive")
        if c.lr is not None and not c.lr > 0:
            raise ValueError(f"lr={c.lr} must be > 0")
        if c.grad_clip < 0:
            raise ValueError(f"grad_clip={c.grad_clip} must be >= 0 (0 turns it off)")
        if c.batch_size % self.dist.world:
            raise ValueError(f"batch_size={c.batch_size} must be divisible by the number of "
                             f"processes ({self.dist.world}): each takes an equal slice")
        if not c.data:
            raise KvformerError("no training data: give --data with text files or directories")

    # -------------------------------------------------------------- setup
    def _setup(self) -> None:
        c, d = self.cfg, self.dist
        found = list_checkpoints(self.ckpt_root)
        if found and not c.resume:
            raise KvformerError(
                f"{self.out} already holds checkpoints (newest: {found[-1][1].name}); add "
                "--resume to continue that run, or choose another --out")
        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(self.ckpt_root)
        d.barrier()
        ckpt = latest_checkpoint(self.ckpt_root) if c.resume else None
        if c.resume and ckpt is None:
            self.log(f"--resume: no checkpoint in {self.ckpt_root} yet; starting from step 0")

        init_model = None
        if ckpt is not None:
            path, model_cfg, model_state, state = ckpt
            tok_dir = path / MODEL
            self.tokenizer = (Tokenizer.from_dir(tok_dir) if (tok_dir / "tokenizer.json").is_file()
                              else load_tokenizer("byte"))
            self._note_changes(state.get("train_config", {}), model_cfg)
        elif c.init is not None:
            init_model, tok = load(c.init, progress=c.verbose and d.main)
            if c.tokenizer is not None:
                tok = load_tokenizer(c.tokenizer)
            if tok is None:
                raise KvformerError(f"--init {c.init}: the model has no tokenizer; name one "
                                    "with --tokenizer (byte or a model)")
            self.tokenizer = tok
            model_cfg = init_model.cfg
            if self.tokenizer.vocab_size > model_cfg.vocab_size:
                raise KvformerError(
                    f"the tokenizer has {self.tokenizer.vocab_size} tokens but --init "
                    f"{c.init} only {model_cfg.vocab_size} embeddings")
        else:
            self.tokenizer = load_tokenizer(c.tokenizer)
            model_cfg = resolve_model_config(c.config)
            if model_cfg.vocab_size != self.tokenizer.vocab_size:
                self.log(f"vocab_size {model_cfg.vocab_size} -> {self.tokenizer.vocab_size} "
                         "to match the tokenizer")
                model_cfg = model_cfg.replace(vocab_size=self.tokenizer.vocab_size)
        self.model_cfg = model_cfg
        self.seq_len = c.seq_len or min(128, model_cfg.max_seq_len)
        if self.seq_len > model_cfg.max_seq_len:
            raise KvformerError(f"seq_len={self.seq_len} is longer than the model's context "
                                f"(max_seq_len={model_cfg.max_seq_len})")
        self.lr = c.lr if c.lr is not None else (5e-5 if c.init else 1e-3)
        self.warmup = c.warmup if c.warmup is not None else max(1, min(100, c.steps // 10))

        # data: rank 0 tokenizes, the others open what it wrote
        data_dir = Path(c.data_dir) if c.data_dir else self.out / "data"
        if d.main:
            self.data = prepare_data(c.data, self.tokenizer, data_dir, c.val_fraction,
                                     log=self.log if c.verbose else None)
        d.barrier()
        if not d.main:
            self.data = open_data(data_dir)
        self.sampler = BatchSampler(self.data.train, self.seq_len, c.seed)
        n_eval = max(1, c.eval_tokens // self.seq_len)
        self.eval_windows = eval_starts(len(self.data.val), self.seq_len, n_eval)
        if not self.eval_windows:
            raise KvformerError(f"the validation split ({len(self.data.val)} tokens) is shorter "
                                f"than one window of {self.seq_len}; give more text or raise "
                                "--val-fraction")

        # model and optimizer (same seed -> same initial weights on every rank)
        seed_everything(c.seed)
        if ckpt is not None:
            model = Transformer.from_state_dict(model_cfg, model_state)
        elif init_model is not None:
            model = init_model
        else:
            model = Transformer(model_cfg)
        model.float()
        if model.rotary is not None:
            model.rotary.float()
            # every position training and sampling will use, tabulated before DDP sees the
            # buffers (so they are never re-made mid-run)
            model.rotary.ensure(model_cfg.max_seq_len)
        self.model = model.to(d.device).train()
        decay = [p for p in self.model.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": c.weight_decay},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr, betas=tuple(c.betas), eps=1e-8)
        self.step = 0
        self.tokens_seen = 0
        if ckpt is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.sampler.load_state_dict(state["sampler"])
            set_rng_state(state["rng"])
            self.step = int(state["step"])
            self.tokens_seen = int(state.get("tokens_seen", 0))
            self.log(f"resumed from {path} (step {self.step})")
        if d.main:
            self._trim_metrics(self.step if ckpt is not None else 0)
        d.barrier()
        if d.enabled:
            ids = [d.device.index] if d.device.type == "cuda" else None
            self.ddp = DDP(self.model, device_ids=ids)
        else:
            self.ddp = None

    def _note_changes(self, old: dict, ckpt_model_cfg: ModelConfig) -> None:
        new = self.cfg.to_dict()
        changed = [k for k in ("batch_size", "seq_len", "grad_accum", "lr", "warmup", "seed",
                               "steps", "weight_decay", "grad_clip", "min_lr_ratio", "bf16")
                   if k in old and old[k] != new[k]]
        if changed:
            self.log("note: changed since the checkpoint: " + ", ".join(
                f"{k} {old[k]} -> {new[k]}" for k in changed))
        if self.cfg.init is None and not old.get("init"):
            try:
                wanted = resolve_model_config(self.cfg.config)
            except KvformerError:
                return
            if wanted.replace(vocab_size=ckpt_model_cfg.vocab_size) != ckpt_model_cfg:
                self.log("note: --config differs from the checkpoint's model; the checkpoint's "
                         "model is used")

    def _trim_metrics(self, step: int) -> None:
        """Keep the entries up to ``step`` (a resumed run re-logs what came after its
        checkpoint); a fresh run starts an empty file."""
        keep = [m for m in read_metrics(self.metrics_path) if m.get("step", 0) <= step] \
            if step else []
        _write_text_atomic(self.metrics_path, "".join(json.dumps(m) + "\n" for m in keep))

    # -------------------------------------------------------------- pieces of a step
    def _autocast(self):
        if not self.cfg.bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.dist.device.type, dtype=torch.bfloat16)

    def _loss(self, module, x, y) -> torch.Tensor:
        with self._autocast():
            logits = module(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean validation loss over the fixed evaluation windows (shared out between ranks),
        with the model in eval mode (BatchNorm uses its running statistics)."""
        d, model = self.dist, self.model
        model.eval()
        mine = self.eval_windows[d.rank::d.world]
        per_rank = max(1, self.cfg.batch_size // d.world)
        total = torch.zeros(2, dtype=torch.float64, device=d.device)
        for i in range(0, len(mine), per_rank):
            x, y = windows_to_batch(self.data.val, mine[i:i + per_rank], self.seq_len)
            loss = self._loss(model, x.to(d.device), y.to(d.device))
            total[0] += loss.double() * y.numel()
            total[1] += y.numel()
        if d.enabled:
            torch.distributed.all_reduce(total)
        model.train()
        return float(total[0] / total[1])

    @torch.no_grad()
    def sample(self) -> str:
        n_prompt = min(32, self.seq_len // 4, len(self.data.val) - 1)
        n_new = min(self.cfg.sample_tokens, self.model_cfg.max_seq_len - n_prompt)
        if n_prompt < 1 or n_new < 1:
            return ""
        prompt = [int(t) for t in self.data.val[:n_prompt]]
        self.model.eval()
        try:
            new = generate(self.model, prompt, n_new, temperature=0.8, top_k=40, seed=self.step,
                           stop_ids=getattr(self.tokenizer, "stop_ids", ()))
        finally:
            self.model.train()
        return self.tokenizer.decode(prompt + new)

    def save(self) -> Path:
        state = {
            "version": STATE_VERSION,
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "optimizer": self.optimizer.state_dict(),
            "sampler": self.sampler.state_dict(),
            "rng": rng_state(),
            "schedule": {"lr": self.lr, "warmup": self.warmup, "steps": self.cfg.steps,
                         "min_lr_ratio": self.cfg.min_lr_ratio, "kind": "warmup-cosine"},
            "train_config": self.cfg.to_dict(),
            "world_size": self.dist.world,
        }
        return save_checkpoint(self.ckpt_root, self.step, self.model_cfg, self.model.state_dict(),
                               self.tokenizer, state, keep=self.cfg.keep,
                               extra={"trained_by": "kvformer.train", "step": self.step})

    def _write_metric(self, entry: dict) -> None:
        with open(self.metrics_path, "a") as fh:
            fh.write(json.dumps(entry) + "\n")

    def _plot(self) -> None:
        if self.cfg.plot:
            try:
                plot_metrics(read_metrics(self.metrics_path), self.out / "loss.png",
                             f"{self.out.name}: {self.model_cfg.num_params():,} parameters")
            except Exception as exc:  # a plot must never stop a training run
                self.log(f"note: could not draw loss.png ({exc})")

    # -------------------------------------------------------------- signals
    def _handle_signal(self, signum, frame) -> None:
        if self.stop_requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
        if not self.stop_requested:
            self.stop_requested = True
            name = signal.Signals(signum).name
            self.log(f"{name}: finishing step {self.step + 1}, then saving a checkpoint "
                     "(Ctrl-C again to quit without saving)")

    @contextlib.contextmanager
    def _signals(self):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in old:
            signal.signal(s, self._handle_signal)
        try:
            yield
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)

    # -------------------------------------------------------------- the loop
    def run(self) -> TrainResult:
        self._setup()  # Ctrl-C while preparing data aborts at once: there is nothing to save
        with self._signals():
            return self._loop()

    def _loop(self) -> TrainResult:
        c, d = self.cfg, self.dist
        module = self.ddp or self.model
        tokens_per_step = c.batch_size * c.grad_accum * self.seq_len
        last_loss = last_val = None
        checkpoint = None
        progress = c.progress if c.progress is not None else sys.stderr.isatty()
        if d.main and c.verbose:
            n = self.model_cfg.num_params()
            self.log(f"training {n:,} parameters on {d.world} process(es), {d.device}: "
                     f"{c.steps} steps x {tokens_per_step:,} tokens, "
                     f"{len(self.data.train):,} training / {len(self.data.val):,} validation "
                     f"tokens")
        if self.step >= c.steps:
            self.log(f"the run already reached step {self.step} of {c.steps}: nothing to train "
                     "(raise --steps to continue it)")
        if self.step == 0 and c.eval_every and self.step < c.steps:
            last_val = self.evaluate()
            if d.main:
                self._write_metric({"type": "eval", "step": 0, "val_loss": last_val,
                                    "val_ppl": math.exp(min(last_val, 50))})
                self.log(f"step 0: validation loss {last_val:.4f}")
        if progress and d.main and c.verbose:
            self._bar = tqdm(total=c.steps, initial=self.step, unit="step", dynamic_ncols=True,
                             file=sys.stderr)
        interval_time, interval_tokens, tps = 0.0, 0, None
        t_start = time.perf_counter()
        try:
            while self.step < c.steps:
                t0 = time.perf_counter()
                lr = lr_at(self.step, self.lr, self.warmup, c.steps, c.min_lr_ratio)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), dtype=torch.float64, device=d.device)
                for micro in range(c.grad_accum):
                    x, y = self.sampler.next_batch(c.batch_size, d.rank, d.world)
                    x, y = x.to(d.device), y.to(d.device)
                    sync = self.ddp is None or micro == c.grad_accum - 1
                    with contextlib.nullcontext() if sync else self.ddp.no_sync():
                        loss = self._loss(module, x, y)
                        (loss / c.grad_accum).backward()
                    loss_sum += loss.detach().double()
                if c.grad_clip > 0:
                    grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                                     c.grad_clip))
                else:
                    grad_norm = float(torch.linalg.vector_norm(torch.stack([
                        p.grad.norm() for p in self.model.parameters() if p.grad is not None])))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                self.tokens_seen += tokens_per_step
                # one collective per step: the mean loss and whether anyone must stop
                shared = torch.stack([loss_sum / c.grad_accum,
                                      torch.tensor(float(self.stop_requested), dtype=torch.float64,
                                                   device=d.device)])
                if d.enabled:
                    torch.distributed.all_reduce(shared)
                    shared[0] /= d.world
                last_loss = float(shared[0])
                stop = bool(shared[1] > 0)
                if not math.isfinite(last_loss):
                    raise KvformerError(f"the loss became {last_loss} at step {self.step}; "
                                        "lower --lr or raise --warmup (or use --grad-clip)")
                dt = time.perf_counter() - t0
                interval_time += dt
                interval_tokens += tokens_per_step
                if self.on_step is not None and self.on_step(self.step, last_loss):
                    stop = True
                if not d.enabled and self.stop_requested:
                    stop = True  # a signal that came during this step's bookkeeping
                if self._bar is not None:
                    self._bar.update(1)
                    self._bar.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                finished = self.step == c.steps
                if self.step % c.log_every == 0 or finished:
                    tps = interval_tokens / interval_time if interval_time else None
                    entry = {"type": "train", "step": self.step, "loss": last_loss, "lr": lr,
                             "grad_norm": grad_norm, "tokens": self.tokens_seen,
                             "epoch": round(self.sampler.epoch(), 4),
                             "tokens_per_s": tps,
                             "elapsed_s": round(time.perf_counter() - t_start, 3)}
                    if d.main:
                        self._write_metric(entry)
                    if self._bar is None:
                        self.log(f"step {self.step}/{c.steps}  loss {last_loss:.4f}  "
                                 f"lr {lr:.2e}  {tps or 0:,.0f} tokens/s")
                    interval_time, interval_tokens = 0.0, 0
                if (c.eval_every and self.step % c.eval_every == 0) or finished:
                    last_val = self.evaluate()
                    text = self.sample() if (d.main and c.sample_tokens) else ""
                    if d.main:
                        self._write_metric({"type": "eval", "step": self.step,
                                            "val_loss": last_val,
                                            "val_ppl": math.exp(min(last_val, 50)),
                                            "sample": text})
                        self.log(f"step {self.step}: validation loss {last_val:.4f}"
                                 + (f"  sample: {text!r}" if text else ""))
                        self._plot()
                    d.barrier()
                if (c.save_every and self.step % c.save_every == 0) or finished or stop:
                    if d.main:
                        checkpoint = self.save()
                    d.barrier()
                if stop:
                    break
        finally:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

        model_dir = None
        if self.step >= c.steps:
            if d.main:
                model_dir = save_native(self.out / "model", self.model_cfg,
                                        self.model.state_dict(), self.tokenizer,
                                        extra={"trained_by": "kvformer.train",
                                               "step": self.step})
                self._plot()
                if last_loss is not None:
                    self.log(f"done: {self.step} steps, loss {last_loss:.4f}, validation loss "
                             f"{last_val:.4f}; model in {model_dir}")
                else:
                    self.log(f"model in {model_dir}")
            d.barrier()
        elif d.main:
            self.log(f"stopped at step {self.step}/{c.steps}; checkpoint saved in {checkpoint}; "
                     "run the same command with --resume to continue")
        if checkpoint is None:
            found = list_checkpoints(self.ckpt_root)
            checkpoint = found[-1][1] if found else None
        return TrainResult(out=self.out, step=self.step, steps=c.steps,
                           interrupted=self.step < c.steps, loss=last_loss, val_loss=last_val,
                           model_dir=model_dir, checkpoint=checkpoint,
                           metrics=self.metrics_path, tokens_per_s=tps)


def train(cfg: TrainConfig | None = None, on_step=None, **kwargs) -> TrainResult:
    """Run (or resume) a training run. ``train(TrainConfig(...))`` or ``train(data=[...],
    out=..., steps=...)``. ``on_step(step, loss) -> bool`` is called after every optimizer
    step; returning True stops the run there as Ctrl-C would (checkpoint, then return)."""
    if cfg is None:
        cfg = TrainConfig(**kwargs)
    elif kwargs:
        cfg = dataclasses.replace(cfg, **kwargs)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist_info = setup_distributed(cfg.device)
    try:
        return Trainer(cfg, on_step, dist_info).run()
    finally:
        if dist_info.owns_group:
            torch.distributed.destroy_process_group()
