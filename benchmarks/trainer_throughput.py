"""Trainer throughput on this machine: can the shard loader keep the training step fed, and what does the trainer's
own bookkeeping cost?

- loader_samples_per_s: batches from `trainer.data.make_loader` over the shards (decode, resize, collate) with the
  config's `data.num_workers`, after a warm-up batch.
- train_samples_per_s: `Trainer.train_step` on one fixed batch (no data wait): VAE and text encoding, the DiT's
  forward and backward, clipping, AdamW, EMA, metrics.
- loader_headroom = loader / train (target >= 3 at the tiny config: the loader must not be what a run waits on).
- overhead_vs_plain_loop = the trainer's step time over a minimal plain-PyTorch loop (encode, t and noise, forward,
  MSE, backward, AdamW, zero_grad) of the same model and batch, measured in alternating rounds in the same run
  (target <= 1.15).

Prints one JSON object on its last line.

    python benchmarks/trainer_throughput.py [--config configs/train-tiny.yaml] [--shards out/shards | --synthetic]

Without --shards it uses out/shards when the quickstart has been run, else (or with --synthetic) 24 synthetic
samples in the same format (real H.264 clips of 40 frames, 0-3 references and a background plate).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.testing.synthetic_shards import write_synthetic_shards
from trainer.config import load_train_config
from trainer.data import make_loader
from trainer.model import DiT
from trainer.train import Trainer, Window, dit_inputs, encode_batch, sample_t, step_generator

REPO = Path(__file__).resolve().parents[1]


def loader_rate(cfg, batches: int) -> float:
    """Samples/s of the loader alone, after its first batch (worker start-up and imports are not throughput)."""
    stream = iter(make_loader(cfg.data.model_copy(update={"epochs": None})))
    next(stream)
    start, samples = time.perf_counter(), 0
    for batch in itertools.islice(stream, batches):
        samples += len(batch["key"])
    return samples / (time.perf_counter() - start)


class PlainLoop:
    """The same model, optimizer and batch in the fewest lines of PyTorch: the baseline for the trainer's overhead."""

    def __init__(self, trainer: Trainer, batch: dict):
        torch.manual_seed(0)
        self.trainer, self.batch = trainer, batch
        self.model = DiT(trainer.model_config).to(trainer.device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=trainer.cfg.optim.lr)
        self.step = 0

    def train_step(self) -> None:
        tr = self.trainer
        inputs = encode_batch(self.batch, tr.vae, tr.text, tr.device)
        x0 = inputs["x0"]
        g = step_generator(0, self.step, 0, 0)
        t = sample_t(x0.shape[0], tr.cfg.flow, 1.0, g)
        eps = torch.randn(x0.shape, generator=g)
        tb = t.view(-1, 1, 1, 1, 1)
        v = self.model((1 - tb) * x0 + tb * eps, t, **dit_inputs(inputs))
        F.mse_loss(v, eps - x0).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1


def timed(step, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "train-tiny.yaml"))
    parser.add_argument("--shards", help="shards dir or curated OUT dir (default: out/shards, else synthetic)")
    parser.add_argument("--synthetic", action="store_true", help="24 synthetic samples with 0-3 references each")
    parser.add_argument("--rounds", type=int, default=5, help="alternating trainer / plain-loop rounds")
    parser.add_argument("--steps", type=int, default=6, help="steps per round")
    parser.add_argument("--loader-batches", type=int, default=20)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        quickstart = REPO / "out" / "shards"
        shards = args.shards or (str(quickstart) if quickstart.is_dir() and not args.synthetic else None)
        if not shards:
            write_synthetic_shards(Path(tmp) / "shards", 24, max_refs=3, frames=40)
            shards = str(Path(tmp) / "shards")
        # One micro-batch per step: the plain loop has no accumulation to compare against.
        cfg = load_train_config(args.config, [*args.overrides, f"out_dir={tmp}/run", "optim.grad_accum=1"],
                                shards=shards)
        loader_sps = loader_rate(cfg, args.loader_batches)

        trainer = Trainer(cfg, resume=False, log=lambda *_: None)
        batch = trainer.next_batch()
        trainer.batches = itertools.repeat(batch)
        plain = PlainLoop(trainer, batch)
        window = Window()
        for _ in range(2):  # warm-up: allocator, caches, first-call costs
            trainer.train_step(window)
            plain.train_step()
        trainer_times, plain_times = [], []
        for _ in range(args.rounds):
            trainer_times.append(timed(lambda: trainer.train_step(Window()), args.steps))
            plain_times.append(timed(plain.train_step, args.steps))
        trainer_s, plain_s = statistics.median(trainer_times), statistics.median(plain_times)
        samples = len(batch["key"])
        train_sps = samples / trainer_s
        result = {
            "loader_samples_per_s": round(loader_sps, 2),
            "train_samples_per_s": round(train_sps, 2),
            "loader_headroom": round(loader_sps / train_sps, 2),
            "overhead_vs_plain_loop": round(trainer_s / plain_s, 3),
            "trainer_step_ms": round(trainer_s * 1000, 1),
            "plain_step_ms": round(plain_s * 1000, 1),
            "batch": {"samples": samples, "video": list(batch["video"].shape), "refs": list(batch["refs"].shape)},
            "loader_workers": cfg.data.num_workers,
            "threads": torch.get_num_threads(),
            "config": args.config,
            "shards": shards,
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
