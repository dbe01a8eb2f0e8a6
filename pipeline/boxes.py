"""Box helpers shared by the stages that detect or use boxes (faces, grounding, segmentation)."""

from __future__ import annotations


def clip_box(box, width: int, height: int) -> list[int]:
    """[x0, y0, x1, y1] rounded to pixels and clipped to the frame."""
    x0, y0, x1, y1 = (int(round(float(v))) for v in box)
    return [min(max(x0, 0), width), min(max(y0, 0), height), min(max(x1, 0), width), min(max(y1, 0), height)]
