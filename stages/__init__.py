"""One module per stage. `build_flow` lists, in order, the stages a config runs (see docs/concepts.md)."""

from __future__ import annotations

from stages.clip_extract import ClipExtractor
from stages.entities import EntityExtractor
from stages.probe import Prober
from stages.quality import QualityFilter, QualityStats
from stages.shot_cut import ShotCutter

FLOW = [Prober, ShotCutter, ClipExtractor, QualityStats, QualityFilter, EntityExtractor]


def build_flow(config) -> list[type]:
    """The stage classes this config runs: the fixed flow, with the model stages it enables in their places."""
    flow = list(FLOW[:5])
    if config.caption.model is not None:
        from stages.captioning import Captioner

        flow.append(Captioner)
    dino = config.grounding.model is not None and config.grounding.backend == "grounding-dino"
    if config.entities.model is not None:
        from stages.vlm_entities import VlmEntityExtractor

        if dino:
            from stages.grounding import PersonGrounder

            flow.append(PersonGrounder)
        flow.append(VlmEntityExtractor)
    else:
        flow.append(EntityExtractor)
    if config.grounding.model is not None:
        if dino:
            from stages.grounding import Grounder

            flow.append(Grounder)
        else:
            from stages.saliency_grounding import SaliencyGrounder

            flow.append(SaliencyGrounder)
        if config.segmentation.enabled():
            from stages.segmentation import Segmenter

            flow.append(Segmenter)
    if config.faces.enabled:
        from stages.faces import FaceDetector

        flow.append(FaceDetector)
    if config.clip_score.model is not None:
        from stages.clip_score import ClipScore

        flow.append(ClipScore)
    if config.grounding.model is not None:
        # The S2V sample: instances filtered, consolidated across keyframes, cut into references, and a clean
        # background plate. All of it needs boxes; without grounding, samples are plain captioned clips.
        from stages.consolidation import Consolidator
        from stages.inpainting import Inpainter
        from stages.instances import InstanceFilter, InstanceStats
        from stages.references import ReferenceCutter

        flow += [InstanceStats, InstanceFilter, Consolidator, ReferenceCutter]
        if config.redux.enabled():
            from stages.redux import Reduxer

            flow.append(Reduxer)
        flow.append(Inpainter)
        if config.metrics.enabled:
            from stages.metrics import SampleMetrics

            flow.append(SampleMetrics)  # last: it reads the finished references, plate and every stage's stats
    return flow


def preflight(config) -> None:
    """Fail before any work when a configured model or the taxonomy cannot be found: one clear message instead of
    every worker failing the same way. Only locates files; loading happens once per worker in `setup()`."""
    import yaml

    from pipeline.core.config import ConfigError
    from pipeline.models.loader import ModelUnavailable, resolve_model_dir
    from taxonomies.matcher import Taxonomy

    problems = []
    for role in ("caption", "entities", "grounding", "segmentation", "faces", "clip_score"):
        spec = getattr(getattr(config, role), "model", None)
        if spec is not None and (role != "faces" or config.faces.enabled):
            try:
                if role == "grounding" and config.grounding.backend == "saliency":
                    from stages.saliency_grounding import saliency_model_file

                    saliency_model_file(spec, role)
                else:
                    resolve_model_dir(spec, role)
            except ModelUnavailable as exc:
                problems.append(str(exc))
    if config.grounding.model is not None:
        generative = [("inpaint", config.inpaint.model)] if config.inpaint.backend == "flux-fill" else []
        if config.redux.enabled():
            generative += [("redux", config.redux.model), ("redux base", config.redux.base_model)]
        for role, spec in generative:
            try:
                resolve_model_dir(spec, role)
            except ModelUnavailable as exc:
                problems.append(str(exc))
    if config.grounding.model is not None and config.segmentation.backend == "mobile_sam":
        from stages.segmentation import mobile_sam_checkpoint

        try:
            if config.segmentation.model is None:
                mobile_sam_checkpoint()
        except ModelUnavailable as exc:
            problems.append(str(exc))
    if config.grounding.model is not None and config.metrics.enabled and config.metrics.dino_model is not None:
        try:
            resolve_model_dir(config.metrics.dino_model, "metrics.dino_model")
        except ModelUnavailable as exc:
            problems.append(str(exc))
    try:
        Taxonomy.load(config.entities.taxonomy)
    except (OSError, ValueError, yaml.YAMLError) as exc:
        problems.append(f"entities.taxonomy: {exc}")
    if problems:
        raise ConfigError("\n".join(problems))


def describe_flow(config) -> dict:
    """What this config runs, where it uses an offline substitute for the design's model, and what is off.
    Printed at the start of a run and kept in its ledger entry, so every output says how it was made."""
    substitutes, off = {}, []
    if config.caption.model is None:
        substitutes["caption"] = "captions from the input metadata (no caption.model: Qwen2.5-VL)"
    if config.entities.model is None:
        substitutes["entities"] = "taxonomy matching on the caption (no entities.model: Qwen2.5-VL)"
    if config.faces.enabled and config.faces.backend == "dlib":
        substitutes["faces"] = "dlib HOG + ResNet-128 real weights (instead of InsightFace buffalo_l)"
    if config.grounding.model is not None and config.grounding.backend == "saliency":
        substitutes["grounding"] = ("U2-Net-p salient regions bound to entities by rule (instead of Grounding "
                                    "DINO: no open-vocabulary labels)")
    if config.grounding.model is not None and config.segmentation.backend == "mobile_sam":
        substitutes["segmentation"] = "MobileSAM real weights (instead of SAM ViT-H)"
    if config.grounding.model is None:
        off.append("grounding")
    if config.grounding.model is None or not config.segmentation.enabled():
        off.append("segmentation")
    if config.clip_score.model is None:
        off.append("clip_score")
    if config.grounding.model is not None:
        if config.inpaint.backend == "opencv":
            substitutes["inpainting"] = "OpenCV Telea fill on CPU (instead of FLUX.1-Fill)"
        if not config.redux.enabled():
            off.append("references.redux")  # no FLUX Redux models: its share of the mix goes to the others
        if config.metrics.enabled:
            if config.clip_score.model is None or config.metrics.background_measure == "hsv":
                substitutes["metrics"] = "background decoupling by HSV histogram correlation (instead of CLIP)"
            if config.metrics.dino_model is None:
                off.append("metrics.dino_i")  # no DINOv2 model: CLIP-I (with clip_score) and faces still measure
        else:
            off.append("metrics")
    if not config.faces.enabled:
        off.append("faces")
    return {"stages": [cls.name for cls in build_flow(config)], "substitutes": substitutes, "off": off}


__all__ = ["FLOW", "ClipExtractor", "EntityExtractor", "Prober", "QualityFilter", "QualityStats", "ShotCutter",
           "build_flow", "describe_flow", "preflight"]
