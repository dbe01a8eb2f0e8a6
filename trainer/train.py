"""Flow-matching training of the S2V DiT straight from the pipeline's shards.

Read top to bottom: the LR schedule, the EMA, timestep sampling, checkpoints, then `Trainer` (build, one optimizer
step, the run). Single process by default; under `torchrun` the model is wrapped in DDP or FSDP2 (`dist.mode`).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from trainer.config import EmaSection, FlowSection, OptimSection, TrainConfig

# Dense bf16 peaks (no sparsity) for the MFU estimate; `peak_tflops` in the config wins.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def lr_factor(step: int, optim: OptimSection, total_steps: int) -> float:
    """Multiplier of `optim.lr` at optimizer step `step` (0-based): linear warmup, then constant or cosine decay
    reaching `min_lr_ratio` at the last step."""
    if step < optim.warmup_steps:
        return (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - 1 - optim.warmup_steps))
    return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of the trainable weights, kept in fp32 next to them (sharded like them under
    FSDP2)."""

    def __init__(self, model: torch.nn.Module, section: EmaSection):
        self.section = section
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.shadow = [p.detach().clone().float() for p in _trainable(model)]

    @torch.no_grad()
    def update(self, model: torch.nn.Module, step: int) -> None:
        """After optimizer step `step` (0-based): ema <- decay * ema + (1 - decay) * weights; a copy before
        start_step."""
        weight = 1.0 if step < self.section.start_step else 1.0 - self.section.decay
        torch._foreach_lerp_(self.shadow, [p.float() for p in _trainable(model)], weight)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {n: _full(t).cpu() for n, t in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, t in zip(self.names, self.shadow):
            _copy_into(t, state[name])


def _trainable(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Biases, norm scales and the adaLN modulation tables (Wan's `modulation`, shaped [1, 1, 6, dim] and so not
    caught by a dimension test) keep their scale: decaying them pulls the conditioning towards zero."""
    return param.ndim < 2 or name.rsplit(".", 1)[-1].endswith("modulation") or ".norm" in f".{name}"


def decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: weight decay on the trainable weight matrices, none on `_no_decay` parameters."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if not _no_decay(n, p)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if _no_decay(n, p)], "weight_decay": 0.0}]


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a possibly sharded one (FSDP2 DTensor)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


def _copy_into(dst: torch.Tensor, full: torch.Tensor) -> None:
    if hasattr(dst, "device_mesh"):  # a DTensor shard: take this rank's piece of the full tensor
        from torch.distributed.tensor import distribute_tensor

        full = distribute_tensor(full.to(dst.device, dst.dtype), dst.device_mesh, dst.placements)
        dst.to_local().copy_(full.to_local())
    else:
        dst.copy_(full)


def sample_t(n: int, flow: FlowSection, shift: float, generator: torch.Generator) -> torch.Tensor:
    """n flow times in (0, 1): logit-normal, then shifted toward 1 (noise) by t' = s t / (1 + (s - 1) t)."""
    t = torch.sigmoid(torch.randn(n, generator=generator) * flow.logit_std + flow.logit_mean)
    return shift * t / (1 + (shift - 1) * t)


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """The RNG of one micro-batch's t and noise: a function of where we are, so a resumed run draws the same."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1009 + micro) * 65_537 + rank)


# ---------------------------------------------------------------------------------------------- checkpoints


class RunError(RuntimeError):
    """A run that cannot start as configured (torchrun without dist.mode, a checkpoint of another world size)."""


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints in out_dir, oldest first (a half-written one is still a `.tmp` directory)."""
    return sorted(p for p in (Path(out_dir) / "checkpoints").glob("step-*") if p.is_dir() and not p.suffix)


def _rng_state() -> dict:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": np.random.get_state()[1].tolist(),
        "numpy_pos": int(np.random.get_state()[2]),
        "python": list(random.getstate()[1]),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if torch.cuda.is_available() and state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(("MT19937", np.array(state["numpy"], dtype=np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))


# ---------------------------------------------------------------------------------------------- the trainer


@dataclass
class Window:
    """What the log aggregates between two log lines."""

    start: float = field(default_factory=time.perf_counter)
    steps: int = 0
    samples: int = 0
    data_wait: float = 0.0
    flops: float = 0.0
    losses: list[torch.Tensor] = field(default_factory=list)
    ts: list[torch.Tensor] = field(default_factory=list)
    grad_norm: torch.Tensor | None = None
    skipped: int = 0  # steps whose loss was not finite (no update)


class Trainer:
    """Builds everything from a TrainConfig, resumes from the latest checkpoint in out_dir, and trains."""

    def __init__(self, cfg: TrainConfig, resume: bool = True, log=print):
        from trainer.data import make_loader
        from trainer.model import DiT

        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out_dir)
        self.rank, self.world, self.device = _setup_distributed(cfg)
        self.is_main = self.rank == 0
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and self.device.type == "cuda")
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        random.seed(cfg.seed + self.rank)
        np.random.seed(cfg.seed + self.rank)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(cfg.to_yaml())

        self.vae, self.text, self.encoder_paths = build_encoders(cfg, self.out, self.device, self.is_main, log)
        self.caches = None
        if cfg.cache_dir:
            from trainer.encoders import EmbeddingCache

            self.caches = (EmbeddingCache.for_encoder(cfg.cache_dir, self.vae),
                           EmbeddingCache.for_encoder(cfg.cache_dir, self.text))
        self.model_config = build_model_config(cfg, self.vae.latent_channels, self.text.dim)
        self.model = DiT(self.model_config).to(self.device)
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.wrapped = _wrap(self.model, cfg, self.device) if self.world > 1 else self.model
        # After wrapping: under FSDP2 the parameters are now shards, and the EMA and optimizer state follow them.
        self.ema = EMA(self.model, cfg.ema)
        self.opt = torch.optim.AdamW(decay_groups(self.model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                     betas=cfg.optim.betas,
                                     fused=self.device.type == "cuda")
        self.net = torch.compile(self.wrapped) if cfg.compile else self.wrapped
        self.loader = make_loader(cfg.data, self.rank, self.world)
        self.batches = None  # started on the first step, after a resume has set the loader's position
        self.step = 0
        if resume and checkpoint_dirs(self.out):
            self.load(checkpoint_dirs(self.out)[-1])

    def next_batch(self) -> dict:
        if self.batches is None:
            self.batches = iter(self.loader)
        try:
            return next(self.batches)
        except StopIteration:  # a finite pass (data.epochs) ended: the loader goes on with the next epochs
            self.batches = iter(self.loader)
            return next(self.batches)

    # -------------------------------------------------------------------------------------------- one step

    def encode(self, batch: dict) -> dict:
        return encode_batch(batch, self.vae, self.text, self.device, self.caches)

    def loss(self, inputs: dict, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample flow-matching MSE over the video latents and the t it was drawn at."""
        x0 = inputs["x0"]
        shift = self.cfg.flow.shift_for(_video_tokens(self.model_config, x0.shape))
        t = sample_t(x0.shape[0], self.cfg.flow, shift, generator).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        tb = t.view(-1, 1, 1, 1, 1)
        x_t = (1 - tb) * x0 + tb * eps
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            v = self.net(x_t, t, **dit_inputs(inputs))
        per_sample = F.mse_loss(v.float(), eps - x0, reduction="none").mean(dim=(1, 2, 3, 4))
        return per_sample, t

    def train_step(self, window: Window) -> None:
        """One optimizer step over `grad_accum` micro-batches."""
        cfg = self.cfg
        lr = cfg.optim.lr * lr_factor(self.step, cfg.optim, cfg.steps)
        for group in self.opt.param_groups:
            group["lr"] = lr
        losses, ts = [], []
        for micro in range(cfg.optim.grad_accum):
            waited = time.perf_counter()
            batch = self.next_batch()
            window.data_wait += time.perf_counter() - waited
            inputs = self.encode(batch)
            last = micro == cfg.optim.grad_accum - 1
            _sync_grads(self.wrapped, cfg.dist.mode, last)  # only the last micro-batch all-reduces
            per_sample, t = self.loss(inputs, step_generator(cfg.seed, self.step, micro, self.rank))
            (per_sample.mean() / cfg.optim.grad_accum).backward()
            losses.append(per_sample.detach())
            ts.append(t.detach())
            window.samples += per_sample.shape[0] * self.world
            window.flops += model_flops(self.model_config, inputs) * self.world
        if not self._finite(losses):
            # A NaN or inf loss would poison the weights, the optimizer moments and the EMA: the step is skipped
            # (its batches are consumed, so a resume stays exact) and counted in the log.
            self.opt.zero_grad(set_to_none=True)
            window.skipped += 1
            self.step += 1
            window.steps += 1
            return
        window.losses += losses
        window.ts += ts
        if cfg.optim.grad_clip is not None:
            window.grad_norm = torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), cfg.optim.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.ema.update(self.model, self.step)
        self.step += 1
        window.steps += 1

    def _finite(self, losses: list[torch.Tensor]) -> bool:
        """Whether every rank's losses of this step are finite (all ranks skip together, or none does)."""
        finite = torch.stack([torch.isfinite(loss).all() for loss in losses]).all().float()
        if self.world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    # -------------------------------------------------------------------------------------------- the run

    def run(self) -> dict:
        """Train until cfg.steps; log every log_every, checkpoint every ckpt_every and at the end. Returns the last
        logged metrics."""
        cfg = self.cfg
        last = {}
        if self.is_main:
            self.log(f"model: {self.model_config.__class__.__name__} {cfg.model.size} "
                     f"({self.n_params / 1e6:.2f} M params), scheme {cfg.model.position_scheme}, device {self.device}"
                     f"{', bf16 autocast' if self.bf16 else ', fp32'}, world {self.world}; "
                     f"steps {self.step} -> {cfg.steps}")
        if self.step >= cfg.steps and self.is_main:
            self.log(f"nothing to do: the run is at step {self.step} and steps is {cfg.steps} (raise steps to go on)")
        window = Window()
        while self.step < cfg.steps:
            self.train_step(window)
            logged = self.step % cfg.log_every == 0 or self.step == cfg.steps
            if logged:
                last = self.log_window(window)
            if self.step % cfg.ckpt_every == 0 or self.step == cfg.steps:
                self.save()
            if logged:
                window = Window()  # after the checkpoint: saving is not a training step's time
        return last

    def log_window(self, window: Window) -> dict:
        """Aggregate the window over ranks, append it to metrics.jsonl and print one line (rank 0)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the GPU may lag the Python loop: time the work, not its queueing
        wall = time.perf_counter() - window.start
        empty = torch.empty(0, device=self.device)  # every step of the window skipped
        losses, ts = torch.cat(window.losses or [empty]), torch.cat(window.ts or [empty])
        if self.world > 1:
            losses, ts = _all_gather(losses), _all_gather(ts)
        losses, ts = losses.cpu(), ts.cpu()
        edges = torch.linspace(0, 1, self.cfg.flow.loss_buckets + 1)
        buckets = {}
        for i in range(self.cfg.flow.loss_buckets):
            inside = (ts >= edges[i]) & ((ts < edges[i + 1]) | (i == self.cfg.flow.loss_buckets - 1))
            key = f"loss_t{edges[i]:.2f}-{edges[i + 1]:.2f}"
            buckets[key] = round(losses[inside].mean().item(), 6) if inside.any() else None
        step_time = wall / window.steps
        peak = peak_flops(self.cfg, self.device)
        metrics = {
            "step": self.step,
            "loss": losses.mean().item() if losses.numel() else None,
            "skipped_steps": window.skipped,  # non-finite loss: no update
            **buckets,
            "lr": self.opt.param_groups[0]["lr"],
            "grad_norm": None if window.grad_norm is None else _full(window.grad_norm).item(),
            "step_time_s": step_time,
            "samples_per_s": window.samples / wall,
            "data_wait_frac": window.data_wait / wall,
            "mfu": (window.flops / wall / peak) if peak else None,
        }
        if self.is_main:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            mfu = f"{metrics['mfu']:.1%}" if metrics["mfu"] is not None else "n/a"
            per_t = " ".join(f"{v:.3f}" if v is not None else "-" for v in buckets.values())
            loss = f"{metrics['loss']:.4f}" if metrics["loss"] is not None else "n/a"
            skipped = f" | {window.skipped} steps skipped (non-finite loss)" if window.skipped else ""
            self.log(f"step {self.step:>6} | loss {loss}{skipped} | by t [{per_t}] | lr {metrics['lr']:.2e} | "
                     f"{step_time * 1000:.0f} ms/step | {metrics['samples_per_s']:.1f} samples/s | "
                     f"data wait {metrics['data_wait_frac']:.0%} | MFU {mfu}")
        return metrics

    # -------------------------------------------------------------------------------------------- checkpoints

    def save(self) -> Path | None:
        """Write checkpoints/step-NNNNNNN atomically (a .tmp directory renamed when complete); keep the newest few.
        Every rank takes part (FSDP2 gathers full weights); rank 0 writes."""
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.wrapped, options=full)
        optim_state = get_optimizer_state_dict(self.wrapped, self.opt, options=full)
        ema_state = self.ema.state_dict()
        data_states = [self.loader.state_dict()]
        rng_states = [_rng_state()]
        if self.world > 1:
            data_states, rng_states = _gather_objects(data_states[0]), _gather_objects(rng_states[0])
        if not self.is_main:
            return None
        final = self.out / "checkpoints" / f"step-{self.step:07d}"
        tmp = final.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in model_state.items()}, tmp / "model.safetensors")
        save_file(ema_state, tmp / "ema.safetensors")
        torch.save({"optimizer": optim_state, "rng": rng_states}, tmp / "optimizer.pt")
        state = {"step": self.step, "world": self.world, "data": data_states, "encoders": self.encoder_paths,
                 "model_config": _as_dict(self.model_config), "config": self.cfg.model_dump(mode="json")}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in checkpoint_dirs(self.out)[: -self.cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        self.log(f"checkpoint: {final}")
        return final

    def load(self, path: Path) -> None:
        """Restore model, EMA, optimizer, step, RNG and data-loader state: the next step is the one the
        interrupted run would have taken."""
        state = json.loads((path / "state.json").read_text())
        if state["world"] != self.world:
            raise RunError(f"{path} was written by {state['world']} ranks, this run has {self.world}: "
                               "the data-loader state cannot be split differently; resume with the same world size")
        full = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.wrapped, load_file(path / "model.safetensors"), options=full)
        self.ema.load_state_dict(load_file(path / "ema.safetensors"))
        rest = torch.load(path / "optimizer.pt", weights_only=True)
        set_optimizer_state_dict(self.wrapped, self.opt, rest["optimizer"], options=full)
        self.step = state["step"]
        self.loader.load_state_dict(state["data"][self.rank])
        _set_rng_state(rest["rng"][self.rank])
        if self.is_main:
            self.log(f"resumed from {path} at step {self.step}")


# ---------------------------------------------------------------------------------------------- building blocks


@torch.no_grad()
def encode_batch(batch: dict, vae, text_encoder, device: torch.device, caches: tuple | None = None) -> dict:
    """A loader batch -> the DiT's inputs: video and reference latents (VAE; references as 1-frame videos, padding
    slots left at zero), caption embeddings and subject-token masks (text encoder); through the on-disk caches
    (latents, text) when given."""
    from trainer.encoders import encode_batch_latents, encode_text_cached

    latent_cache, text_cache = caches or (None, None)
    x0, refs = encode_batch_latents(vae, batch, latent_cache)
    text = encode_text_cached(text_encoder, batch["caption"], batch.get("subject_words"), text_cache)
    ids = {name: batch[name].to(device) for name in ("ref_valid", "ref_subject", "ref_view", "ref_kind", "ref_group")}
    return {"x0": x0.to(device).float(), "refs": refs.to(device).float() if refs.shape[1] else None, **ids,
            "text": text.emb.to(device).float(), "text_mask": text.mask.to(device),
            "subject_tokens": text.subject_tokens.to(device)}


def dit_inputs(inputs: dict) -> dict:
    """The conditioning keyword arguments of DiT.forward from encode_batch's output."""
    return {name: inputs[name] for name in ("refs", "ref_valid", "ref_subject", "ref_view", "ref_kind", "ref_group",
                                             "text", "text_mask", "subject_tokens")}


def build_encoders(cfg: TrainConfig, out: Path, device: torch.device, is_main: bool, log) -> tuple:
    """The frozen VAE and text encoder, from their paths; `tiny` builds random tiny ones into out/encoders once
    (a resumed run reuses them, so its latents are the same)."""
    from pipeline.core.config import ModelSpec
    from pipeline.models.loader import resolve_model_dir, torch_dtype
    from trainer.encoders import TextEncoder, VideoVAE, build_tiny_text_encoder, build_tiny_vae

    paths = {}
    for name, section, builder in (("vae", cfg.vae, build_tiny_vae), ("text", cfg.text, build_tiny_text_encoder)):
        if section.path != "tiny":
            # A hub id becomes its local snapshot: loading never reaches for the network.
            paths[name] = str(resolve_model_dir(ModelSpec(path=section.path), role=name))
            continue
        target = out / "encoders" / name
        if is_main and not target.exists():
            tmp = target.with_name(f"{name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            builder(tmp)
            os.replace(tmp, target)
        _barrier()
        paths[name] = str(target.resolve())
        if is_main:
            log(f"WARNING: {name} is a tiny RANDOM model ({target}): fine for smoke tests, useless for real "
                f"training; set {name}.path to real weights (Wan2.1 VAE / UMT5)")
    vae = VideoVAE.from_pretrained(paths["vae"], dtype=torch_dtype(cfg.vae.dtype), device=str(device))
    text = TextEncoder.from_pretrained(paths["text"], dtype=torch_dtype(cfg.text.dtype), max_length=cfg.text.max_length,
                                       device=str(device))
    return vae, text, paths


def build_model_config(cfg: TrainConfig, latent_channels: int, text_dim: int):
    """The DiTConfig: a registry size, the config's overrides, its position scheme, the encoders' widths."""
    from trainer.model import dit_config

    return dit_config(cfg.model.size, **{**cfg.model.overrides, "position_scheme": cfg.model.position_scheme,
                                         "in_channels": latent_channels, "text_dim": text_dim})


def model_flops(model_config, inputs: dict) -> float:
    """Model FLOPs of one micro-batch's forward and backward (trainer.model.flops_per_step)."""
    from trainer.model import flops_per_step, token_counts

    x0, refs = inputs["x0"], inputs["refs"]
    k = 0 if refs is None else refs.shape[1]
    ref_hw = (0, 0) if refs is None else tuple(refs.shape[-2:])
    video, ref = token_counts(model_config, tuple(x0.shape[2:]), ref_hw, k)
    return float(flops_per_step(model_config, x0.shape[0], video, ref, inputs["text"].shape[1]))


def _video_tokens(model_config, latent_shape: tuple) -> int:
    from trainer.model import token_counts

    return token_counts(model_config, tuple(latent_shape[2:]), (0, 0), 0)[0]


def peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    """Peak FLOP/s of this accelerator: the config's, else the table's for a known GPU, else None (CPU)."""
    if cfg.peak_tflops:
        return cfg.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tflops * 1e12 for gpu, tflops in PEAK_TFLOPS.items() if gpu in name), None)


def _as_dict(model_config) -> dict:
    from dataclasses import asdict

    return asdict(model_config)


# ---------------------------------------------------------------------------------------------- distributed


def _setup_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (WORLD_SIZE > 1) joins the process group and picks LOCAL_RANK's
    GPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    name = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if world == 1:
        return 0, 1, torch.device(name)
    if cfg.dist.mode == "none":
        raise RunError(f"launched on {world} ranks but dist.mode is none: set dist.mode=ddp or dist.mode=fsdp2")
    device = torch.device(name)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = cfg.dist.backend if cfg.dist.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend)
    return dist.get_rank(), world, device


def _wrap(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """DDP: a full replica per rank, gradients all-reduced. FSDP2: each block's weights, gradients and optimizer
    state sharded over the ranks and gathered just in time (the model object itself becomes the sharded one)."""
    if cfg.dist.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _sync_grads(net: torch.nn.Module, mode: str, sync: bool) -> None:
    """Gradient accumulation: skip the gradient all-reduce on all micro-batches but the last."""
    if mode == "ddp" and hasattr(net, "require_backward_grad_sync"):
        net.require_backward_grad_sync = sync
    elif mode == "fsdp2" and hasattr(net, "set_requires_gradient_sync"):
        net.set_requires_gradient_sync(sync)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_gather(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.as_tensor(x) for x in _gather_objects(t.cpu())])


def _gather_objects(obj) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
