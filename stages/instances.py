"""Per-instance filters (Kaleido): size, CLIP category check, overlap, brightness, blur and, for humans, face
quality. Stats first (`instance_stats`, stored on each detection), decision second (`instance_decision`, which
reads only those stats), so `s2v curate refilter` can re-decide with new thresholds without any model.

An instance is one detection: a box on one keyframe (with its SAM mask when segmentation ran). A failing instance
is marked invalid with its reasons, not deleted: masks stay aligned with `detections`, and the later stages
(consolidation, references) use only valid ones. Clips are not dropped here: consolidation drops a clip that is
left with no entity to take a reference from.
"""

from __future__ import annotations

from collections import Counter

import cv2
import numpy as np

from pipeline.core.boxes import box_iou
from pipeline.core.config import InstanceFilterConfig
from pipeline.core.record import Record
from pipeline.core.stage import Stage

PERSON = "person"


def is_human(detection: dict, subjects: set[str]) -> bool:
    """A person box, or a box bound to a subject (a human entity), and not one of its attribute regions."""
    return detection.get("part") is None and (detection.get("label") == PERSON or detection.get("entity") in subjects)


def instance_stats(detections: list[dict], masks, keyframes: np.ndarray, faces: list[dict],
                   subjects: set[str]) -> list[dict]:
    """One stats dict per detection (see docs/concepts.md#instance-filters)."""
    _, height, width, _ = keyframes.shape
    grays = [cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY) for frame in keyframes]
    out = []
    for i, detection in enumerate(detections):
        k = detection["keyframe"]
        x0, y0, x1, y1 = detection["box"]
        mask = masks[i].astype(bool) if masks is not None and len(masks) > i else None
        if mask is not None and mask.any():
            area = float(mask.mean())
            region = grays[k][mask]
        else:
            area = max(0, x1 - x0) * max(0, y1 - y0) / (width * height)
            region = grays[k][y0:y1, x0:x1].ravel()
        crop = grays[k][y0:y1, x0:x1]
        # Overlap with instances of *other* entities on the same frame: a box that mostly covers another subject
        # would give a reference with two subjects in it. Attribute parts lie inside their subject by design.
        others = [d["box"] for d in detections
                  if d is not detection and d["keyframe"] == k and d.get("part") is None
                  and detection.get("part") is None
                  and (d.get("entity") is None or d.get("entity") != detection.get("entity"))]
        face = None
        if is_human(detection, subjects):
            inside = [f for f in faces if f.get("detection") == detection["id"]]
            if inside:
                best = max(inside, key=lambda f: f["score"])
                face = {"score": best["score"], "frontal": best["frontal"], "size_px": best["size_px"]}
        out.append({
            "area": round(area, 5),
            "max_iou": round(max((box_iou(detection["box"], b) for b in others), default=0.0), 4),
            "brightness": round(float(region.mean()), 2) if region.size else 0.0,
            "sharpness": round(float(cv2.Laplacian(crop, cv2.CV_64F).var()), 2) if crop.size >= 9 else 0.0,
            "clip_category": detection.get("clip_category_score"),
            "human": is_human(detection, subjects),
            "face": face,
        })
    return out


def instance_decision(stats: dict, cfg: InstanceFilterConfig) -> list[str]:
    """Every reason these stats fail these thresholds ([] = valid)."""
    reasons = []
    if stats["area"] < cfg.min_area:
        reasons.append("too_small")
    if stats["area"] > cfg.max_area:
        reasons.append("too_large")
    if (cfg.min_clip_score is not None and stats["clip_category"] is not None
            and stats["clip_category"] < cfg.min_clip_score):
        reasons.append("clip_category")
    if stats["max_iou"] > cfg.max_iou:
        reasons.append("overlap")
    if stats["brightness"] < cfg.min_brightness:
        reasons.append("too_dark")
    if stats["brightness"] > cfg.max_brightness:
        reasons.append("too_bright")
    if stats["sharpness"] < cfg.min_sharpness:
        reasons.append("blurry")
    if stats["human"]:
        face = stats["face"]
        if face is None:
            if cfg.require_face:
                reasons.append("no_face")
        else:
            if face["score"] < cfg.min_face_score:
                reasons.append("face_score")
            if cfg.require_frontal and not face["frontal"]:
                reasons.append("not_frontal")
            if face["size_px"] < cfg.min_face_px:
                reasons.append("face_too_small")
    return reasons


def decide_instances(detections: list[dict], cfg: InstanceFilterConfig) -> dict:
    """Marks each detection `valid` with its `rejected` reasons; returns the clip's counts."""
    rejected: Counter = Counter()
    for detection in detections:
        reasons = instance_decision(detection["stats"], cfg)
        detection["valid"], detection["rejected"] = not reasons, reasons
        rejected.update(reasons)
    valid = sum(d["valid"] for d in detections)
    return {"total": len(detections), "valid": valid, "rejected": dict(rejected)}


class InstanceStats(Stage):
    """`detections[i]["stats"]` for every detection of the clip."""

    name = "instance_stats"
    requires = ("keyframes",)

    def process(self, records: list[Record]) -> list[Record]:
        for record in records:
            detections = record.meta.get("detections")
            keyframes = record.blobs["keyframes"]
            if not detections:
                continue
            subjects = {e["id"] for e in record.meta.get("entities", []) if e.get("kind") == "subject"}
            stats = instance_stats(detections, record.blobs.get("masks"), keyframes, record.meta.get("faces", []),
                                   subjects)
            for detection, s in zip(detections, stats):
                detection["stats"] = s
        return records


class InstanceFilter(Stage):
    """`valid` / `rejected` on each detection and `stats.instances` counts on the clip, from the stored stats."""

    name = "instance_filter"

    def process(self, records: list[Record]) -> list[Record]:
        for record in records:
            detections = record.meta.get("detections") or []
            record.meta.setdefault("stats", {})["instances"] = decide_instances(
                detections, self.config.filters.instances
            )
        return records
