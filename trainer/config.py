"""Typed trainer configuration: `configs/train-*.yaml` validated into small pydantic sections, `--set` overrides.

Defaults train the tiny model on CPU. Errors name the key and, for closed choices, the allowed values; the YAML and
override handling is the pipeline's (`pipeline.core.config`), so both commands read recipes the same way.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.core.config import ConfigError, _format_error, _set_path, parse_override, read_recipe
from trainer.data import DataConfig

POSITION_SCHEMES = ("phantom", "kaleido", "ts-rope", "lumosx")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(_Section):
    """Which DiT: a size from `trainer.model.MODEL_SIZES`, field overrides of its `DiTConfig`, a position scheme."""

    size: str = Field("tiny", description="a name in trainer.model.MODEL_SIZES (tiny, 1b, wan-1.3b)")
    overrides: dict[str, Any] = Field(default_factory=dict, description="DiTConfig fields to change, e.g. depth: 2")
    position_scheme: Literal["phantom", "kaleido", "ts-rope", "lumosx"] = "phantom"


class EncoderSection(_Section):
    """A frozen encoder: a local directory or hub id, or `tiny` for random weights built into the run directory."""

    path: str = Field("tiny", description="model directory or hub id; 'tiny' = random tiny model (smoke runs only)")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class TextSection(EncoderSection):
    max_length: int = Field(64, ge=4, description="caption tokens kept (UMT5 in Wan: 512)")


class OptimSection(_Section):
    lr: float = Field(1e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0, description="linear warmup from 0 to lr over this many optimizer steps")
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine decays to lr * this at the last step")
    grad_clip: float | None = Field(1.0, gt=0, description="max global gradient norm; null = no clipping")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")

    @model_validator(mode="after")
    def _check_betas(self):
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1) (got {list(self.betas)})")
        return self


class EmaSection(_Section):
    decay: float = Field(0.999, ge=0, le=1, description="ema = decay * ema + (1 - decay) * weights; 0 = a plain copy")
    start_step: int = Field(0, ge=0, description="before this optimizer step the EMA copies the weights")


class FlowSection(_Section):
    """Rectified flow: x_t = (1 - t) x0 + t eps, target eps - x0; t ~ logit-normal, then shifted toward noise."""

    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    shift: float = Field(1.0, gt=0, description="t' = s t / (1 + (s - 1) t); 1 = no shift")
    shift_base_tokens: int | None = Field(
        None, ge=1, description="resolution-dependent shift: s = shift * sqrt(video tokens / this) (SD3); null = off"
    )
    max_shift: float = Field(12.0, ge=1, description="cap on the resolution-dependent shift")
    loss_buckets: int = Field(4, ge=1, description="the log reports the loss in this many equal t ranges")

    def shift_for(self, video_tokens: int) -> float:
        """The shift for a video of this many latent tokens: more tokens keep more signal, so train on more noise."""
        if self.shift_base_tokens is None:
            return self.shift
        return min(self.max_shift, max(1.0, self.shift * math.sqrt(video_tokens / self.shift_base_tokens)))


class SampleSection(_Section):
    """Preview sampling (`s2v sample`, and a preview after training when `every` > 0)."""

    steps: int = Field(20, ge=1)
    shift: float | None = Field(None, gt=0, description="schedule shift of the Euler steps; null = training's")
    fps: float = Field(8.0, gt=0)
    seed: int = 0


class DistSection(_Section):
    mode: Literal["none", "ddp", "fsdp2"] = Field(
        "none", description="how to wrap the model under torchrun; 'none' in a single process"
    )
    backend: Literal["auto", "nccl", "gloo"] = Field("auto", description="auto = nccl on CUDA, gloo on CPU")


class TrainConfig(_Section):
    data: DataConfig = Field(description="the shard loader (trainer.data.DataConfig); data.shards is set by --shards")
    model: ModelSection = Field(default_factory=ModelSection)
    vae: EncoderSection = Field(default_factory=EncoderSection)
    text: TextSection = Field(default_factory=TextSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    ema: EmaSection = Field(default_factory=EmaSection)
    flow: FlowSection = Field(default_factory=FlowSection)
    sample: SampleSection = Field(default_factory=SampleSection)
    dist: DistSection = Field(default_factory=DistSection)
    steps: int = Field(100, ge=1, description="optimizer steps in total (a resumed run stops at the same step)")
    log_every: int = Field(10, ge=1)
    ckpt_every: int = Field(100, ge=1, description="a checkpoint every this many steps, and always at the end")
    keep_checkpoints: int = Field(2, ge=1, description="older checkpoints are deleted")
    out_dir: str = Field("runs/train", description="checkpoints, metrics.jsonl, tiny encoders, config.yaml")
    seed: int = 0
    cache_dir: str | None = Field(
        None, description="cache VAE latents and text embeddings here, keyed by sample, decoded crop and model"
    )
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto = bf16 autocast on CUDA, fp32 on CPU")
    threads: int | None = Field(
        None, ge=1, description="torch CPU threads; null = torch's default. Tiny models run fastest on 1 (no OpenMP "
                                "barriers), leaving the other cores to the loader's workers"
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    peak_tflops: float | None = Field(
        None, gt=0, description="accelerator peak for the MFU estimate; null = a table for H100/H200/A100, n/a on CPU"
    )
    compile: bool = Field(False, description="torch.compile the DiT (GPU runs)")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def build_train_config(data: dict | None = None, overrides: list[str] | tuple[str, ...] = (),
                       shards: str | Path | None = None) -> TrainConfig:
    """Validate a config dict plus `key=value` overrides (and `shards`, which wins over data.shards); raise
    ConfigError listing every problem."""
    data = json.loads(json.dumps(data or {}))
    for text in overrides:
        key, value = parse_override(text)
        _set_path(data, key, value)
    if shards is not None:
        _set_path(data, "data.shards", str(shards))
    try:
        config = TrainConfig.model_validate(data)
    except ValidationError as exc:
        problems = [_format_error(e, TrainConfig) for e in exc.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems)) from None
    _check_model_size(config.model)
    return config


def _check_model_size(section: ModelSection) -> None:
    from trainer.model import dit_config

    try:
        dit_config(section.size, **{**section.overrides, "position_scheme": section.position_scheme})
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"config key 'model': {exc}") from None


def load_train_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (),
                      shards: str | Path | None = None) -> TrainConfig:
    """Load a YAML recipe (or the defaults when path is None), apply overrides and the shards location."""
    data = read_recipe(path, "data, model, optim")
    try:
        return build_train_config(data, overrides, shards)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None
