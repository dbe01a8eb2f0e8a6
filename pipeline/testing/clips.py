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


def leaving_clip(subject: np.ndarray, box: list[int], seconds: float = 4.0, leaves_at: float | None = None,
                 fps: int = 24, key: str = "k") -> Record:
    """A clip record (mp4, keyframes at 5/50/95 %, clip facts) of `subject` (a photo) pasted at `box` on a lawn,
    drifting right by 1 px a frame, and gone from `leaves_at` seconds on (None: it stays)."""
    from pipeline.core.video import ClipEncoder

    lawn = cv2.resize(np.stack([data.grass()] * 3, axis=-1), (WIDTH, HEIGHT))
    x0, y0, x1, y1 = box
    patch = cv2.resize(subject, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA)
    n = round(seconds * fps)
    encoder = ClipEncoder(WIDTH, HEIGHT, fps)
    frames = []
    for i in range(n):
        frame = lawn.copy()
        if leaves_at is None or i / fps < leaves_at:
            dx = min(i, WIDTH - x1)
            frame[y0:y1, x0 + dx : x1 + dx] = patch
        encoder.add(frame)
        frames.append(frame)
    record = Record(kind="clip", source_path="x.mp4", key=key)
    record.put_bytes("mp4", encoder.finish())
    marks = [round(p * (n - 1)) for p in (0.05, 0.5, 0.95)]
    record.blobs["keyframes"] = np.stack([frames[i] for i in marks])
    record.meta.update(clip_id=f"clip-{key}", clip={"num_frames": n, "fps": float(fps), "duration_s": n / fps,
                                                    "width": WIDTH, "height": HEIGHT},
                       keyframes=[{"at": p, "frame": i} for p, i in zip((0.05, 0.5, 0.95), marks)])
    # Consolidated already: one entity whose reference is the subject on keyframe 0.
    record.meta["entities"] = [{"id": "e0", "kind": "object", "word": "cat", "instances": ["d0"],
                                "reference": {"detection": "d0", "keyframe": 0}, "subject_id": 0, "view_id": 0}]
    dx = min(marks[0], WIDTH - x1)
    record.meta["detections"] = [{"id": "d0", "keyframe": 0, "entity": "e0", "label": "cat", "part": None,
                                  "box": [x0 + dx, y0, x1 + dx, y1], "score": 0.9, "valid": True}]
    record.meta["faces"] = []
    return record
