"""Box helpers shared by the stages that detect or use boxes (faces, grounding, segmentation)."""

from __future__ import annotations


def clip_box(box, width: int, height: int) -> list[int]:
    """[x0, y0, x1, y1] rounded to pixels and clipped to the frame."""
    x0, y0, x1, y1 = (round(float(v)) for v in box)
    return [min(max(x0, 0), width), min(max(y0, 0), height), min(max(x1, 0), width), min(max(y1, 0), height)]


def box_iou(a, b) -> float:
    """Intersection over union of two [x0, y0, x1, y1] boxes (0 when both are empty)."""
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0
