"""Per-clip quality: stats first (brightness, sharpness as variance of the Laplacian), decision second.

The decision reads only the stored stats, so new thresholds can be re-applied without decoding anything.
"""

from __future__ import annotations

import cv2
import numpy as np

from pipeline.core.config import QualityFilterConfig
from pipeline.core.record import Record
from pipeline.core.stage import Stage


def quality_stats(keyframes: np.ndarray) -> dict:
    """Brightness (mean luma, 0-255) and sharpness (variance of the Laplacian of luma) per keyframe."""
    brightness, sharpness = [], []
    for frame in keyframes:
        gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
        brightness.append(float(gray.mean()))
        sharpness.append(float(cv2.Laplacian(gray, cv2.CV_64F).var()))
    return {
        "brightness": brightness,
        "sharpness": sharpness,
        "brightness_mean": float(np.mean(brightness)),
        "sharpness_median": float(np.median(sharpness)),
    }


def quality_decision(stats: dict, cfg: QualityFilterConfig) -> str | None:
    """The drop reason for these stats under these thresholds, or None to keep."""
    if stats["brightness_mean"] < cfg.min_brightness:
        return "too_dark"
    if stats["brightness_mean"] > cfg.max_brightness:
        return "too_bright"
    if stats["sharpness_median"] < cfg.min_sharpness:
        return "blurry"
    return None


class QualityStats(Stage):
    name = "quality_stats"

    def process(self, records: list[Record]) -> list[Record]:
        for record in records:
            record.meta.setdefault("stats", {})["quality"] = quality_stats(record.blobs["keyframes"])
        return records


class QualityFilter(Stage):
    name = "quality_filter"

    def process(self, records: list[Record]) -> list[Record]:
        cfg = self.config.filters.quality
        for record in records:
            reason = quality_decision(record.meta["stats"]["quality"], cfg)
            if reason:
                record.drop_by(self.name, reason)
        return records
