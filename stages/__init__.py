"""One module per stage. `build_flow` lists, in order, the stages a config runs (see docs/concepts.md)."""

from __future__ import annotations

from stages.clip_extract import ClipExtractor
from stages.entities import EntityExtractor
from stages.probe import Prober
from stages.quality import QualityFilter, QualityStats
from stages.shot_cut import ShotCutter

FLOW = [Prober, ShotCutter, ClipExtractor, QualityStats, QualityFilter, EntityExtractor]


def build_flow(config) -> list[type]:
    """The stage classes this config runs: the fixed flow plus the model stages it enables."""
    flow = list(FLOW)
    if config.faces.enabled:
        from stages.faces import FaceDetector

        flow.append(FaceDetector)
    if config.clip_score.model is not None:
        from stages.clip_score import ClipScore

        flow.append(ClipScore)
    return flow


__all__ = ["FLOW", "ClipExtractor", "EntityExtractor", "Prober", "QualityFilter", "QualityStats", "ShotCutter",
           "build_flow"]
