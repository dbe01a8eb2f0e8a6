"""One module per stage, and the flow table: which stages a config runs, in order, the models each needs, and the
offline substitute it uses where the design's model is not configured (docs/concepts.md). The flow, preflight,
the description printed at the start of a run (and kept in its ledger line) and the funnel's stage order are all
read from `FLOW`: adding a stage is adding a row."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.core.config import ModelSpec, RunConfig

# (role for messages, the spec, how to locate its files; None = the loader's resolve_model_dir)
Need = tuple[str, ModelSpec, Callable[[ModelSpec, str], object] | None]


def _never(_config: RunConfig) -> list:
    return []


def _none(_config: RunConfig) -> None:
    return None


@dataclass(frozen=True)
class Row:
    """One stage of the flow. `when` says whether a config runs it; `needs` the model files preflight must find
    (asked of every config, whether the stage runs or not, so a model named in the config is always checked);
    `substitute` the offline stand-in it uses, if any; `off` what a config turns off here (features too)."""

    name: str
    target: str  # "module:Class"
    when: Callable[[RunConfig], bool] = lambda config: True
    needs: Callable[[RunConfig], list[Need]] = field(default=_never)
    substitute: Callable[[RunConfig], str | None] = field(default=_none)
    off: Callable[[RunConfig], list[str]] = field(default=_never)

    def stage_class(self) -> type:
        module, name = self.target.split(":")
        return getattr(importlib.import_module(module), name)


def _grounded(config: RunConfig) -> bool:
    """The S2V sample stages need boxes; without grounding, samples are plain captioned clips."""
    return config.grounding.model is not None


def _dino(config: RunConfig) -> bool:
    return _grounded(config) and config.grounding.backend == "grounding-dino"


def _spec(role: str, spec: ModelSpec | None, locate=None) -> list[Need]:
    return [] if spec is None else [(role, spec, locate)]


def _saliency_file(spec: ModelSpec, role: str):
    from stages.saliency_grounding import saliency_model_file

    return saliency_model_file(spec, role)


def _mobile_sam_checkpoint(_spec: ModelSpec | None, _role: str):
    from stages.segmentation import mobile_sam_checkpoint

    return mobile_sam_checkpoint()


def _segmentation_needs(config: RunConfig) -> list[Need]:
    needs = _spec("segmentation", config.segmentation.model)
    if _grounded(config) and config.segmentation.backend == "mobile_sam" and config.segmentation.model is None:
        needs.append(("segmentation", None, _mobile_sam_checkpoint))  # the package's bundled MobileSAM weights
    return needs


def _saliency_substitute(config: RunConfig) -> str:
    s = config.grounding.saliency
    return ("U2-Net-p salient regions bound to entities by rule (instead of Grounding DINO: no open-vocabulary "
            "labels)" + ("; people from dlib faces, 'person' subjects where no caption word names them" if s.people
                         else "") + ("; attribute regions by face geometry" if s.attributes else ""))


def _metrics_substitute(config: RunConfig) -> str | None:
    if config.clip_score.model is None or config.metrics.background_measure == "hsv":
        return "background decoupling by HSV histogram correlation (instead of CLIP)"
    return None


def _metrics_off(config: RunConfig) -> list[str]:
    if not _grounded(config):
        return []
    if not config.metrics.enabled:
        return ["metrics"]
    return ["metrics.dino_i"] if config.metrics.dino_model is None else []  # CLIP-I and faces still measure


FLOW: list[Row] = [
    Row("probe", "stages.probe:Prober"),
    Row("shot_cut", "stages.shot_cut:ShotCutter"),
    Row("clip_extract", "stages.clip_extract:ClipExtractor"),
    Row("quality_stats", "stages.quality:QualityStats"),
    Row("quality_filter", "stages.quality:QualityFilter"),
    Row("caption", "stages.captioning:Captioner", when=lambda c: c.caption.model is not None,
        needs=lambda c: _spec("caption", c.caption.model),
        substitute=lambda c: None if c.caption.model is not None
        else "captions from the input metadata (no caption.model: Qwen2.5-VL)"),
    # Grounding DINO finds the people first, so the VLM binds attributes to boxes it has seen.
    Row("person_grounding", "stages.grounding:PersonGrounder",
        when=lambda c: c.entities.model is not None and _dino(c)),
    Row("entities", "stages.vlm_entities:VlmEntityExtractor", when=lambda c: c.entities.model is not None,
        needs=lambda c: _spec("entities", c.entities.model),
        substitute=lambda c: None if c.entities.model is not None
        else "taxonomy matching on the caption (no entities.model: Qwen2.5-VL)"),
    Row("entities", "stages.entities:EntityExtractor", when=lambda c: c.entities.model is None),
    Row("grounding", "stages.grounding:Grounder", when=_dino,
        needs=lambda c: _spec("grounding", c.grounding.model, _saliency_file if c.grounding.backend == "saliency"
                              else None),
        off=lambda c: [] if _grounded(c) else ["grounding"]),
    Row("grounding", "stages.saliency_grounding:SaliencyGrounder",
        when=lambda c: _grounded(c) and c.grounding.backend == "saliency",
        substitute=lambda c: _saliency_substitute(c) if _grounded(c) and c.grounding.backend == "saliency" else None),
    Row("segmentation", "stages.segmentation:Segmenter", when=lambda c: _grounded(c) and c.segmentation.enabled(),
        needs=_segmentation_needs,
        substitute=lambda c: "MobileSAM real weights (instead of SAM ViT-H)"
        if _grounded(c) and c.segmentation.backend == "mobile_sam" else None,
        off=lambda c: [] if _grounded(c) and c.segmentation.enabled() else ["segmentation"]),
    Row("faces", "stages.faces:FaceDetector", when=lambda c: c.faces.enabled,
        needs=lambda c: _spec("faces", c.faces.model) if c.faces.enabled else [],
        substitute=lambda c: "dlib HOG + ResNet-128 real weights (instead of InsightFace buffalo_l)"
        if c.faces.enabled and c.faces.backend == "dlib" else None,
        off=lambda c: [] if c.faces.enabled else ["faces"]),
    Row("clip_score", "stages.clip_score:ClipScore", when=lambda c: c.clip_score.model is not None,
        needs=lambda c: _spec("clip_score", c.clip_score.model),
        off=lambda c: [] if c.clip_score.model is not None else ["clip_score"]),
    Row("instance_stats", "stages.instances:InstanceStats", when=_grounded),
    Row("instance_filter", "stages.instances:InstanceFilter", when=_grounded),
    Row("consolidation", "stages.consolidation:Consolidator", when=_grounded),
    # Before references: a subject that is not in the video gets no reference.
    Row("tracking", "stages.tracking:SubjectTracker", when=lambda c: _grounded(c) and c.tracking.enabled,
        off=lambda c: ["tracking"] if _grounded(c) and not c.tracking.enabled else []),
    Row("track_filter", "stages.tracking:TrackFilter", when=lambda c: _grounded(c) and c.tracking.enabled),
    Row("references", "stages.references:ReferenceCutter", when=_grounded),
    # Without the FLUX Redux models its share of the reference mix goes to the other variants.
    Row("redux", "stages.redux:Reduxer", when=lambda c: _grounded(c) and c.redux.enabled(),
        needs=lambda c: [("redux", c.redux.model, None), ("redux base", c.redux.base_model, None)]
        if _grounded(c) and c.redux.enabled() else [],
        off=lambda c: ["references.redux"] if _grounded(c) and not c.redux.enabled() else []),
    Row("inpainting", "stages.inpainting:Inpainter", when=_grounded,
        needs=lambda c: _spec("inpaint", c.inpaint.model) if _grounded(c) and c.inpaint.backend == "flux-fill"
        else [],
        substitute=lambda c: "OpenCV Telea fill on CPU (instead of FLUX.1-Fill)"
        if _grounded(c) and c.inpaint.backend == "opencv" else None),
    # Last: it reads the finished references, the plate and every stage's stats.
    Row("metrics", "stages.metrics:SampleMetrics", when=lambda c: _grounded(c) and c.metrics.enabled,
        needs=lambda c: _spec("metrics.dino_model", c.metrics.dino_model) if _grounded(c) and c.metrics.enabled
        else [],
        substitute=lambda c: _metrics_substitute(c) if _grounded(c) and c.metrics.enabled else None,
        off=_metrics_off),
]


def build_flow(config: RunConfig) -> list[type]:
    """The stage classes this config runs, in flow order."""
    return [row.stage_class() for row in FLOW if row.when(config)]


def stage_order() -> list[str]:
    """Every stage name the flow can hold, in flow order (the funnel's order)."""
    return list(dict.fromkeys(row.name for row in FLOW))


def preflight(config: RunConfig) -> None:
    """Fail before any work when a configured model or the taxonomy cannot be found: one clear message instead of
    every worker failing the same way. Only locates files; loading happens once per worker in `setup()`."""
    import yaml

    from pipeline.core.config import ConfigError
    from pipeline.core.storage import is_remote, open_storage
    from pipeline.models.loader import ModelUnavailable, resolve_model_dir
    from taxonomies.matcher import Taxonomy

    problems = []
    for row in FLOW:
        for role, spec, locate in row.needs(config):
            try:
                # A model in object storage: the workers copy it (loader.cached_model_dir); here, is anything there?
                if spec is not None and is_remote(spec.path):
                    if next(open_storage(spec.path).list(), None) is None:
                        problems.append(f"{role} model '{spec.path}': nothing is stored under that prefix")
                    continue
                (locate or resolve_model_dir)(spec, role)
            except (ModelUnavailable, OSError) as exc:
                problems.append(str(exc))
    try:
        Taxonomy.load(config.entities.taxonomy)  # every flow matches entities to it
    except (OSError, ValueError, yaml.YAMLError) as exc:
        problems.append(f"entities.taxonomy: {exc}")
    if problems:
        raise ConfigError("\n".join(dict.fromkeys(problems)))


def describe_flow(config: RunConfig) -> dict:
    """What this config runs, where it uses an offline substitute for the design's model, and what is off.
    Printed at the start of a run and kept in its ledger entry, so every output says how it was made."""
    substitutes, off = {}, []
    for row in FLOW:
        text = row.substitute(config)
        if text:
            substitutes[row.name] = text
        off += [name for name in row.off(config) if name not in off]
    return {"stages": [row.name for row in FLOW if row.when(config)], "substitutes": substitutes, "off": off}


__all__ = ["FLOW", "Row", "build_flow", "describe_flow", "preflight", "stage_order"]
