"""One module per stage. FLOW is the order records pass through them (see docs/concepts.md)."""

from stages.clip_extract import ClipExtractor
from stages.probe import Prober
from stages.quality import QualityFilter, QualityStats
from stages.shot_cut import ShotCutter

FLOW = [Prober, ShotCutter, ClipExtractor, QualityStats, QualityFilter]

__all__ = ["FLOW", "ClipExtractor", "Prober", "QualityFilter", "QualityStats", "ShotCutter"]
