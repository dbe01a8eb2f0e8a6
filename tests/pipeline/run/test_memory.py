"""Bounded memory: decoding streams, so the peak RSS of decoding a video does not grow with its length; and
`input.limits` rejects a source over the size limit, or keeps it with every clip fitted inside the limit."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import av
import pytest

from pipeline.core.config import build_config
from pipeline.core.stage import run_stage
from pipeline.core.video import encode_video
from pipeline.sources.inputs import source_records
from pipeline.testing.frames import moving_frames
from stages.clip_extract import ClipExtractor
from stages.probe import Prober
from stages.shot_cut import ShotCutter

ROOT = Path(__file__).resolve().parents[3]
FRAME_MB = 1280 * 720 * 3 / 2**20  # one decoded 720p RGB frame

# Decodes every frame at full size in a fresh interpreter and reports its own peak RSS (ru_maxrss is in KiB on Linux).
DECODE = """
import json, resource, sys
from pipeline.core.video import iter_frames
frames = sum(1 for _ in iter_frames(sys.argv[1]))
print(json.dumps({"frames": frames, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    """A 5 s and a 40 s 1280x720 pan over a real photo, 24 fps."""
    d = tmp_path_factory.mktemp("memory")
    paths = {"short": d / "short.mp4", "long": d / "long.mp4"}
    for name, seconds in (("short", 5), ("long", 40)):
        encode_video(str(paths[name]), moving_frames(24 * seconds, width=1280, height=720), fps=24,
                     preset="ultrafast", crf=35, threads=2)
    return paths


def decode_peak(path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", DECODE, str(path)], cwd=ROOT, capture_output=True, text=True,
                         check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_decoding_peak_rss_does_not_grow_with_video_length(videos):
    short, long_ = decode_peak(videos["short"]), decode_peak(videos["long"])
    assert (short["frames"], long_["frames"]) == (120, 960)
    # Holding the 840 extra frames would add ~2.2 GB; holding even one in ten, ~230 MB. Streaming adds nothing.
    assert long_["peak_rss_mb"] - short["peak_rss_mb"] < 10 * FRAME_MB, (short, long_)


def probe_cut_extract(path: Path, overrides: list[str]):
    config = build_config({}, ["shots.min_clip_s=1.0", *overrides])
    records = source_records([str(path)], {})
    for stage in (Prober(config), ShotCutter(config), ClipExtractor(config)):
        records = run_stage(stage, records)
    return records


def test_a_source_over_the_size_limit_is_rejected_by_default(videos):
    [record] = probe_cut_extract(videos["short"], ["limits.max_width=480", "limits.max_height=480"])
    assert [(e["stage"], e["reason"]) for e in record.errors] == [("probe", "too_large")]
    assert "1280x720" in record.errors[0]["message"]


def test_a_downscaled_source_gives_clips_inside_the_limit(videos):
    clips = probe_cut_extract(videos["short"], ["limits.max_width=480", "limits.max_height=480",
                                                "limits.on_exceed=downscale"])
    assert clips and all(c.alive and c.kind == "clip" for c in clips)
    for clip in clips:
        assert (clip.meta["clip"]["width"], clip.meta["clip"]["height"]) == (480, 270)
        assert any("downscaled" in w["message"] for w in clip.meta["warnings"])
        with av.open(io.BytesIO(clip.get_bytes("mp4"))) as container:
            stream = container.streams.video[0]
            assert (stream.width, stream.height) == (480, 270)
        assert clip.blobs["keyframes"].shape[1:] == (270, 480, 3)
