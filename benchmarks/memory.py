"""Peak memory of curating a long 1080p video: does it grow with the video's length?

Generates (once, cached in --dir) a 1-minute and a 10-minute 1920x1080 24 fps H.264 video: a slow pan over a real
photo (scikit-image's bundled photos), with a hard cut to another photo every 8 s, so the shot detector finds
shots and the flow cuts clips all the way through, and a metadata file with a caption per shot, so every stage of
the flow (references, inpainting, shard writing) has work. Each run is `s2v curate run --sequential` in a fresh Python
process (`pipeline.run.runner.curate(..., sequential=True)`: every stage of --config, then assembly and shard writing,
in that one process), and its peak RSS is the child's own `ru_maxrss`; so is a bare decode of every frame at full
size (`pipeline.core.video.iter_frames`), for comparison. Then `input.limits` with a limit below
1080p: the 10-minute input with `on_exceed: reject`, and the 1-minute one with `on_exceed: downscale`.
Prints one JSON object on its last line:
  {"decode_only": {...}, "peak_rss_mb_1min", "peak_rss_mb_10min", "rss_ratio_10min_vs_1min", "wall_s_1min",
   "wall_s_10min", "limits_reject": {...}, "limits_downscale": {..., "peak_rss_mb"}, ...}
Bounded memory means rss_ratio_10min_vs_1min stays near 1.0.

    python benchmarks/memory.py [--config configs/quickstart.yaml] [--dir /tmp/s2v-memory-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEIGHT, FPS = 1920, 1080, 24
SHOT_S = 8
PAN_PX = 2  # pixels per frame: a slow pan, so consecutive frames differ but no cut is seen inside a shot
LIMIT = 480  # input.limits for the limits runs: 1080p is over it, and so are the quickstart's 640x360 clips
# One photo per shot, in turn, with the caption the metadata file gives its shots: each names one subject or object
# (the taxonomy matches it), so the saliency binding has an entity and the sample stages run; the night sky names
# only backgrounds, and its clips are dropped at consolidation, as such clips are in the demo.
PHOTOS = [
    ("astronaut", "A smiling woman in an orange spacesuit stands"),
    ("chelsea", "A tabby cat sits"),
    ("coffee", "A cup of coffee rests"),
    ("rocket", "A white rocket stands upright"),
    ("stereo_motorcycle", "A red motorcycle is parked"),
    ("hubble_deep_field", "A night sky with galaxies"),
]


def _photo(name: str) -> np.ndarray:
    from skimage import data

    image = getattr(data, name)()
    if name == "stereo_motorcycle":
        image = image[0]  # (left, right, disparity)
    if name == "hubble_deep_field":  # a mean luma near 19 would be dropped as too dark; lift it like the demo does
        image = np.clip(image.astype(np.float32) * 2.3, 0, 255).astype(np.uint8)
    return image


def _shots(seconds: int) -> list[tuple[int, int]]:
    """(first frame, frame count) of each shot."""
    per_shot, total = SHOT_S * FPS, seconds * FPS
    return [(first, min(per_shot, total - first)) for first in range(0, total, per_shot)]


def frames(seconds: int):
    """Shots of SHOT_S seconds, each a pan over the next photo (direction alternating), one frame at a time."""
    margin = SHOT_S * FPS * PAN_PX
    for shot, (_, count) in enumerate(_shots(seconds)):
        big = cv2.resize(_photo(PHOTOS[shot % len(PHOTOS)][0]), (WIDTH + margin, HEIGHT + margin // 4),
                         interpolation=cv2.INTER_CUBIC)
        for i in range(count):
            x = i * PAN_PX if shot % 2 == 0 else margin - i * PAN_PX
            y = i * PAN_PX // 8
            yield np.ascontiguousarray(big[y : y + HEIGHT, x : x + WIDTH])


def metadata_line(video: Path, seconds: int) -> dict:
    """The metadata entry of one test video: each shot's span and caption."""
    shots = []
    for shot, (first, count) in enumerate(_shots(seconds)):
        direction = "right" if shot % 2 == 0 else "left"
        shots.append({"start_s": first / FPS, "end_s": (first + count) / FPS,
                      "caption": f"{PHOTOS[shot % len(PHOTOS)][1]} while the camera pans {direction}."})
    return {"video": video.name, "shots": shots}


def test_video(folder: Path, seconds: int) -> tuple[Path, float]:
    """The cached video of `seconds` (generated when missing) and the seconds its generation took (0 if cached)."""
    from pipeline.core.video import encode_video

    path = folder / f"pan-{WIDTH}x{HEIGHT}-{FPS}fps-{seconds}s.mp4"
    if path.is_file():
        return path, 0.0
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".mp4.tmp")
    start = time.perf_counter()
    # ultrafast and a high crf: the content matters for the flow, not the bitrate, and generation stays in minutes.
    encode_video(str(partial), frames(seconds), FPS, crf=32, preset="ultrafast", threads=2, keyframe_s=SHOT_S)
    os.replace(partial, path)
    return path, round(time.perf_counter() - start, 1)


