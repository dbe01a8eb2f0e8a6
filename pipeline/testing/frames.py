"""Synthetic frames for decoder and memory tests."""

from __future__ import annotations

import cv2
import numpy as np
from skimage import data


def moving_frames(n: int, width: int = 320, height: int = 180, image=None):
    """A slow pan over a real photo: frames with texture and motion, not flat colours."""
    image = data.astronaut() if image is None else image
    big = cv2.resize(image, (width + n, height + n // 2))
    for i in range(n):
        yield np.ascontiguousarray(big[i // 2 : i // 2 + height, i : i + width])
