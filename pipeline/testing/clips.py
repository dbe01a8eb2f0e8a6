"""Clip records made from real photos (skimage), for stage tests: keyframes with known objects and boxes, and
photos letterboxed into keyframes the way clip extraction makes them."""

from __future__ import annotations

import cv2
import numpy as np
from skimage import data

from pipeline.core.config import build_config
from pipeline.core.record import Record
from pipeline.core.stage import run_stage

WIDTH, HEIGHT = 640, 360
CAT, CUP = [40, 40, 260, 300], [380, 60, 600, 300]


def keyframes(third_cup_is_a_rocket: bool = False) -> np.ndarray:
    """Three keyframes of a cat (left) and a cup (right) on a lawn; optionally the cup is a rocket on the last."""
    lawn = cv2.resize(np.stack([data.grass()] * 3, axis=-1), (WIDTH, HEIGHT))
    frames = []
    for k in range(3):
        frame = lawn.copy()
        for (x0, y0, x1, y1), photo in ((CAT, data.chelsea()), (CUP, data.coffee())):
            if third_cup_is_a_rocket and k == 2 and photo.shape == data.coffee().shape:
                photo = data.rocket()
            frame[y0:y1, x0:x1] = cv2.resize(photo, (x1 - x0, y1 - y0))
        frames.append(frame)
    return np.stack(frames)


def clip(key: str = "k", frames: np.ndarray | None = None, valid=lambda k, e: True) -> Record:
    record = Record(kind="clip", source_path="x.mp4", key=key)
    record.blobs["keyframes"] = keyframes() if frames is None else frames
    record.meta["clip_id"] = f"clip-{key}"
    record.meta["keyframes"] = [{"at": a, "frame": f} for a, f in ((0.05, 2), (0.5, 24), (0.95, 46))]
    record.meta["entities"] = [{"id": "e0", "kind": "object", "word": "cat", "category": "cat"},
                               {"id": "e1", "kind": "object", "word": "cup", "category": "cup"},
                               {"id": "e2", "kind": "background", "word": "lawn", "category": "lawn"}]
    record.meta["detections"] = [
        {"id": f"d{2 * k + j}", "keyframe": k, "entity": e, "label": w, "part": None, "box": box, "score": 0.9,
         "valid": valid(k, e), "stats": {"area": 0.2}}
        for k in range(3) for j, (e, w, box) in enumerate((("e0", "cat", CAT), ("e1", "cup", CUP)))
    ]
    masks = np.zeros((6, HEIGHT, WIDTH), np.uint8)
    for i, d in enumerate(record.meta["detections"]):
        x0, y0, x1, y1 = d["box"]
        masks[i, y0 + 10 : y1 - 10, x0 + 10 : x1 - 10] = 1
    record.blobs["masks"] = masks
    record.meta["faces"] = []
    return record


def consolidate(record: Record, overrides=()) -> Record:
    """`record` after the consolidation stage (default config plus `overrides`)."""
    from stages.consolidation import Consolidator

    run_stage(Consolidator(build_config({}, list(overrides))), [record])
    return record


def keyframe(image: np.ndarray, width: int = 640, height: int = 360) -> np.ndarray:
    """A photo letterboxed into a width x height RGB keyframe, aspect ratio kept (faces stay faces)."""
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    scale = min(width / image.shape[1], height / image.shape[0])
    resized = cv2.resize(image, (round(image.shape[1] * scale), round(image.shape[0] * scale)),
                         interpolation=cv2.INTER_AREA)
    out = np.zeros((height, width, 3), np.uint8)
    y0, x0 = (height - resized.shape[0]) // 2, (width - resized.shape[1]) // 2
    out[y0:y0 + resized.shape[0], x0:x0 + resized.shape[1]] = resized
    return out


ASTRONAUT = keyframe(data.astronaut())
ASTRONAUT_MIRRORED = keyframe(data.astronaut()[:, ::-1])
CAMERAMAN = keyframe(data.camera())
COFFEE = keyframe(data.coffee())