def child(video: str, config_path: str, out: str, overrides: list[str]) -> None:
    """One sequential curation in this process; prints its counts, wall time and peak RSS as JSON."""
    from rich.console import Console

    from pipeline.core.config import load_config
    from pipeline.run.runner import curate

    config = load_config(config_path, overrides)
    config.input.paths = [video]
    config.input.metadata = str(Path(video).with_name("metadata.jsonl"))
    start = time.perf_counter()
    with RssSampler() as rss:
        summary = curate(config, out, console=Console(quiet=True), sequential=True)
    print(json.dumps({
        "wall_s": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        # Growth shows as a later tenth peaking above an earlier one; a bounded run plateaus once its models load.
        "rss_mb_by_tenth": rss.peaks_by_tenth(),
        "clips": summary["clips"],
        "samples": summary["samples"],
        "removed": {f"{f['stage']} ({f['unit']})": f["removed"] for f in summary["funnel"] if f["removed"]},
    }))


class RssSampler:
    """This process's resident memory every 0.2 s while a run goes (from /proc/self/statm), to tell a one-time
    cost (model loads) from growth over the run."""

    def __init__(self):
        self.samples: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._page_mb = os.sysconf("SC_PAGE_SIZE") / 2**20

    def _loop(self) -> None:
        while not self._stop.wait(0.2):
            with open("/proc/self/statm") as f:
                self.samples.append(int(f.read().split()[1]) * self._page_mb)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def peaks_by_tenth(self) -> list[float]:
        """The peak of each tenth of the run's samples."""
        n = len(self.samples)
        return ([round(max(self.samples[i * n // 10:max(i * n // 10 + 1, (i + 1) * n // 10)]), 1) for i in range(10)]
                if n else [])


def child_decode(video: str) -> None:
    """Every frame of `video` at full size through `iter_frames`, nothing kept; prints frames, wall and peak RSS."""
    from pipeline.core.video import iter_frames

    start = time.perf_counter()
    count = sum(1 for _ in iter_frames(video))
    print(json.dumps({"frames": count, "wall_s": round(time.perf_counter() - start, 1),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))


def run(video: Path, config: str | None, out: Path | None = None, overrides: list[str] = ()) -> dict:
    """One child process: a curation with `config`, or (config None) a bare decode of `video`."""
    if config is None:
        cmd = [sys.executable, __file__, "--child-decode", str(video)]
    else:
        cmd = [sys.executable, __file__, "--child", str(video), "--config", config, "--out", str(out)]
        cmd += [arg for o in overrides for arg in ("--set", o)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"child run failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(REPO / "configs" / "quickstart.yaml"))
    parser.add_argument("--dir", default=str(Path(tempfile.gettempdir()) / "s2v-memory-bench"),
                        help="where the test videos are generated once and kept")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-decode", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.config, args.out, args.overrides)
    if args.child_decode:
        return child_decode(args.child_decode)

    folder = Path(args.dir)
    (one, gen_one), (ten, gen_ten) = test_video(folder, 60), test_video(folder, 600)
    lines = [metadata_line(one, 60), metadata_line(ten, 600)]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    limits = [f"limits.max_width={LIMIT}", f"limits.max_height={LIMIT}"]
    decode = {"1min": run(one, None), "10min": run(ten, None)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        short = run(one, args.config, tmp / "1min", args.overrides)
        long_ = run(ten, args.config, tmp / "10min", args.overrides)
        reject = run(ten, args.config, tmp / "reject", [*args.overrides, *limits, "limits.on_exceed=reject"])
        downscale = run(one, args.config, tmp / "downscale", [*args.overrides, *limits,
                                                                "limits.on_exceed=downscale"])
    result = {
        "input": f"{WIDTH}x{HEIGHT} {FPS} fps H.264, a cut every {SHOT_S} s",
        "generation_s": {"1min": gen_one, "10min": gen_ten},
        "config": str(Path(args.config).relative_to(REPO) if Path(args.config).is_relative_to(REPO) else args.config),
        "decode_only": {**decode, "rss_ratio_10min_vs_1min": round(decode["10min"]["peak_rss_mb"]
                                                                   / decode["1min"]["peak_rss_mb"], 3)},
        "runs": {"1min": short, "10min": long_},
        "peak_rss_mb_1min": short["peak_rss_mb"],
        "peak_rss_mb_10min": long_["peak_rss_mb"],
        "rss_ratio_10min_vs_1min": round(long_["peak_rss_mb"] / short["peak_rss_mb"], 3),
        "wall_s_1min": short["wall_s"],
        "wall_s_10min": long_["wall_s"],
        "limits_reject": {"limit": f"{LIMIT}x{LIMIT}", "input": "10min", **reject},
        "limits_downscale": {"limit": f"{LIMIT}x{LIMIT}", "input": "1min", **downscale},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
