"""Preview sampling: Euler steps along the learned flow, from noise (t = 1) to data (t = 0), with the EMA weights,
conditioned on the references and caption of one shard sample; the latents are decoded and written as an mp4."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from pipeline.models.loader import torch_dtype
from trainer.config import TrainConfig
from trainer.train import _video_tokens, checkpoint_dirs, dit_inputs, encode_batch


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory (holding state.json), or the newest one of a run directory."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    found = checkpoint_dirs(path)
    if not found:
        raise FileNotFoundError(f"no checkpoint in {path}: pass a run's out_dir or one of its checkpoints/step-*")
    return found[-1]


def load_for_sampling(checkpoint: Path, device: torch.device):
    """(config, DiT with the EMA weights in eval mode, VAE, text encoder) of a checkpoint."""
    from trainer.encoders import TextEncoder, VideoVAE
    from trainer.model import DiT, DiTConfig

    state = json.loads((checkpoint / "state.json").read_text())
    cfg = TrainConfig.model_validate(state["config"])
    model = DiT(DiTConfig(**state["model_config"]))
    weights = load_file(checkpoint / "model.safetensors")
    weights.update(load_file(checkpoint / "ema.safetensors"))  # EMA values replace the raw weights they track
    model.load_state_dict(weights)
    model.to(device).eval()
    vae = VideoVAE.from_pretrained(state["encoders"]["vae"], dtype=torch_dtype(cfg.vae.dtype), device=str(device))
    text = TextEncoder.from_pretrained(state["encoders"]["text"], dtype=torch_dtype(cfg.text.dtype),
                                       max_length=cfg.text.max_length, device=str(device))
    return cfg, model, vae, text


def flow_times(steps: int, shift: float) -> torch.Tensor:
    """steps + 1 times from 1 to 0, spaced evenly then shifted like training's t (more steps near the noise)."""
    t = torch.linspace(1.0, 0.0, steps + 1)
    return shift * t / (1 + (shift - 1) * t)


@torch.no_grad()
def euler_sample(model, inputs: dict, latent_shape: tuple, steps: int, shift: float,
                 generator: torch.Generator) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from x(1) = noise to x(0): x <- x + (t_next - t) * v."""
    device = inputs["text"].device
    x = torch.randn(latent_shape, generator=generator).to(device)
    times = flow_times(steps, shift).tolist()
    conditioning = dit_inputs(inputs)
    for t, t_next in itertools.pairwise(times):
        v = model(x, torch.full((x.shape[0],), t, device=device), **conditioning)
        x = x + (t_next - t) * v.float()
    return x


def pick_sample(cfg: TrainConfig, shards: str | None, key: str | None) -> dict:
    """One sample as a batch of 1: the one named `key`, else the first; frames from the clip start."""
    from trainer.data import make_loader

    overrides = {"batch_size": 1, "shuffle_buffer": 0, "num_workers": 0, "epochs": 1, "clip_offset": "start",
                 "resampled": False, **({"shards": shards} if shards else {})}
    loader = make_loader(cfg.data.model_copy(update=overrides))
    for batch in loader:
        if key is None or batch["key"][0] == key:
            return batch
    raise KeyError(f"no sample {key!r} in {cfg.data.shards if shards is None else shards}")


def write_preview(video: torch.Tensor, path: Path, fps: float) -> int:
    """Write video [3, F, H, W] in [-1, 1] as an H.264 mp4 (even sizes, as yuv420p needs); returns frames written."""
    from pipeline.core.video import encode_video

    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).cpu().numpy()
    height, width = frames.shape[1] // 2 * 2, frames.shape[2] // 2 * 2
    frames = np.ascontiguousarray(frames[:, :height, :width])
    path.parent.mkdir(parents=True, exist_ok=True)
    encode_video(str(path), list(frames), fps=fps)
    return len(frames)


def sample_preview(checkpoint: str | Path, out: str | Path = "preview.mp4", shards: str | None = None,
                   key: str | None = None, steps: int | None = None, seed: int | None = None,
                   device: str | None = None, log=print) -> dict:
    """Generate one preview clip from a checkpoint for a shard sample's references and caption; returns facts."""
    checkpoint = find_checkpoint(checkpoint)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg, model, vae, text = load_for_sampling(checkpoint, dev)
    batch = pick_sample(cfg, shards, key)
    inputs = encode_batch(batch, vae, text, dev)
    shape = tuple(inputs["x0"].shape)
    shift = cfg.sample.shift or cfg.flow.shift_for(_video_tokens(model.cfg, shape))
    steps = steps or cfg.sample.steps
    generator = torch.Generator().manual_seed(cfg.sample.seed if seed is None else seed)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        latents = euler_sample(model, inputs, shape, steps, shift, generator)
    video = vae.decode(latents)[0]
    frames = write_preview(video, Path(out), cfg.sample.fps)
    log(f"preview: {out} ({frames} frames, {steps} Euler steps, shift {shift:.2f}) for sample {batch['key'][0]}: "
        f"{batch['caption'][0]!r} with {int(batch['ref_valid'].sum())} references, from {checkpoint}")
    return {"path": str(out), "frames": frames, "key": batch["key"][0], "checkpoint": str(checkpoint)}
