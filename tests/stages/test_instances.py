"""Instance filters on synthetic instances cut from real photos: each bad one fails for its own reason only."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data

from pipeline.core.config import build_config
from pipeline.core.record import Record
from pipeline.core.stage import run_stage
from stages.instances import InstanceFilter, InstanceStats, instance_decision

WIDTH, HEIGHT = 640, 360


def frame() -> np.ndarray:
    """A real, well-lit textured photo with a dark corner and a blurred band to place instances in."""
    image = cv2.resize(data.astronaut(), (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)
    # A near-black corner that still has texture (values 0 and 16), so it is dark without being blurry.
    image[300:, :120] = (image[300:, :120] > image[300:, :120].mean())[..., :1] * np.uint8(16)
    image[:, 560:] = cv2.GaussianBlur(image[:, 560:], (0, 0), 12)  # heavily blurred right band
    return image


# name -> (box, entity); each bad instance breaks exactly one threshold of the defaults.
INSTANCES = {
    "good": ([150, 40, 330, 300], "e0"),
    "tiny": ([200, 100, 215, 112], "e1"),  # 0.08 % of the frame
    "huge": ([0, 0, 640, 350], "e2"),  # 97 % of the frame; it also overlaps everything, see below
    "overlap_a": ([380, 60, 520, 250], "e3"),
    "overlap_b": ([390, 70, 530, 260], "e4"),  # IoU ~0.78 with overlap_a: both fail
    "dark": ([5, 305, 115, 358], "e5"),
    "blurred": ([565, 40, 638, 300], "e6"),
}


def record(names) -> Record:
    rec = Record(kind="clip", source_path="x.mp4", key="k")
    rec.blobs["keyframes"] = frame()[None]
    rec.meta["entities"] = [{"id": e, "kind": "object", "word": n} for n, (_, e) in INSTANCES.items()]
    rec.meta["detections"] = [{"id": f"d{i}", "keyframe": 0, "entity": INSTANCES[n][1], "label": n, "part": None,
                               "box": INSTANCES[n][0], "score": 0.9} for i, n in enumerate(names)]
    rec.meta["faces"] = []
    return rec


def run(rec: Record, overrides=()) -> dict[str, list[str]]:
    config = build_config({}, list(overrides))
    for stage in (InstanceStats(config), InstanceFilter(config)):
        run_stage(stage, [rec])
    return {d["label"]: d["rejected"] for d in rec.meta["detections"]}


def test_each_bad_instance_fails_for_its_own_reason():
    names = ["good", "tiny", "overlap_a", "overlap_b", "dark", "blurred"]
    rejected = run(record(names))
    assert rejected == {"good": [], "tiny": ["too_small"], "overlap_a": ["overlap"], "overlap_b": ["overlap"],
                        "dark": ["too_dark"], "blurred": ["blurry"]}


def test_a_huge_instance_is_too_large_and_counts_are_kept():
    rec = record(["good", "huge"])
    rejected = run(rec, ["filters.instances.max_iou=1.0"])
    assert rejected == {"good": [], "huge": ["too_large"]}
    assert rec.meta["stats"]["instances"] == {"total": 2, "valid": 1, "rejected": {"too_large": 1}}
    assert [d["valid"] for d in rec.meta["detections"]] == [True, False]


def test_masks_set_area_and_brightness_when_present():
    rec = record(["good"])
    mask = np.zeros((1, HEIGHT, WIDTH), np.uint8)
    mask[0, 100:110, 200:210] = 1  # the box is big, the mask tiny: the mask decides
    rec.blobs["masks"] = mask
    assert run(rec) == {"good": ["too_small"]}
    assert rec.meta["detections"][0]["stats"]["area"] == pytest.approx(100 / (WIDTH * HEIGHT), abs=1e-5)


def test_humans_need_a_good_frontal_face():
    rec = record(["good"])
    rec.meta["entities"][0]["kind"] = "subject"
    assert run(rec) == {"good": ["no_face"]}
    rec.meta["faces"] = [{"detection": "d0", "score": 0.9, "frontal": False, "size_px": 20}]
    assert run(rec) == {"good": ["not_frontal", "face_too_small"]}
    rec.meta["faces"] = [{"detection": "d0", "score": 0.9, "frontal": True, "size_px": 60}]
    assert run(rec) == {"good": []}
    assert run(rec, ["filters.instances.min_face_score=0.95"]) == {"good": ["face_score"]}
    rec.meta["faces"] = []
    assert run(rec, ["filters.instances.require_face=false"]) == {"good": []}


def test_decision_reads_only_the_stats():
    stats = {"area": 0.2, "max_iou": 0.1, "brightness": 120.0, "sharpness": 50.0, "clip_category": 0.18,
             "human": False, "face": None}
    cfg = build_config().filters.instances
    assert instance_decision(stats, cfg) == []
    cfg = build_config({}, ["filters.instances.min_clip_score=0.2"]).filters.instances
    assert instance_decision(stats, cfg) == ["clip_category"]
    # Without a CLIP model there is no score to judge: the filter cannot reject on it.
    assert instance_decision({**stats, "clip_category": None}, cfg) == []
