import cv2
import numpy as np
from skimage import data

from pipeline.core.config import QualityFilterConfig, build_config
from pipeline.core.record import Record
from pipeline.core.stage import run_stage
from stages.quality import QualityFilter, QualityStats, quality_decision, quality_stats


def clip_with(frames):
    record = Record(kind="clip", source_path="x.mp4", key="k")
    record.blobs["keyframes"] = np.stack(frames)
    return record


def test_stats_then_decision_on_real_photos():
    sharp = data.astronaut()
    dark = (sharp * 0.05).astype(np.uint8)
    blurred = cv2.GaussianBlur(sharp, (0, 0), 8)
    config = build_config()
    records = [clip_with([img] * 3) for img in (sharp, dark, blurred, np.full_like(sharp, 250))]
    for stage in (QualityStats(config), QualityFilter(config)):
        records = run_stage(stage, records)
    assert [r.drop and r.drop["reason"] for r in records] == [None, "too_dark", "blurry", "too_bright"]
    assert all(r.drop is None or r.drop["stage"] == "quality_filter" for r in records)
    stats = records[0].meta["stats"]["quality"]
    assert len(stats["brightness"]) == 3 and stats["sharpness_median"] > 100


def test_decision_reapplies_new_thresholds_without_recomputing():
    stats = quality_stats(np.stack([cv2.GaussianBlur(data.astronaut(), (0, 0), 3)] * 3))
    assert quality_decision(stats, QualityFilterConfig(min_sharpness=stats["sharpness_median"] + 1)) == "blurry"
    assert quality_decision(stats, QualityFilterConfig(min_sharpness=stats["sharpness_median"] - 1)) is None
